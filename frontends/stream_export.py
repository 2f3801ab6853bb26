"""Memory-bounded export of a Hugging Face causal LM folder to ONNX: the weights are streamed, never loaded.

The weights are never all in memory:

1. the model is built without storage from ``config.json``: under a ``FakeTensorMode`` (parameters are
   FakeTensors on the CPU device; default) or on the ``meta`` device (--capture meta);
2. ``torch.onnx.export(..., dynamo=True, optimize=False)`` captures the graph with those parameters (the
   exporter's optimizer cannot run yet: its constant folding reads initializer values);
3. every initializer that is a parameter gets a ``onnx_ir.LazyTensor`` reading the checkpoint tensor on
   demand, and every buffer (rotary ``inv_freq``, not in the checkpoint) the value of a copy of its module
   rebuilt on the CPU from the config;
4. ``Transpose(weight)`` nodes (how the exporter writes ``nn.Linear``) are folded here, as the exporter's
   optimizer would (its ``_DEFAULT_ALWAYS_FOLD_OPS`` folds a Transpose of a large initializer that has no other
   consumer): the initializer takes the Transpose output's name and the transposed layout ``[in, out]``, and
   the transposition happens while streaming;
5. the exporter's own optimizer (``onnxscript.optimizer.optimize_ir`` + ``onnx_fusions.fuse``, what
   ``ONNXProgram.optimize()`` runs) runs with the lazy weights: it only reads small tensors, and a guard keeps
   it from folding a Transpose of a weight;
6. the weights are streamed, one tensor at a time and at most CHUNK_BYTES of it at once, from the
   safetensors files to ``<model>.onnx.data`` (converted to --dtype, transposed where step 4 said so, with
   os.pwrite: a transposed weight is written as column bands), and each initializer becomes an
   ``onnx_ir.ExternalTensor`` pointing into it; ``onnx_ir.save`` then writes the graph proto only.

The same interface as :func:`llmq.frontends.torch_export.export_hf`: ``input_ids [batch, seq]`` →
``logits [batch, seq, vocab]``, both axes dynamic; ``divide_by_rms`` is applied as there. Measured: a random
TinyLlama-1.1B-shaped float16 checkpoint (2.2 GB) exports in 82 s at 0.81 GB peak RSS, a Llama-3-8B-shaped one
(16 GB) in 3.5 min at 0.84 GB. The graph equals a normal in-memory export's (tested on a tiny Llama).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
import warnings

import torch

from ..ir.errors import LlmqError
from .torch_export import _logits_only

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_bytes", "stream_export", "streamable"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
CHUNK_BYTES = 64 << 20  # streamed pieces
ALIGN = 4096  # offset of tensors of 1 MiB or more in the data file (page-aligned: ORT can mmap them)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Checkpoint:
    """The tensors of a HF folder's safetensors file(s), read with plain file reads (no mmap: mapped pages
    would count in the resident set), one tensor or one row range at a time."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise LlmqError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.entries = {}  # name -> (path, torch dtype, shape, absolute offset, nbytes)
        for fname in files:
            path = os.path.join(folder, fname)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, e in header.items():
                if e["dtype"] not in ST_DTYPES:
                    raise LlmqError(f"{name}: safetensors dtype {e['dtype']} not supported")
                start, end = e["data_offsets"]
                self.entries[name] = (path, ST_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the tensor (first axis), in its stored dtype."""
        path, dtype, shape, offset, nbytes = self.entries[name]
        row = nbytes // shape[0] if shape else nbytes
        buf = torch.empty(((r1 - r0) * row,), dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset + r0 * row)
            view, done = memoryview(buf.numpy()), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise LlmqError(f"{path}: truncated at {name}")
                done += got
        return buf.view(dtype).reshape((r1 - r0, *shape[1:]) if shape else ())

    def read(self, name: str) -> torch.Tensor:
        shape = self.entries[name][2]
        return self.rows(name, 0, shape[0] if shape else 1)


class Source:
    """Where an initializer's values come from: a checkpoint tensor (optionally permuted) or a buffer."""

    def __init__(self, key: str, dtype: torch.dtype, perm=None, value: torch.Tensor | None = None):
        self.key, self.dtype, self.perm, self.value = key, dtype, perm, value

    def shape(self, ckpt: Checkpoint) -> tuple:
        shape = self.value.shape if self.value is not None else ckpt.entries[self.key][2]
        return tuple(shape[p] for p in self.perm) if self.perm else tuple(shape)

    def materialize(self, ckpt: Checkpoint) -> torch.Tensor:
        """The whole tensor (only for the optimizer's look at small tensors, and for tests)."""
        t = self.value if self.value is not None else ckpt.read(self.key)
        if self.perm:
            t = t.permute(self.perm)
        return t.to(self.dtype).contiguous()

    def write(self, ckpt: Checkpoint, fd: int, start: int) -> int:
        """Write the tensor's bytes, converted and permuted, at ``start`` in ``fd`` (os.pwrite), in pieces of
        about CHUNK_BYTES; returns the bytes written. A 2-D transpose reads the source in row blocks and
        writes each block's transpose as a column band of the output (one pwrite per output row): neither the
        source nor the result is ever whole in memory."""
        def put(t: torch.Tensor, at: int) -> int:
            b = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            done = 0
            while done < b.nbytes:
                done += os.pwrite(fd, b[done:], at + done)
            return b.nbytes

        if self.value is not None:
            return put(self.materialize(ckpt), start)
        _, src, shape, _, nbytes = ckpt.entries[self.key]
        if not shape:
            return put(self.materialize(ckpt).reshape(1), start)
        step = max(1, CHUNK_BYTES // max(1, nbytes // shape[0]))  # source rows per block
        if not self.perm or list(self.perm) == list(range(len(shape))):
            at = start
            for r0 in range(0, shape[0], step):
                at += put(ckpt.rows(self.key, r0, min(shape[0], r0 + step)).to(self.dtype), at)
            return at - start
        if len(shape) == 2 and tuple(self.perm) == (1, 0):
            rows, cols = shape  # output [cols, rows]
            esize = torch.empty(0, dtype=self.dtype).element_size()
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                band = ckpt.rows(self.key, r0, r1).t().to(self.dtype).contiguous()  # [cols, r1 - r0]
                b = band.reshape(-1).view(torch.uint8).numpy().reshape(cols, -1)  # [cols, (r1 - r0) * esize]
                for i in range(cols):
                    at, row, done = start + (i * rows + r0) * esize, b[i], 0
                    while done < row.nbytes:
                        done += os.pwrite(fd, row[done:], at + done)
            return rows * cols * esize
        return put(self.materialize(ckpt), start)  # other permutations: the tensor whole (not met in Llama)


def config_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(d, str):
        d = DTYPES.get(d.replace("torch.", ""), torch.float32)
    return d if d in DTYPES.values() else torch.float32


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_meta_model(folder: str, dtype: torch.dtype, capture_mode: str = "fake"):
    """(model without storage, config, context to create example inputs in). ``fake``: parameters are
    FakeTensors on the CPU device (the trace dispatches as for a real CPU model, so the graph is the same as
    a normal export's); ``meta``: parameters on the meta device (the graph differs by an identity Reshape per
    attention: the meta SDPA returns other strides, so a ``.contiguous()`` is recorded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if capture_mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        ctx = FakeTensorMode(allow_non_fake_inputs=True)
    else:
        ctx = torch.device("meta")
    with ctx:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model, config, ctx


def real_buffers(model, ckpt: Checkpoint, dtype: torch.dtype) -> dict:
    """{fqn: CPU tensor} for every buffer of the meta model: from the checkpoint when stored there (persistent
    buffers), else from a copy of its module rebuilt on the CPU from the config (rotary ``inv_freq``)."""
    out, rebuilt = {}, {}
    for fqn, _ in model.named_buffers():
        if fqn in ckpt:
            out[fqn] = ckpt.read(fqn)
            continue
        owner, _, attr = fqn.rpartition(".")
        module = model.get_submodule(owner)
        if owner not in rebuilt:
            cfg = getattr(module, "config", None)
            if cfg is None:
                raise LlmqError(f"buffer {fqn} is not in the checkpoint and {type(module).__name__} has no config "
                                 "to rebuild it from")
            with torch.device("cpu"), default_dtype(dtype):
                rebuilt[owner] = type(module)(cfg)
        out[fqn] = getattr(rebuilt[owner], attr).detach().clone()
    return out


def capture(model, ctx, opset: int):
    """The ONNXProgram of the storage-less model, unoptimized (initializers hold fake/meta tensors)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    with ctx:
        example = torch.randint(0, min(vocab, 1000), (2, 16))
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=1 << 16)}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(_logits_only(model), (example,), dynamo=True, opset_version=opset,
                                 input_names=["input_ids"], output_names=["logits"], dynamic_shapes=dims,
                                 optimize=False, verbose=False, report=False)


def attach_sources(graph, model, ckpt: Checkpoint, buffers: dict, prefix: str = "inner.") -> dict:
    """Give every initializer its source; returns {initializer name: Source} of the checkpoint-backed ones.
    A parameter missing from the checkpoint under its own name is looked up under its tied aliases."""
    import onnx_ir as ir

    aliases = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(fqn)
    by_name = {fqn: aliases[id(p)] for fqn, p in model.named_parameters(remove_duplicate=False)}
    sources = {}
    for name, value in list(graph.initializers.items()):
        fqn = name[len(prefix):] if name.startswith(prefix) else name
        want = value.const_value
        dtype = want.raw.dtype if hasattr(want, "raw") and isinstance(want.raw, torch.Tensor) else None
        if fqn in buffers:
            t = buffers[fqn]
            if dtype is not None:
                t = t.to(dtype)
            if tuple(t.shape) != tuple(value.shape.numpy()):
                raise LlmqError(f"buffer {fqn}: rebuilt shape {tuple(t.shape)} != graph {value.shape}")
            value.const_value = ir.tensor(t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.uint16).numpy(),
                                          dtype=value.dtype, name=name)
            continue
        if fqn not in by_name:
            raise LlmqError(f"initializer {name}: not a parameter or buffer of the model")
        key = next((a for a in [fqn] + by_name[fqn] if a in ckpt), None)
        if key is None:
            raise LlmqError(f"parameter {fqn} (aliases {by_name[fqn]}) is not in the checkpoint")
        src = Source(key, dtype)
        if src.shape(ckpt) != tuple(value.shape.numpy()):
            raise LlmqError(f"{key}: checkpoint shape {src.shape(ckpt)} != graph {value.shape}")
        sources[name] = src
    return sources


def lazy(src: Source, ckpt: Checkpoint, value):
    import onnx_ir as ir

    def load():
        t = src.materialize(ckpt)
        return ir.tensor(t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy(),
                         dtype=value.dtype)

    return ir.LazyTensor(load, dtype=value.dtype, shape=ir.Shape(src.shape(ckpt)), name=value.name)


def fold_weight_transposes(graph, sources: dict, ckpt: Checkpoint, size_limit: int = 8192) -> int:
    """Replace ``Transpose(W)`` of a checkpoint initializer by a new initializer (named as the Transpose's
    output) holding W permuted, when the exporter's optimizer would fold it too: W small (input_size_limit) or
    W used by that Transpose only. A tied embedding also read by its Gather keeps its Transpose (so does the
    reference export). Returns how many."""
    import onnx_ir as ir

    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[0]
        if w is None or w.name not in sources or not w.is_initializer():
            continue
        src = sources[w.name]
        size = math.prod(src.shape(ckpt))
        if size > size_limit and len(w.uses()) != 1:
            continue
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(range(len(src.shape(ckpt))))[::-1]
        out = node.outputs[0]
        new = ir.Value(name=out.name, shape=ir.Shape([src.shape(ckpt)[p] for p in perm]),
                       type=ir.TensorType(w.dtype))
        new_src = Source(src.key, src.dtype, tuple(src.perm[p] for p in perm) if src.perm else tuple(perm))
        new.const_value = lazy(new_src, ckpt, new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        if not w.uses():
            graph.initializers.pop(w.name)
            sources.pop(w.name)
        graph.register_initializer(new)
        sources[new.name] = new_src
        folded += 1
    return folded


def optimize(model_ir, sources: dict) -> None:
    """What ``ONNXProgram.optimize()`` does, with a guard against folding a Transpose of a weight."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    def should_fold(node):
        if node.op_type == "Transpose" and any(v is not None and v.name in sources and v.is_initializer()
                                               for v in node.inputs):
            return False
        return None

    onnxscript.optimizer.optimize_ir(model_ir, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(model_ir)


def stream_weights(graph, sources: dict, ckpt: Checkpoint, data_path: str, progress=None) -> int:
    """Write every checkpoint-backed initializer still in the graph to ``data_path`` and point it there.
    Returns the bytes written."""
    import onnx_ir as ir

    location = os.path.basename(data_path)
    base_dir = os.path.dirname(os.path.abspath(data_path))
    live = [(n, v) for n, v in graph.initializers.items() if n in sources]
    offset = 0
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i, (name, value) in enumerate(live):
            src = sources[name]
            esize = torch.empty(0, dtype=src.dtype).element_size()
            length = math.prod(src.shape(ckpt)) * esize
            if length >= 1 << 20 and offset % ALIGN:
                offset += ALIGN - offset % ALIGN  # a hole: reads back as zeros
            wrote = src.write(ckpt, fd, offset)
            if wrote != length:
                raise LlmqError(f"{name}: wrote {wrote} bytes, expected {length}")
            value.const_value = ir.ExternalTensor(location, offset, length, value.dtype,
                                                  shape=ir.Shape(src.shape(ckpt)), name=name, base_dir=base_dir)
            offset += length
            if progress:
                progress(i + 1, len(live), name)
        os.ftruncate(fd, offset)
    finally:
        os.close(fd)
    return offset


def streamable(source: str) -> bool:
    """Whether ``source`` is a HF folder whose weights are safetensors (what the streaming export reads)."""
    return os.path.isdir(source) and any(os.path.isfile(os.path.join(source, f)) for f in
                                         ("model.safetensors", "model.safetensors.index.json"))


def checkpoint_bytes(source: str) -> int:
    """Bytes of the safetensors files of a HF folder."""
    return sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors"))


def stream_export(folder: str, output: str, dtype: torch.dtype | None = None, opset: int = 21,
                  rms_div: bool = True, log=logger.info, capture_mode: str = "fake", metadata: dict | None = None) -> dict:
    import onnx_ir as ir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    times = {}

    def phase(name):
        times[name] = round(time.time() - t0, 1)
        log(f"[{times[name]:7.1f} s] {name:<34} RSS {rss_mb():7.0f} MiB  peak {peak_rss_mb():7.0f} MiB")

    ckpt = Checkpoint(folder)
    from transformers import AutoConfig

    dtype = dtype or config_dtype(AutoConfig.from_pretrained(folder))
    model, config, ctx = build_meta_model(folder, dtype, capture_mode)
    buffers = real_buffers(model, ckpt, dtype)
    phase(f"{capture_mode} model built")
    program = capture(model, ctx, opset)
    model_ir = program.model
    graph = model_ir.graph
    phase(f"graph captured ({capture_mode})")
    sources = attach_sources(graph, model, ckpt, buffers)
    folded = fold_weight_transposes(graph, sources, ckpt)
    for name in sources:
        value = graph.initializers[name]
        if not isinstance(value.const_value, ir.LazyTensor):
            value.const_value = lazy(sources[name], ckpt, value)
    phase(f"sources attached, {folded} transposes folded")
    optimize(model_ir, sources)
    phase("optimized")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    model_ir.metadata_props.update({"llmq.source": os.path.basename(os.path.normpath(folder)),
                                    "llmq.vocab_size": str(vocab), "llmq.architecture": type(model).__name__,
                                    "llmq.dtype": str(dtype).replace("torch.", ""),
                                    "llmq.export": f"streamed weights ({capture_mode} capture)"})
    del program, model

    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".stream-export-", dir=out_dir)
    name = os.path.basename(output)
    try:
        last = [time.time()]

        def progress(i, n, tname):
            if time.time() - last[0] > 10 or i == n:
                last[0] = time.time()
                phase(f"streamed {i}/{n} tensors")

        nbytes = stream_weights(graph, sources, ckpt, os.path.join(tmp, name + ".data"), progress)
        ir.save(model_ir, os.path.join(tmp, name))
        if rms_div:
            import onnx
            from .torch_export import divide_by_rms

            proto = onnx.load(os.path.join(tmp, name), load_external_data=False)
            log(f"divide_by_rms: {divide_by_rms(proto.graph)} norms")
            onnx.save_model(proto, os.path.join(tmp, name))
        for entry in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, entry), os.path.join(out_dir, entry if entry != name else name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    phase("saved")
    return {"model": output, "data_bytes": nbytes, "onnx_bytes": os.path.getsize(output), "times": times,
            "peak_rss_mb": peak_rss_mb(), "dtype": str(dtype).replace("torch.", "")}

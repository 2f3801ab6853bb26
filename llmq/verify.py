"""End-to-end verification: the compiled model against the model the user gave, on held-out windows.

The last step of every compile runs both files in ONNX Runtime (the compiled one with the session settings
its backend uses) on calibration windows the statistics did not come from, and measures:

* language-model outputs (``logits``, or a last axis as wide as the vocabulary): the mean per-token
  ``KL(p_input ‖ p_compiled)`` in nats (≈ the log of the perplexity ratio for small losses) and the top-1
  agreement (how often both models pick the same next token);
* any other output (an encoder's hidden states): the relative RMS error ``‖y − ŷ‖ / ‖y‖`` and the mean
  per-token cosine;
* each decoder block's output (the residual stream after the block), as relative RMS error against the
  input model's same tensor, so a loss can be traced to the block that made it.

A recipe states its bound (``verify: {max_kl, max_rel_error}``); :func:`check_bound` says whether the
measurement is within it. KV-cache outputs (``present.*``) are internal state — SmoothAttention rescales
the keys on purpose — and are not compared.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from .backends.onnxruntime import make_session
from .ir.feeds import prompt_feeds, session_specs
from .ir.storage import release_memory, spill_inline

__all__ = ["Bound", "verify_model", "verify_by_parts", "check_bound", "block_outputs", "compared_outputs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    """What a recipe promises against its input model; None: no promise on that kind of output."""

    max_kl: float | None = None  # LM outputs: mean KL per token (nats)
    max_rel_error: float | None = None  # other outputs: relative RMS error
    windows: int = 4  # held-out windows to measure on

    def describe(self) -> str:
        parts = ([f"KL ≤ {self.max_kl:g} nats/token"] if self.max_kl is not None else []) + (
            [f"relative error ≤ {self.max_rel_error:g}"] if self.max_rel_error is not None else [])
        return ", ".join(parts) or "no bound stated"


def compared_outputs(names: list) -> list:
    """The outputs a verification compares: all but the KV cache (``present.*``)."""
    return [n for n in names if not n.startswith("present")]


def block_outputs(structure) -> dict:
    """``{"layers.N": tensor name}``: per layer, the output of its last residual ``Add`` in graph order."""
    out = {}
    names = {lin.name: lin for lin in structure.linears}
    for entry in structure.residual_adds:  # in graph order
        lin = names.get(entry["after"])
        if lin is not None and lin.layer is not None:
            out[f"layers.{lin.layer}"] = entry["output"]
    return out


def _session(path: str, extra: list, accuracy_level: int):
    """A session for ``path`` with ``extra`` intermediate tensors exposed as outputs (skipped if impossible).

    A model holding its weights inline is handed to ONNX Runtime with them moved to a temporary external-data
    file, which it maps instead of copying: a session over an inline file holds the file's bytes, its parse
    and its tensors (1.4 GB for SmolLM2-135M's 543 MB), one over external data only what it touches."""
    model = onnx.load(path, load_external_data=False)
    if extra:
        produced = {o for n in model.graph.node for o in n.output}
        present = {o.name for o in model.graph.output}
        extra = [n for n in extra if n in produced and n not in present]
        for name in extra:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    external = any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in model.graph.initializer)
    inline = not external and any(t.HasField("raw_data") and t.ByteSize() > 1 << 20 for t in model.graph.initializer)
    if not extra and not inline:
        del model
        return make_session(path, accuracy_level, prepack=False, arena=False), []
    if not inline and not external:  # small and inline: handed over as bytes, nothing written anywhere
        data = model.SerializeToString()
        del model  # the proto and the session's copy of the weights are never alive together
        return make_session(data, accuracy_level, prepack=False, arena=False), extra
    if inline:
        folder = tempfile.mkdtemp(prefix="llmq-verify-")
        try:
            spill_inline(model, folder)
            light = onnx.ModelProto()
            light.CopyFrom(model)  # without the moved bytes, which stay in the parsed model's arena
            del model
            tmp = os.path.join(folder, "model.onnx")
            onnx.save(light, tmp)
            del light
            return make_session(tmp, accuracy_level, prepack=False, arena=False), extra
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # a mapped file lives on until the session closes
    folder = os.path.dirname(os.path.abspath(path))  # external data is found relative to the model's folder
    try:
        fd, tmp = tempfile.mkstemp(prefix=".llmq-verify-", suffix=".onnx", dir=folder)
        os.close(fd)
    except OSError:
        logger.warning("cannot write beside %s: block outputs are not compared", path)
        return make_session(path, accuracy_level, prepack=False, arena=False), []
    try:
        onnx.save(model, tmp)
        return make_session(tmp, accuracy_level, prepack=False, arena=False), extra
    finally:
        os.remove(tmp)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def verify_model(input_path: str, output_path: str, windows: np.ndarray, vocab_size: int | None,
                 blocks: dict, accuracy_level: int = 0, progress=None) -> dict:
    """Measure ``output_path`` against ``input_path`` on ``windows`` (int64 ``[n, seq]``), one window a run.

    The two models run one after the other, never both in memory: the input model's outputs on every window
    are kept on disk (a temporary folder) while the compiled model runs."""

    wanted = list(dict.fromkeys(blocks.values()))
    with tempfile.TemporaryDirectory(prefix="llmq-verify-") as scratch:
        ref, ref_extra = _session(input_path, wanted, 0)
        ref_outputs = [o.name for o in ref.get_outputs()]
        ref_inputs = session_specs(ref)
        names = list(dict.fromkeys(compared_outputs(ref_outputs) + [n for n in wanted if n in ref_extra]))
        for i, window in enumerate(progress(list(windows)) if progress else windows):
            for name, value in zip(names, ref.run(names, prompt_feeds(ref_inputs, window[None]))):
                np.save(os.path.join(scratch, f"{i}.{names.index(name)}.npy"), value)
            del value
        del ref
        release_memory()  # the input model's session goes back to the system before the compiled one loads
        out, out_extra = _session(output_path, wanted, accuracy_level)
        common = [n for n in wanted if n in ref_extra and n in out_extra]
        out_names = {o.name for o in out.get_outputs()}
        primary = [n for n in compared_outputs(ref_outputs) if n in out_names and n not in wanted]

        def reference(i: int) -> dict:
            return {n: np.load(os.path.join(scratch, f"{i}.{names.index(n)}.npy")) for n in primary + common}

        out_inputs = session_specs(out)

        def compiled(i: int) -> dict:
            return dict(zip(primary + common, out.run(primary + common, prompt_feeds(out_inputs, windows[i][None]))))

        return _compare(windows, reference, compiled, primary, common, vocab_size, blocks, accuracy_level)


def verify_by_parts(input_path: str, output_path: str, windows: np.ndarray, vocab_size: int | None, blocks: dict,
                    parts, opset: int, accuracy_level: int = 0, progress=None) -> dict | None:
    """:func:`verify_model` one part at a time (``parts``: the input graph's partition), so memory holds one
    block of either model, not a whole one (ONNX Runtime's CPU runs a float16 model with float32 copies of
    its weights: twice the model). Each model's parts run on every window in turn, their inputs saved on disk
    (:class:`~llmq.calib.blockwise.BlockwiseRunner`); the compiled model is cut at the same tensors. None if
    the compiled model lacks one of those boundaries (the caller then verifies whole)."""
    from .backends.onnxruntime import session_options
    from .calib.blockwise import BlockwiseRunner
    from .frontends.onnx_loader import load_graph

    wanted = set(blocks.values())
    with tempfile.TemporaryDirectory(prefix="llmq-verify-") as scratch:
        saved: dict = {}
        for role, path, level in (("ref", input_path, 0), ("out", output_path, accuracy_level)):
            graph = load_graph(path, opset)
            own = parts.within(graph.tensors())
            if own is None:
                return None
            outputs = compared_outputs([t.name for t in graph.gs.outputs])
            runner = BlockwiseRunner(graph, own, [w[None] for w in windows], os.path.join(scratch, role),
                                     options_factory=lambda level=level: session_options(level), frozen=True)
            os.makedirs(runner.workdir)
            names = saved.setdefault(role, [])
            try:
                indices = range(len(own.parts))
                for i in (progress(indices) if progress else indices):
                    mine = tuple(t for t in own.parts[i].outputs if t in wanted or t in outputs)
                    counter = iter(range(1 << 62))

                    def keep(name, value, mine=mine, counter=counter, names=names):
                        window = next(counter) // len(mine)
                        if name not in names:
                            names.append(name)
                        np.save(os.path.join(scratch, f"{role}.{window}.{names.index(name)}.npy"), value)

                    runner.advance(i, mine, keep)
            finally:
                runner.close()
                del graph, runner
        ref_names, out_names = saved["ref"], saved["out"]
        ref_outputs = [n for n in ref_names if n not in wanted]
        common = [n for n in ref_names if n in wanted and n in out_names]
        primary = [n for n in ref_outputs if n in out_names]

        def load(role, names, i, which):
            return {n: np.load(os.path.join(scratch, f"{role}.{i}.{names.index(n)}.npy")) for n in which}

        return _compare(windows, lambda i: load("ref", ref_names, i, primary + common),
                        lambda i: load("out", out_names, i, primary + common), primary, common, vocab_size, blocks,
                        accuracy_level)


ROWS = 64  # output rows (tokens) compared at a time


def _compare(windows, reference, compiled, primary: list, common: list, vocab_size, blocks: dict,
             accuracy_level: int) -> dict:
    """Measure the compiled model's outputs on each window (``compiled(i)``) against ``reference(i)``, the
    input's."""
    sums: dict = {}

    def add(key, value, weight=1.0):
        s = sums.setdefault(key, [0.0, 0.0])
        s[0] += value * weight
        s[1] += weight

    for i in range(len(windows)):
        y_ref = reference(i)
        y_out = compiled(i)
        for name in primary:
            a, b = y_ref[name], y_out[name]
            lm = _is_lm(name, a, vocab_size)
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            for start in range(0, len(a), ROWS):  # a few rows at a time: a vocabulary-wide row is 0.2–0.5 MB
                a2, b2 = a[start:start + ROWS].astype(np.float32), b[start:start + ROWS].astype(np.float32)
                if lm:
                    la, lb = _log_softmax(a2), _log_softmax(b2)
                    kl = (np.exp(la) * (la - lb)).sum(axis=-1, dtype=np.float64)
                    add((name, "kl"), float(kl.mean()), kl.size)
                    add((name, "top1"), float((la.argmax(-1) == lb.argmax(-1)).mean()), kl.size)
                add((name, "err2"), float(np.square(a2 - b2).sum(dtype=np.float64)))
                add((name, "ref2"), float(np.square(a2).sum(dtype=np.float64)))
                norms = np.sqrt(np.square(a2).sum(-1, dtype=np.float64) * np.square(b2).sum(-1, dtype=np.float64))
                cos = (a2 * b2).sum(-1, dtype=np.float64) / np.maximum(norms, 1e-30)
                add((name, "cos"), float(cos.mean()), len(cos))
        for tensor in common:
            a, b = y_ref[tensor].astype(np.float32), y_out[tensor].astype(np.float32)
            add((tensor, "err2"), float(np.square(a - b).sum(dtype=np.float64)))
            add((tensor, "ref2"), float(np.square(a).sum(dtype=np.float64)))
    outputs = {}
    for name in primary:
        entry = {"rel_error": _ratio(sums, name), "cosine": sums[(name, "cos")][0] / sums[(name, "cos")][1]}
        if (name, "kl") in sums:
            entry["kl"] = sums[(name, "kl")][0] / sums[(name, "kl")][1]
            entry["top1_agreement"] = sums[(name, "top1")][0] / sums[(name, "top1")][1]
        outputs[name] = {k: _sig(v) for k, v in entry.items()}
    block_rows = [{"block": label, "tensor": tensor, "rel_error": _sig(_ratio(sums, tensor))}
                  for label, tensor in sorted(blocks.items(), key=lambda kv: int(kv[0].split(".")[1]))
                  if tensor in common]
    return {"windows": int(len(windows)), "seq_len": int(windows.shape[1]), "outputs": outputs, "blocks": block_rows,
            "accuracy_level": accuracy_level}


def _sig(value: float) -> float:
    """``value`` to 6 significant digits (a KL of 3e-9 stays 3e-9, not 0)."""
    return float(f"{value:.6g}")


def _ratio(sums: dict, name: str) -> float:
    err, ref = sums[(name, "err2")][0], sums[(name, "ref2")][0]
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


def _is_lm(name: str, value: np.ndarray, vocab_size: int | None) -> bool:
    return value.ndim >= 2 and (name == "logits" or (vocab_size is not None and value.shape[-1] == vocab_size))


def check_bound(result: dict, bound: Bound) -> list:
    """What in ``result`` exceeds ``bound``: a list of one-line problems (empty: within the bound)."""
    problems = []
    for name, m in result["outputs"].items():
        if "kl" in m and bound.max_kl is not None and not m["kl"] <= bound.max_kl:
            problems.append(f"{name}: KL {m['kl']:.4g} nats/token > {bound.max_kl:g} "
                            f"(top-1 agreement {100 * m['top1_agreement']:.1f} %)")
        elif "kl" not in m and bound.max_rel_error is not None and not m["rel_error"] <= bound.max_rel_error:
            problems.append(f"{name}: relative error {m['rel_error']:.4g} > {bound.max_rel_error:g} "
                            f"(cosine {m['cosine']:.4f})")
    return problems

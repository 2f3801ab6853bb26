"""torch frontend: capture a model with torch.export and write ONNX through the dynamo exporter.

Sources: a local Hugging Face model folder (``config.json`` + weights), a ``.gguf`` file (dequantized to
fp32 by transformers), or — from Python — any ``nn.Module`` with example inputs. The causal-LM export
takes ``input_ids [batch, seq]`` and returns ``logits [batch, seq, vocab]`` with both axes dynamic; the
tokenizer is written beside the model as ``<model>.tokenizer/`` so later steps find it. The file is
written to a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import warnings

from ..ir.errors import LlmqError

__all__ = ["DTYPES", "calib_path_for", "checkpoint_dtype", "export_hf", "export_module", "load_hf", "self_calibration",
           "tokenizer_dir_for"]

logger = logging.getLogger(__name__)

LARGE = 1800 << 20  # parameters above this many bytes go to external data


def tokenizer_dir_for(model_path: str) -> str:
    stem = os.path.splitext(os.path.abspath(model_path))[0]
    return stem + ".tokenizer"


def calib_path_for(model_path: str) -> str:
    """Where ``llmq-export --self-calib`` writes the model's own calibration tokens (``llmq-compile`` looks there)."""
    return os.path.splitext(os.path.abspath(model_path))[0] + ".calib.npz"


CHUNK = 16  # windows per batch; part of the semantics (RNG draw order and matmul shapes), keep it at 16


def _preallocated_cache(model, batch: int, capacity: int):
    """A transformers cache whose full-attention layers write into preallocated ``[batch, heads, capacity, dim]``
    buffers and hand attention a ``[:, :, :t]`` view; other layer kinds (sliding window, linear attention …)
    are left as transformers builds them. ``None`` (let the model make its own ``DynamicCache``) when this
    transformers has no layered cache API."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None

    class PreallocatedLayer(DynamicLayer):
        _layer_type = None  # never register this class in transformers' layer-type mappings

        def __init__(self):
            super().__init__()
            self._length = 0

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            b, h, _, dk = key_states.shape
            self._k = key_states.new_empty((b, h, capacity, dk))
            self._v = value_states.new_empty((b, value_states.shape[1], capacity, value_states.shape[-1]))
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self._length, self._length + key_states.shape[-2]
            if end > capacity or key_states.shape[0] != self._k.shape[0]:
                raise RuntimeError("preallocated KV cache overflow")  # cannot happen in self_calibration
            self._k[:, :, start:end].copy_(key_states)
            self._v[:, :, start:end].copy_(value_states)
            self._length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return None
    if not getattr(cache, "layers", None):
        return None
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def self_calibration(model, samples: int, seq_len: int, seed: int = 0, progress=None, threads: int | None = 1):
    """``[samples, seq_len]`` token ids sampled from ``model`` itself (data-free calibration, as LLM-QAT does):
    each window starts from a uniformly random token and continues by plain sampling (temperature 1, no
    top-k/top-p, on past any end-of-text token), so the windows follow the model's own distribution of text.
    Deterministic for a given seed (torch CPU). ``progress``, if given, wraps an iterable (like ``tqdm``); it
    gets one item per generated token position of every 16-window chunk. ``threads``: torch intra-op threads
    while sampling (restored afterwards); 1 by default, because at batch 16 the matmuls are too small for
    OpenMP to pay off and on a busy machine 2 threads ran 5-6x slower than 1 (measured); ``None`` keeps
    the current setting."""
    import numpy as np
    import torch

    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(seed)
    firsts = torch.randint(0, vocab, (samples, 1), generator=gen)
    if samples <= 0:
        return np.zeros((0, seq_len), dtype="int64")
    if seq_len <= 1:
        return firsts[:, :seq_len].numpy().astype("int64")

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers ≥ 5.x renamed it
    steps = seq_len - 1
    chunks = list(range(0, samples, CHUNK))
    positions = torch.arange(seq_len)
    out = torch.empty((samples, seq_len), dtype=torch.long)
    out[:, :1] = firsts
    ticks = range(len(chunks) * steps)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _sample(model, out, chunks, steps, positions, cache_kw, gen, progress(ticks) if progress else ticks)
    finally:
        torch.set_num_threads(previous_threads)
    return out.numpy().astype("int64")


def _sample(model, out, chunks, steps, positions, cache_kw, gen, ticks):
    import torch

    seq_len = steps + 1
    with torch.inference_mode():
        for tick in ticks:
            chunk, step = divmod(tick, steps)
            if step == 0:
                start = chunks[chunk]
                rows = out[start:start + CHUNK]
                ids = rows[:, :1]
                cache = _preallocated_cache(model, rows.shape[0], seq_len)
            pos = positions[step:step + 1].expand(ids.shape[0], -1)
            result = model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kw: cache})
            if cache is None:  # no layered-cache API: keep whatever the model returned (old behaviour)
                cache = getattr(result, "cache", None) or result.past_key_values
            probs = torch.softmax(result.logits[:, -1].double(), dim=-1)
            ids = torch.multinomial(probs, 1, generator=gen)
            rows[:, step + 1:step + 2] = ids


DTYPES = ("float32", "float16", "bfloat16")


def checkpoint_dtype(source: str) -> str:
    """The float type a HF folder's config says its weights are in (``torch_dtype`` / ``dtype``); float32 for a
    .gguf file (transformers dequantizes GGUF tensors to float32) or a config that says nothing."""
    if os.path.isdir(source):
        try:
            with open(os.path.join(source, "config.json"), encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, ValueError):
            return "float32"
        found = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
        return found if found in DTYPES else "float32"
    return "float32"


def load_hf(source: str, dtype: str | None = None):
    """(model, tokenizer or None) from a HF folder or a .gguf file in eval mode, no hub access. ``dtype``: one of
    :data:`DTYPES` (default: the checkpoint's own, see :func:`checkpoint_dtype`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(source):
        raise LlmqError(f"model not found: {source}", "give a local HF model folder or a .gguf file")
    dtype = dtype or checkpoint_dtype(source)
    if dtype not in DTYPES:
        raise LlmqError(f"unknown dtype '{dtype}'", f"choose one of {', '.join(DTYPES)}")
    kwargs = {"dtype": getattr(torch, dtype)}
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise LlmqError(f"{source} is neither a HF model folder nor a .gguf file",
                            "for an ONNX file use llmq-compile directly")
        folder, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    else:
        folder = source
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise LlmqError(f"{source} has no config.json: not a Hugging Face model folder",
                            "give the folder that holds config.json and the weights")
    if "gguf_file" not in kwargs:
        from transformers import AutoConfig

        try:
            refuse_unsupported(AutoConfig.from_pretrained(folder), source)
        except LlmqError:
            raise
        except Exception as exc:
            raise LlmqError(f"cannot read {os.path.join(source, 'config.json')}: {_first_line(exc)}",
                            "check that the folder holds a valid Hugging Face config") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise LlmqError(f"cannot load the model from {source}: {type(exc).__name__}: {_first_line(exc)}",
                        "check that the folder or file is complete") from exc
    if "gguf_file" in kwargs:  # a folder's config was checked before its weights were read
        refuse_unsupported(model.config, source)
    tokenizer = None
    if "gguf_file" not in kwargs and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        # transformers would synthesize a tokenizer of a token or two from the config alone
        logger.warning("no tokenizer files in %s: none is written beside the export; pass --tokenizer (or token "
                       "ids as --calib-data .npz) to later steps", folder)
        return model, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    except Exception as exc:  # a model without a tokenizer can still be exported
        logger.warning("no tokenizer found with the model (%s); pass --tokenizer to later steps", type(exc).__name__)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if tokenizer is not None and len(tokenizer) < min(vocab, 16):  # a stand-in built from a bare config
        logger.warning("the tokenizer found with the model has %d token(s) for a vocabulary of %d: not written; "
                       "pass --tokenizer to later steps", len(tokenizer), vocab)
        tokenizer = None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer_config.json")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _export_streamed(source: str, output: str, opset: int, dtype: str | None) -> dict:
    """:func:`export_hf` through :func:`llmq.frontends.stream_export.stream_export`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .stream_export import stream_export

    dtype = dtype or checkpoint_dtype(source)
    if dtype not in DTYPES:
        raise LlmqError(f"unknown dtype '{dtype}'", f"choose one of {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise LlmqError(f"cannot read {os.path.join(source, 'config.json')}: {_first_line(exc)}",
                        "check that the folder holds a valid Hugging Face config") from exc
    refuse_unsupported(config, source)
    try:
        with warnings.catch_warnings(), _captured_output() as captured:
            warnings.simplefilter("ignore")
            try:
                info = stream_export(source, output, getattr(torch, dtype), opset)
            except Exception:
                logger.debug("the exporter printed:\n%s", captured())
                raise
    except LlmqError:
        raise
    except Exception as exc:
        raise LlmqError(f"streamed export failed: {type(exc).__name__}: {_first_line(exc)}",
                        "rerun with --debug for the exporter's trace") from exc
    tok_dir = None
    if any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            tok_dir = tokenizer_dir_for(output)
            shutil.rmtree(tok_dir, ignore_errors=True)
            tokenizer.save_pretrained(tok_dir)
        except Exception as exc:  # a model without a tokenizer can still be exported
            logger.warning("no tokenizer written beside the export (%s); pass --tokenizer to later steps",
                           type(exc).__name__)
    return {"model": output, "tokenizer": tok_dir, "vocab_size": int(config.vocab_size), "calib": None,
            "dtype": dtype, "streamed": True, "peak_rss_mb": info.get("peak_rss_mb")}


def refuse_unsupported(config, source: str) -> None:
    """One clear line for checkpoints llmq cannot export faithfully yet (mixture-of-experts)."""
    experts = next((getattr(config, k) for k in MOE_KEYS if isinstance(getattr(config, k, None), int)), 0)
    if experts and experts > 1:
        raise LlmqError(f"{source} is a mixture-of-experts model ({type(config).__name__}, {experts} experts), which "
                        "llmq does not export or quantize yet", "use a dense model; MoE support is planned")


def _logits_only(model):
    """The causal LM wrapped so the export takes ``input_ids`` and returns ``logits`` only."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    return LogitsOnly(model)


def _with_kv_cache(model):
    """The causal LM as a KV-cache decoder over flat tensors: ``(input_ids, position_ids, past k/v per layer)
    → (logits, present k/v per layer)``; an empty past (length 0) is the prefill step."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class KVDecoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVDecoder(model)


def _kv_geometry(model) -> tuple:
    """(layers, kv heads, head dim) from the model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def divide_by_rms(graph) -> int:
    """Rewrite ``x · Reciprocal(Sqrt(v))`` as ``x / Sqrt(v)`` in an ONNX graph (in place); returns how many.
    That is the RMSNorm form ONNX Runtime fuses into one ``SimplifiedLayerNormalization`` (its fusion matches
    Pow → ReduceMean → Add → Sqrt → Div → Mul, and torch's ``rsqrt`` exports as Sqrt → Reciprocal → Mul):
    seven nodes become one per norm. The same value up to one rounding."""
    nodes = list(graph.node)
    producers = {o: i for i, n in enumerate(nodes) for o in n.output}
    uses = collections.Counter(i for n in nodes for i in n.input)
    uses.update(o.name for o in graph.output)
    dead = set()
    for node in nodes:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for j, name in enumerate(node.input):
            r = producers.get(name)
            if r is None or nodes[r].op_type != "Reciprocal" or uses[name] != 1:
                continue
            s = producers.get(nodes[r].input[0])
            if s is None or nodes[s].op_type != "Sqrt":
                continue
            x = node.input[1 - j]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([x, nodes[r].input[0]])
            dead.add(r)
            break
    if dead:
        keep = [n for i, n in enumerate(nodes) if i not in dead]
        del graph.node[:]
        graph.node.extend(keep)
    return len(dead)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    lines = [ln.strip() for ln in ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


@contextlib.contextmanager
def _captured_output():
    """Send what the exporter prints on stdout/stderr (file descriptors 1 and 2: FX graph dumps, C++
    warnings) to a temporary file; yields a function returning it. Progress stays ours to print."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.flush(), sink.seek(0), sink.read().decode("utf-8", "replace"))[-1]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def export_module(module, example_inputs: tuple, output: str, input_names: list, output_names: list,
                  dynamic_shapes=None, opset: int = 21, metadata: dict | None = None) -> str:
    """Export any ``nn.Module`` to ``output`` (dynamo exporter); returns the path written."""
    import onnx
    import torch

    module.eval()
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".llmq-export-", dir=out_dir)
    try:
        with warnings.catch_warnings(), _captured_output() as captured:
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(module, example_inputs, dynamo=True, opset_version=opset,
                                            input_names=input_names, output_names=output_names,
                                            dynamic_shapes=dynamic_shapes, verbose=False, report=False)
            except Exception:
                logger.debug("the exporter printed:\n%s", captured())
                raise
        model = program.model_proto if params < LARGE else None
        name = os.path.basename(output)
        if model is not None:
            divide_by_rms(model.graph)
            for key, value in sorted((metadata or {}).items()):
                model.metadata_props.add(key=key, value=str(value))
            onnx.save_model(model, os.path.join(tmp, name))
        else:
            program.save(os.path.join(tmp, name), external_data=True)
            model = onnx.load(os.path.join(tmp, name), load_external_data=False)
            divide_by_rms(model.graph)
            for key, value in sorted((metadata or {}).items()):
                model.metadata_props.add(key=key, value=str(value))
            onnx.save_model(model, os.path.join(tmp, name))
        for entry in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, entry), os.path.join(out_dir, entry if entry != name else os.path.basename(output)))
    except LlmqError:
        raise
    except Exception as exc:
        raise LlmqError(f"torch export failed: {type(exc).__name__}: {_first_line(exc)}",
                        "rerun with --debug for the exporter's trace") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


STREAM_OVER = 1 << 30  # checkpoints above this many bytes export streamed (see frontends/stream_export.py)


def export_hf(source: str, output: str, opset: int = 21, kv_cache: bool = False, self_calib: int = 0,
              calib_seq_len: int = 512, progress=None, dtype: str | None = None, stream: bool | None = None) -> dict:
    """Export a HF folder or .gguf file to ``output``; returns {model, tokenizer, vocab_size, calib}.

    ``self_calib``: also sample that many windows of ``calib_seq_len`` tokens from the model itself and write
    them beside the output as ``<name>.calib.npz`` (``llmq-compile`` calibrates on them when no
    ``--calib-data`` is given).

    ``kv_cache``: a decoder with ``position_ids`` and ``past_key_values.{i}.{key,value}`` inputs
    (``[batch, kv_heads, past, head_dim]``) and ``present.{i}.{key,value}`` outputs, for generation; the
    attention is causal over past + new tokens (batch rows without padding: no attention-mask input).

    ``stream``: export with the weights streamed from the checkpoint into external data, never loaded (a
    safetensors folder, logits-only graph, no self-calibration); default: when the checkpoint is over
    :data:`STREAM_OVER` bytes."""
    import torch

    from .stream_export import checkpoint_bytes, streamable

    if stream is None:
        stream = streamable(source) and checkpoint_bytes(source) > STREAM_OVER and not kv_cache and not self_calib
    if stream:
        if not streamable(source) or kv_cache or self_calib:
            raise LlmqError("a streamed export takes a safetensors HF folder, without --kv-cache or --self-calib",
                            "export without streaming, or drop those options")
        return _export_streamed(source, output, opset, dtype)
    model, tokenizer = load_hf(source, dtype)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    example = torch.randint(0, min(vocab, 1000), (2, 16), generator=torch.Generator().manual_seed(0))
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=1 << 16)}}
    meta = {"llmq.source": os.path.basename(os.path.normpath(source)), "llmq.vocab_size": vocab,
            "llmq.architecture": type(model).__name__, "llmq.dtype": str(model.dtype).replace("torch.", "")}
    with torch.no_grad():
        if not kv_cache:
            export_module(_logits_only(model), (example,), output, ["input_ids"], ["logits"], dims, opset, meta)
        else:
            layers, kv_heads, head_dim = _kv_geometry(model)
            batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=1 << 16)
            past_len = torch.export.Dim("past", max=1 << 16)  # exported with a past of 5; runs with an empty one too
            past = tuple(torch.randn(2, kv_heads, 5, head_dim, generator=torch.Generator().manual_seed(i)).to(model.dtype)
                         for i in range(2 * layers))
            names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
            outs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
            positions = torch.arange(5, 5 + example.shape[1]).expand(example.shape[0], -1)
            shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
            meta["llmq.kv_cache"] = f"{layers} layers, {kv_heads} kv heads, head dim {head_dim}"
            export_module(_with_kv_cache(model), (example, positions, *past), output,
                          ["input_ids", "position_ids"] + names, outs, shapes, opset, meta)
    tok_dir = None
    if tokenizer is not None:
        tok_dir = tokenizer_dir_for(output)
        shutil.rmtree(tok_dir, ignore_errors=True)
        tokenizer.save_pretrained(tok_dir)
    calib = None
    if self_calib > 0:
        import numpy as np

        ids = self_calibration(model, self_calib, calib_seq_len, progress=progress)
        calib = calib_path_for(output)
        tmp = calib + ".tmp.npz"
        np.savez(tmp, input_ids=ids)
        os.replace(tmp, calib)
    return {"model": output, "tokenizer": tok_dir, "vocab_size": vocab, "calib": calib, "dtype": meta["llmq.dtype"]}

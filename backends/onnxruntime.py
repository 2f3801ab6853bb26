"""ONNX Runtime backend: the portable Q/DQ graph, checked by building a session.

ONNX Runtime fuses ``DQ → MatMul ← DQ(Q(x))`` into integer kernels (``MatMulIntegerToFloat``,
``QLinearMatMul``, ``MatMulNBits`` for 4-bit). ``session.qdq_matmulnbits_accuracy_level`` is always set
explicitly (its default, 4, silently computes 4-bit layers with int8 activations); the level used is
reported. :func:`fused_ops` saves the optimized graph of a session and counts what it was fused into.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile

import onnx

from ..ir.precision import cpu_session, quant_precision_entries
from ..ir.storage import session_threads

__all__ = ["make_session", "session_options", "fused_ops", "check_with_onnxruntime"]

logger = logging.getLogger(__name__)

DEFAULT_ACCURACY_LEVEL = 0


def _options(accuracy_level: int, optimized_path: str | None = None, threads: int | None = None,
             optimize: bool = True, spinning: bool = True, prepack: bool = True, arena: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    for entry in quant_precision_entries():  # exact INT8 GEMMs on x86 CPUs without VNNI (ir.precision)
        opts.add_session_config_entry(*entry)
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    threads = threads or session_threads()
    if threads:
        opts.intra_op_num_threads = threads
    if not arena:  # activations freed after each run instead of kept for the next (a one-off check)
        opts.enable_cpu_mem_arena = False
    if not prepack:  # ONNX Runtime's packed copies of the weights: worth their memory only for long runs
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:  # idle worker threads sleep instead of spinning (several live sessions do not steal cores)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session_options(accuracy_level: int = DEFAULT_ACCURACY_LEVEL, threads: int | None = None):
    """The session options every llmq CPU session uses (accuracy level always explicit)."""
    return _options(accuracy_level, threads=threads)


def make_session(model_path: str, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, threads: int | None = None,
                 optimize: bool = True, spinning: bool = True, prepack: bool = True, arena: bool = True):
    """A CPU session (``model_path``: a path or serialized bytes); a bfloat16 model runs through the documented
    float32 up-cast of :mod:`llmq.ir.precision` (``session.llmq_upcast`` tells)."""
    return cpu_session(model_path, _options(accuracy_level, threads=threads, optimize=optimize, spinning=spinning,
                                            prepack=prepack, arena=arena))


def _optimized_options(accuracy_level: int, folder: str):
    opts = _options(accuracy_level, optimized_path=os.path.join(folder, "optimized.onnx"))
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return opts


def _counts(folder: str) -> collections.Counter:
    model = onnx.load(os.path.join(folder, "optimized.onnx"), load_external_data=False)
    return collections.Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in model.graph.node)


def fused_ops(model_path: str, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, pieces=None) -> dict:
    """Op counts of the graph ONNX Runtime actually runs after its optimizations. ``pieces``: ``[(name,
    open)]``, the model as parts that together hold each of its nodes once (``open(options)`` makes a
    session over one): the counts are summed over a session per piece instead of taken from one session
    over the whole model, which holds all of it (at 8B its INT4 weights, float32 copies of a float16 head and
    embedding, and an optimized copy written to disk)."""
    import onnxruntime as ort

    counts: collections.Counter = collections.Counter()
    if pieces is None:
        with tempfile.TemporaryDirectory() as tmp:
            ort.InferenceSession(model_path, _optimized_options(accuracy_level, tmp), providers=["CPUExecutionProvider"])
            counts = _counts(tmp)
        return dict(sorted(counts.items()))
    for name, open_piece in pieces:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                session = open_piece(_optimized_options(accuracy_level, tmp))  # (the opener disables prepacking)
            except Exception as exc:
                raise RuntimeError(f"{name}: {exc}") from exc
            del session
            counts.update(_counts(tmp))
    return dict(sorted(counts.items()))


def check_with_onnxruntime(model_path: str, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, pieces=None) -> dict:
    """Build a session (raises on a graph ONNX Runtime refuses) and report the fused graph; ``pieces``: one
    session per part of the model (see :func:`fused_ops`)."""
    ops = fused_ops(model_path, accuracy_level, pieces)
    interesting = {k: v for k, v in ops.items() if any(s in k for s in ("MatMul", "Quantize", "Gemm", "NBits", "QLinear"))}
    out = {"accuracy_level": accuracy_level, "fused_ops": interesting}
    if pieces is not None:
        out["checked_by_parts"] = len(pieces)
    return out

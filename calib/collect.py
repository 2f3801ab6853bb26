"""Collect activation statistics by running the float graph in ONNX Runtime.

The requested intermediate tensors are exposed as extra graph outputs of a copy of the model; each
calibration batch is run and reduced into :class:`~llmq.calib.observers.TensorStats` at once, so memory
holds one batch of activations, never all of them.
"""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

from ..ir.feeds import input_specs, prompt_feeds
from ..ir.graph import Graph
from ..ir.passes import TWO_GB, save_model
from .observers import TensorStats

__all__ = ["collect_stats", "run_with_outputs", "session_for"]

logger = logging.getLogger(__name__)


def _session(model: onnx.ModelProto, tmpdir: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    try:
        size_ok = model.ByteSize() < TWO_GB - (64 << 20)
    except Exception:
        size_ok = False
    if size_ok:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    path = os.path.join(tmpdir, "calib.onnx")
    save_model(model, path, external=True)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def session_for(model: onnx.ModelProto):
    """An ONNX Runtime CPU session for an in-memory model of any size."""
    with tempfile.TemporaryDirectory() as tmpdir:
        return _session(model, tmpdir)  # external data, if any, is read while the session is built


def _expose(graph: Graph, names: list) -> onnx.ModelProto:
    model = graph.to_model()
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def run_with_outputs(graph: Graph, names: list, batches, each, progress=None) -> None:
    """Run every batch with ``names`` exposed; call ``each(name, array)`` per tensor per batch."""
    model = _expose(graph, names)
    inputs = input_specs(graph.gs.inputs)
    with tempfile.TemporaryDirectory() as tmpdir:
        session = _session(model, tmpdir)
        del model
        iterator = progress(batches) if progress else batches
        for batch in iterator:
            outputs = session.run(names, prompt_feeds(inputs, batch))
            for name, value in zip(names, outputs):
                each(name, value)


def collect_stats(graph: Graph, names: list, batches, progress=None) -> dict:
    """``{name: TensorStats}`` over all ``batches`` (each an int64 ``[b, seq]`` array)."""
    stats = {name: TensorStats() for name in names}
    run_with_outputs(graph, names, batches, lambda n, v: stats[n].update(v), progress)
    return stats

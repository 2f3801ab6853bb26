"""Collect activation statistics by running the float graph in ONNX Runtime.

The requested intermediate tensors are exposed as extra graph outputs of a copy of the model; each
calibration batch is run and reduced into :class:`~llmq.calib.observers.TensorStats` at once, so memory
holds one batch of activations, never all of them.
"""

from __future__ import annotations

import logging

from ..ir.feeds import input_specs, prompt_feeds
from ..ir.graph import Graph
from ..ir.storage import graph_session
from .observers import TensorStats

__all__ = ["collect_stats", "run_with_outputs"]

logger = logging.getLogger(__name__)


def run_with_outputs(graph: Graph, names: list, batches, each, progress=None) -> None:
    """Run every batch with ``names`` exposed; call ``each(name, array)`` per tensor per batch. The session
    reads the graph's weights where they are (no serialized copy; see :func:`llmq.ir.storage.graph_session`)."""
    session = graph_session(graph, names)
    inputs = input_specs(graph.gs.inputs)
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

"""Calibration one part at a time: the calibration batches are propagated through the graph's parts (see
:mod:`llmq.ir.partition`), each part in an ONNX Runtime session of its own, its inputs read from disk.

The prefix runs once per batch and saves ``h_-1`` and the side inputs (rotary tables, masks); each block then
reads its saved inputs, and :meth:`BlockwiseRunner.advance` saves the outputs later parts read and deletes
what no later part needs. Memory holds one part's weights (memory-mapped or in the graph) and one batch of
its activations; the activations of every batch of one boundary live on disk (``workdir``).

Statistics requested of a part are computed from exactly the inputs the whole graph would give it, so they
equal the whole-graph collection up to float summation order (tested on tiny Llama and GPT-2 graphs).
Whether a block sees its predecessors' float or already-quantized outputs is the caller's choice: it
advances a part after quantizing it (GPTQ's reference order) or before.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import onnx

from ..ir.feeds import input_specs, prompt_feeds
from ..ir.graph import Graph
from ..ir.partition import Part, Partition
from ..ir.storage import graph_arrays_session
from .observers import TensorStats

__all__ = ["BlockwiseRunner", "part_model"]

logger = logging.getLogger(__name__)


def part_model(model: onnx.ModelProto, part: Part, outputs: list, graph_inputs: dict) -> onnx.ModelProto:
    """The model of ``part`` cut from ``model`` (a weightless export of the whole graph): its nodes, the
    initializers they read, its inputs typed from the whole model's value infos, and ``outputs``."""
    wanted = set(part.nodes)
    nodes = [n for n in model.graph.node if n.name in wanted]
    used = {i for n in nodes for i in n.input} | set(outputs)
    inits = [i for i in model.graph.initializer if i.name in used]
    init_names = {i.name for i in inits}
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inputs = []
    for name in part.inputs or tuple(graph_inputs):
        if name in init_names or name not in used:
            continue
        info = infos.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            raise ValueError(f"part {part.name}: the type of its input {name} is unknown (shape inference)")
        inputs.append(info)
    graph = onnx.helper.make_graph(nodes, part.name.replace(".", "_"), inputs,
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in outputs], inits)
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


class BlockwiseRunner:
    """Calibration batches through the parts of a partitioned graph, one part at a time (see the module)."""

    def __init__(self, graph: Graph, parts: Partition, batches: list, workdir: str | None = None, progress=None):
        self.graph, self.parts, self.batches = graph, parts, list(batches)
        self.progress = progress
        self._own = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="llmq-blocks-")
        self._saved: dict = {}  # tensor name -> index of the part that made it
        self._last_reader = parts.saved()
        self._graph_inputs = {name: shape for name, shape, _ in input_specs(graph.gs.inputs)}
        self.bytes_written = 0
        self.done = -1  # index of the last part advanced

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- storage ----
    def _path(self, tensor: str, batch: int) -> str:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tensor)
        return os.path.join(self.workdir, f"{safe}.{batch}.npy")

    def _feeds(self, part: Part, batch: int) -> dict:
        feeds = prompt_feeds(input_specs(self.graph.gs.inputs), self.batches[batch])
        out = {}
        for name in part.inputs or tuple(feeds):
            if name in self._saved:
                out[name] = np.load(self._path(name, batch))
            elif name in feeds:
                out[name] = feeds[name]
            else:
                raise ValueError(f"part {part.name} reads {name}, which no earlier part saved")
        return out

    # ---- running ----
    def session(self, part: Part, extra: list = ()):
        """A session running ``part`` of the graph as it stands now, with ``extra`` tensors exposed."""
        outputs = list(dict.fromkeys(list(part.outputs) + list(extra)))
        return graph_arrays_session(self.graph, lambda model: part_model(model, part, outputs, self._graph_inputs)), outputs

    def run(self, index: int, names: list, each) -> None:
        """Run part ``index`` on every batch; ``each(name, array)`` per requested tensor per batch."""
        part = self.parts.parts[index]
        session, outputs = self.session(part, names)
        batches = range(len(self.batches))
        for b in (self.progress(batches, part.name) if self.progress else batches):
            values = dict(zip(outputs, session.run(outputs, self._feeds(part, b))))
            for name in names:
                each(name, values[name])

    def stats(self, index: int, names: list) -> dict:
        """``{name: TensorStats}`` of tensors computed in part ``index``, over every batch."""
        stats = {name: TensorStats() for name in names}
        self.run(index, names, lambda n, v: stats[n].update(v))
        return stats

    def advance(self, index: int) -> None:
        """Run part ``index`` (as the graph stands: float or already quantized) and save what later parts
        read; delete saved tensors no later part reads."""
        if index != self.done + 1:
            raise ValueError(f"parts advance in order: {self.done + 1} next, not {index}")
        part = self.parts.parts[index]
        keep = [o for o in part.outputs if self._last_reader.get(o, -1) > index]

        def save(name, value, counter=iter(range(1 << 62))):
            b = next(counter) // max(len(keep), 1)
            path = self._path(name, b)
            np.save(path, value)
            self.bytes_written += os.path.getsize(path)

        if keep:
            self.run(index, keep, save)
        for name in keep:
            self._saved[name] = index
        for name, last in list(self._last_reader.items()):
            if last <= index and name in self._saved:
                for b in range(len(self.batches)):
                    try:
                        os.remove(self._path(name, b))
                    except FileNotFoundError:
                        pass
                del self._saved[name]
        self.done = index

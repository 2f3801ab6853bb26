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

__all__ = ["BlockwiseRunner", "PartSweep", "part_model"]

logger = logging.getLogger(__name__)


def part_model(model: onnx.ModelProto, part: Part, outputs: list, graph_inputs: dict) -> onnx.ModelProto:
    """The model of ``part`` cut from ``model`` (a weightless export of the whole graph): the nodes on the way
    back from ``outputs`` to the part's inputs (so nodes a pass added since the partition are in), the
    initializers they read, its inputs typed from the whole model's value infos, and ``outputs``."""
    stop = set(part.inputs or graph_inputs)
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    inner = {sub_input for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
             for sub_input in _subgraph_reads(a.g)}
    picked, stack = set(), [o for o in outputs if o not in stop]
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in picked:
            continue
        picked.add(index)
        node = model.graph.node[index]
        reads = list(node.input) + ([t for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
                                     for t in _subgraph_reads(a.g)] if inner else [])
        stack.extend(t for t in reads if t and t not in stop)
    nodes = [n for i, n in enumerate(model.graph.node) if i in picked]
    used = {i for n in nodes for i in n.input} | set(outputs)
    if inner:
        used |= {t for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for t in _subgraph_reads(a.g)}
    inits = [i for i in model.graph.initializer if i.name in used]
    init_names = {i.name for i in inits}
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inputs = []
    reached = [g for g in graph_inputs if g in used and g not in set(part.inputs)] if part.inputs else []
    for name in tuple(part.inputs or graph_inputs) + tuple(reached):
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


def _subgraph_reads(g: onnx.GraphProto) -> set:
    """The outer-scope tensors a subgraph (an If/Loop body) reads."""
    made = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    reads = {i for n in g.node for i in n.input if i and i not in made}
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                reads |= _subgraph_reads(a.g) - made
    return reads


class BlockwiseRunner:
    """Calibration batches through the parts of a partitioned graph, one part at a time (see the module)."""

    def __init__(self, graph: Graph, parts: Partition, batches: list, workdir: str | None = None, progress=None,
                 options_factory=None):
        self.graph, self.parts, self.batches = graph, parts, list(batches)
        self.progress = progress
        self.options_factory = options_factory  # () -> onnxruntime.SessionOptions for each part's session
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
        out = dict(feeds)  # the graph's inputs, for a part that reads one directly
        for name in part.inputs:
            if name in self._saved:
                out[name] = np.load(self._path(name, batch))
            elif name not in feeds:
                raise ValueError(f"part {part.name} reads {name}, which no earlier part saved")
        return out

    # ---- running ----
    def session(self, part: Part, outputs: list):
        """A session running ``part`` of the graph as it stands now, up to ``outputs`` only (the part's own
        outputs when asked: a sample of the LM head's input does not run the LM head)."""
        outputs = list(dict.fromkeys(outputs))
        options = self.options_factory() if self.options_factory else None
        return graph_arrays_session(self.graph, lambda model: part_model(model, part, outputs, self._graph_inputs),
                                    options), outputs

    def run(self, index: int, names: list, each, batches=None) -> None:
        """Run part ``index`` on every batch (or those in ``batches``); ``each(name, array)`` per requested
        tensor per batch. A requested tensor the part reads as an input is given as it was fed."""
        part = self.parts.parts[index]
        inputs = set(part.inputs)
        computed = [n for n in names if n not in inputs]
        session, outputs = self.session(part, computed) if computed else (None, [])
        batches = range(len(self.batches)) if batches is None else batches
        wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        for b in (self.progress(batches, part.name) if self.progress and len(batches) > 1 else batches):
            feeds = self._feeds(part, b)
            values = (dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in wanted})))
                      if session is not None else {})
            for name in names:
                each(name, feeds[name] if name in inputs else values[name])

    def outputs(self, index: int, batch: int = 0) -> dict:
        """``{name: array}`` of part ``index``'s outputs on batch ``batch`` (an exactness probe of the part)."""
        out: dict = {}
        self.run(index, list(self.parts.parts[index].outputs), out.__setitem__, [batch])
        return out

    def stats(self, index: int, names: list) -> dict:
        """``{name: TensorStats}`` of tensors computed in part ``index``, over every batch."""
        stats = {name: TensorStats() for name in names}
        self.run(index, names, lambda n, v: stats[n].update(v))
        return stats

    def advance(self, index: int, names: tuple = (), each=None) -> None:
        """Run part ``index`` (as the graph stands: float or already quantized) and save what later parts
        read; delete saved tensors no part from ``index`` on reads (part ``index``'s own inputs stay until the
        next advance, so the part can still run after it advanced: float propagation advances it first).
        ``names``/``each``: tensors of the part handed to ``each(name, array)`` per batch in the same run."""
        if index != self.done + 1:
            raise ValueError(f"parts advance in order: {self.done + 1} next, not {index}")
        part = self.parts.parts[index]
        keep = [o for o in part.outputs if self._last_reader.get(o, -1) > index]

        wanted = list(dict.fromkeys(keep + list(names)))

        def save(name, value, counter=iter(range(1 << 62))):
            b = next(counter) // max(len(wanted), 1)
            if name in names:
                each(name, value)
            if name in keep:
                path = self._path(name, b)
                np.save(path, value)
                self.bytes_written += os.path.getsize(path)

        if wanted:
            self.run(index, wanted, save)
        for name in keep:
            self._saved[name] = index
        for name, last in list(self._last_reader.items()):
            if last < index and name in self._saved:
                for b in range(len(self.batches)):
                    try:
                        os.remove(self._path(name, b))
                    except FileNotFoundError:
                        pass
                del self._saved[name]
        self.done = index


class PartSweep:
    """One short sample carried through the parts in memory, in any number of variants at once (e.g. the same
    tokens with different switch inputs set): iterate to get ``(index, part, run)`` per part in order, one
    session alive at a time; ``run(state, extra)`` runs the part on the tensors earlier parts made
    (``state``: ``{name: array}``, as :meth:`carry` keeps it) and the feeds in ``extra``, returning
    ``{output: array}``. Memory holds one part's weights and the variants' boundary tensors."""

    def __init__(self, graph: Graph, parts: Partition, ids: np.ndarray, inputs: list, options_factory=None):
        self.graph, self.parts, self.options_factory = graph, parts, options_factory
        self.feeds = prompt_feeds(input_specs(inputs), ids)
        self._graph_inputs = {name: shape for name, shape, _ in input_specs(graph.gs.inputs)}
        self._last_reader = parts.saved()

    def __iter__(self):
        for index, part in enumerate(self.parts.parts):
            outputs = list(part.outputs)
            options = self.options_factory() if self.options_factory else None
            session = graph_arrays_session(self.graph, lambda m, part=part: part_model(m, part, outputs, self._graph_inputs),
                                           options)
            run = _PartRun(session, outputs, self.feeds)
            del session
            yield index, part, run
            run.session = None  # closed here, before the next part's session opens, whatever the caller holds
            del run

    def carry(self, index: int, state: dict, outputs: dict) -> dict:
        """The state after part ``index`` made ``outputs``: what parts after it still read."""
        merged = {**state, **outputs}
        return {k: v for k, v in merged.items() if self._last_reader.get(k, -1) > index}


class _PartRun:
    """``run(state, extra)`` of :class:`PartSweep`: one part's session, valid until the sweep moves on."""

    def __init__(self, session, outputs: list, feeds: dict):
        self.session, self.outputs, self.feeds = session, outputs, feeds
        self.wanted = {i.name for i in session.get_inputs()}

    def __call__(self, state: dict, extra: dict | None = None) -> dict:
        if self.session is None:
            raise RuntimeError("the sweep has moved past this part")
        feeds = {**self.feeds, **state, **(extra or {})}
        return dict(zip(self.outputs, self.session.run(self.outputs, {k: v for k, v in feeds.items() if k in self.wanted})))

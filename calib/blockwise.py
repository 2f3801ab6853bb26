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
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper as edh
from onnx import numpy_helper

from ..ir.feeds import input_specs, prompt_feeds
from ..ir.graph import SUB_BYTE_DTYPES, Graph
from ..ir.partition import Part, Partition
from ..ir.storage import graph_arrays_session, weightless_export
from .observers import TensorStats

__all__ = ["BlockwiseRunner", "PartSweep", "WideMatMul", "part_model", "part_openers", "slice_columns", "wide_matmul"]

logger = logging.getLogger(__name__)


def part_model(model: onnx.ModelProto, part: Part, outputs: list, graph_inputs: dict) -> onnx.ModelProto:
    """The model of ``part`` cut from ``model`` (a weightless export of the whole graph): the nodes on the way
    back from ``outputs`` to the part's inputs (so nodes a pass added since the partition are in), the
    initializers they read, its inputs typed from the whole model's value infos (and its inner tensors, so
    that ONNX Runtime fuses as in the whole model: a head dimension a Reshape in the part takes from a shape
    computed elsewhere is static there), and ``outputs``."""
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
    made = {o for n in nodes for o in n.output} - set(outputs)
    shapes = [v for v in model.graph.value_info if v.name in made]  # what ONNX Runtime would know in the whole
    # model: a shape computed from a shape the part only reads is unknown to inference within the part
    graph = onnx.helper.make_graph(nodes, part.name.replace(".", "_"), inputs,
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in outputs], inits,
                                   value_info=shapes)
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


SLICE_BYTES = 256 << 20  # a MatMul whose weight is wider than this in float32 (an LM head) runs in column slices


@dataclass(frozen=True)
class WideMatMul:
    """A MatMul making ``output`` from a constant weight of ``columns`` output columns, too wide for one
    session (:func:`wide_matmul`): run in ``slices`` slices of its columns. The weight is a constant or made
    from constants through 2-D ``Transpose`` and ``DequantizeLinear`` nodes (``chain``); ``axes``: the axis
    of each constant that holds the columns (a constant not named there is not sliced)."""

    output: str
    columns: int
    slices: int
    weight: str  # the MatMul's weight input
    chain: tuple  # the computed tensors from ``weight`` back (``weight`` first unless it is a constant)
    axes: tuple  # ((constant name, axis), ...)


def _weight_chain(tensor, axis: int, chain: list, axes: dict) -> tuple | None:
    """``(rows, columns)`` of the weight behind ``tensor`` (its columns on ``axis``), filling ``chain`` and
    ``axes`` (see :class:`WideMatMul`); None if it is not made of constants in a way a slice can follow."""
    if isinstance(tensor, gs.Constant):
        if len(tensor.shape or ()) != 2 or tensor.dtype in SUB_BYTE_DTYPES:  # (a bfloat16 dtype is an ONNX enum)
            return None
        axes[tensor.name] = axis
        return tensor.shape[1 - axis], tensor.shape[axis]
    node = Graph.producer(tensor)
    if node is None or len(node.outputs) != 1:
        return None
    chain.append(tensor.name)
    if node.op == "Transpose" and list(node.attrs.get("perm", [1, 0])) == [1, 0]:
        return _weight_chain(node.inputs[0], 1 - axis, chain, axes)
    if node.op != "DequantizeLinear" or not all(isinstance(i, gs.Constant) for i in node.inputs[1:]):
        return None
    scale = node.inputs[1]
    along = node.attrs.get("axis", 1) % 2
    if len(scale.shape or ()) == 2:  # blocked: a slice along the blocked axis would cut blocks
        if along == axis:
            return None
        for q in node.inputs[1:]:
            axes[q.name] = axis
    elif len(scale.shape or ()) == 1 and scale.shape[0] > 1 and along == axis:  # per output channel
        for q in node.inputs[1:]:
            axes[q.name] = 0
    return _weight_chain(node.inputs[0], axis, chain, axes)


def wide_matmul(graph: Graph, outputs: list) -> WideMatMul | None:
    """The first of ``outputs`` made by a MatMul whose constant weight ``[K, N]`` (inline, transposed or
    dequantized from constants other than 4-bit ones) takes more than :data:`SLICE_BYTES` as float32, else
    None. ONNX Runtime's CPU runs a float16 MatMul on a float32 copy of its weight: for Llama-3-8B's LM head
    (4096 × 128256) a 2 GB copy, in slices of 256 MB each."""
    tensors = graph.tensors()
    for name in outputs:
        t = tensors.get(name)
        node = Graph.producer(t) if t is not None else None
        if node is None or node.op != "MatMul" or len(node.inputs) != 2:
            continue
        chain, axes = [], {}
        shape = _weight_chain(node.inputs[1], 1, chain, axes)
        if shape is None or 4 * shape[0] * shape[1] <= SLICE_BYTES:
            continue
        return WideMatMul(name, int(shape[1]), -(-4 * shape[0] * shape[1] // SLICE_BYTES), node.inputs[1].name,
                          tuple(chain), tuple(axes.items()))
    return None


def slice_columns(model: onnx.ModelProto, wide: WideMatMul, lo: int, hi: int, views: dict) -> onnx.ModelProto:
    """``model`` with the MatMul making ``wide.output`` computing columns ``lo:hi`` only: the nodes of its
    weight's chain copied, reading the slices of its constants (stubbed ones through ``views``, see
    :func:`~llmq.ir.storage.graph_arrays_session`; inline ones sliced here). The output keeps its name."""
    tag = f".cols{lo}_{hi}"
    inits = {i.name: i for i in model.graph.initializer}
    axes = dict(wide.axes)

    def sliced(name: str) -> str:
        if name not in axes:
            return name
        init, axis = inits[name], axes[name]
        index = (slice(None),) * axis + (slice(lo, hi),)
        if edh.uses_external_data(init):
            new = onnx.TensorProto()
            new.CopyFrom(init)
            new.name = name + tag
            new.dims[axis] = hi - lo
            views[new.name] = (name, lambda a: np.ascontiguousarray(a[index]))
        else:
            new = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(init)[index]), name + tag)
        model.graph.initializer.append(new)
        return new.name

    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    matmul = producer[wide.output]
    at = nodes.index(matmul)
    for tensor in reversed(wide.chain):
        old = producer[tensor]
        new = onnx.NodeProto()
        new.CopyFrom(old)
        new.name = old.name + tag
        new.input[:] = [sliced(i) if i in inits else (i + tag if i in wide.chain else i) for i in old.input]
        new.output[:] = [tensor + tag]
        model.graph.node.insert(at, new)
        at += 1
    weight = wide.weight
    matmul.input[1] = sliced(weight) if weight in inits else weight + tag
    outputs = {o.name for o in model.graph.output}
    while True:  # drop what only the unsliced weight used
        used = {i for n in model.graph.node for i in n.input} | outputs
        alive = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(alive) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(alive)
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _slice_session(graph: Graph, part: Part, outputs: list, graph_inputs: dict, wide: WideMatMul, lo: int, hi: int,
                   options_factory=None):
    """A session running ``part`` up to ``outputs``, ``wide.output`` in columns ``lo:hi`` only."""
    views: dict = {}
    options = options_factory() if options_factory else None
    return graph_arrays_session(graph, lambda m: slice_columns(part_model(m, part, outputs, graph_inputs), wide, lo, hi,
                                                               views), options, views=views)


def part_openers(graph: Graph, parts: Partition) -> list:
    """``[(part name, open)]``: ``open(options)`` makes a session running that part of ``graph`` whole (every
    output it makes), for a check that wants every node of the model in some session without one session
    holding all of it (the onnxruntime backend's build check: what ONNX Runtime fuses, summed over parts). A
    part making a :func:`wide_matmul` output opens the first of its column slices: the same nodes as the whole
    part, a slice of the weight."""
    graph_inputs = {name: shape for name, shape, _ in input_specs(graph.gs.inputs)}
    openers = []
    for part in parts.parts:
        made = list(part.outputs)
        if not made:
            continue
        wide = wide_matmul(graph, made)
        if wide is not None:
            hi = wide.columns // wide.slices
            openers.append((part.name, lambda options, part=part, made=made, wide=wide, hi=hi: _slice_session(
                graph, part, made, graph_inputs, wide, 0, hi, lambda: options)))
        else:
            openers.append((part.name, lambda options, part=part, made=made: graph_arrays_session(
                graph, lambda m: part_model(m, part, made, graph_inputs), options)))
    return openers


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
                 options_factory=None, frozen: bool = False):
        self.graph, self.parts, self.batches = graph, parts, list(batches)
        # frozen: the graph does not change while this runner lives (verification), so one weightless export
        # serves every part's session (it holds no arrays: each session reads its own part's)
        self._prepared = weightless_export(graph) if frozen else None
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
                                    options, prepared=self._prepared), outputs

    def run(self, index: int, names: list, each, batches=None) -> None:
        """Run part ``index`` on every batch (or those in ``batches``); ``each(name, array)`` per requested
        tensor per batch. A requested tensor the part reads as an input is given as it was fed. A tensor made
        by a wide MatMul (:func:`wide_matmul`: the LM head) is computed a slice of its columns at a time."""
        part = self.parts.parts[index]
        inputs = set(part.inputs)
        computed = [n for n in names if n not in inputs]
        batches = range(len(self.batches)) if batches is None else batches
        wide = wide_matmul(self.graph, computed)
        if wide is not None:
            return self._run_sliced(part, names, computed, wide, each, batches)
        session, outputs = self.session(part, computed) if computed else (None, [])
        wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        for b in (self.progress(batches, part.name) if self.progress and len(batches) > 1 else batches):
            feeds = self._feeds(part, b)
            values = (dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in wanted})))
                      if session is not None else {})
            for name in names:
                each(name, feeds[name] if name in inputs else values[name])

    def _run_sliced(self, part: Part, names: list, computed: list, wide: WideMatMul, each, batches) -> None:
        """:meth:`run` of a part making a :class:`WideMatMul`'s output: one session per slice of the MatMul's columns,
        each run on every batch, the slices saved on disk and joined per batch; the part's other requested
        tensors come from the first slice's session. Memory holds one slice's weight (and ONNX Runtime's float32
        copy of it) and one batch's whole output."""
        output, columns, count = wide.output, wide.columns, wide.slices
        bounds = [columns * k // count for k in range(count + 1)]
        scratch = tempfile.mkdtemp(prefix="slices-", dir=self.workdir)
        try:
            slices = list(range(count))
            for s in (self.progress(slices, f"{part.name} ({count} column slices)") if self.progress else slices):
                lo, hi = bounds[s], bounds[s + 1]
                wanted = computed if s == 0 else [output]
                session = _slice_session(self.graph, part, wanted, self._graph_inputs, wide, lo, hi,
                                         self.options_factory)
                reads = {i.name for i in session.get_inputs()}
                for b in batches:
                    feeds = self._feeds(part, b)
                    values = session.run(wanted, {name: v for name, v in feeds.items() if name in reads})
                    for k, value in enumerate(values):
                        np.save(os.path.join(scratch, f"{s}.{b}.{k}.npy"), value)
                del session
            for b in batches:
                feeds = self._feeds(part, b) if set(names) & set(part.inputs) else {}
                for name in names:
                    if name in part.inputs:
                        each(name, feeds[name])
                    elif name == output:
                        k = computed.index(name)
                        each(name, np.concatenate([np.load(os.path.join(scratch, f"{s}.{b}.{0 if s else k}.npy"))
                                                   for s in range(count)], axis=-1))
                    else:
                        each(name, np.load(os.path.join(scratch, f"0.{b}.{computed.index(name)}.npy")))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

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
            wide = wide_matmul(self.graph, outputs)
            if wide is not None:  # the LM head over SLICE_BYTES: a session per slice of its columns, per run
                run = _SlicedPartRun(self, part, outputs, wide)
            else:
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


class _SlicedPartRun:
    """:class:`_PartRun` of a part making a :class:`WideMatMul`'s output: each run opens the session of one
    slice of its columns at a time and joins the slices (memory: one slice's weights, not the whole head)."""

    def __init__(self, sweep: PartSweep, part: Part, outputs: list, wide: WideMatMul):
        self.sweep, self.part, self.outputs, self.wide = sweep, part, outputs, wide
        self.session = True  # set to None when the sweep moves on

    def __call__(self, state: dict, extra: dict | None = None) -> dict:
        if self.session is None:
            raise RuntimeError("the sweep has moved past this part")
        sweep, wide = self.sweep, self.wide
        feeds = {**sweep.feeds, **state, **(extra or {})}
        bounds = [wide.columns * k // wide.slices for k in range(wide.slices + 1)]
        out, pieces = {}, []
        for s in range(wide.slices):
            wanted = self.outputs if s == 0 else [wide.output]
            session = _slice_session(sweep.graph, self.part, wanted, sweep._graph_inputs, wide, bounds[s],
                                     bounds[s + 1], sweep.options_factory)
            reads = {i.name for i in session.get_inputs()}
            values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in reads})))
            del session
            pieces.append(values.pop(wide.output))
            out.update(values)
        out[wide.output] = np.concatenate(pieces, axis=-1)
        return {name: out[name] for name in self.outputs}

"""Partition a decoder graph at its block boundaries: prefix (embedding and position-only work), one part per
decoder block, and the head (final norm, LM head, whatever follows the last block).

The residual stream is the spine: ``h_i`` is the output of layer ``i``'s last residual ``Add`` and ``h_-1``
the residual input of layer 0 (the embedding, scaled or with positions added). A block's part is every node
on the way back from its outputs to ``h_{i-1}``, stopping at constants and at *side inputs*: tensors that do
not depend on the token embedding (rotary tables, masks, position ids, an empty KV cache — all computed once
in the prefix) and tensors an earlier part produced. Constant-only work (a weight's ``DequantizeLinear``)
belongs to the part that reads it, so a part holds its own weights and nothing else.

A part is described by tensor names only (:class:`Part`); :func:`extract` cuts it out of an ONNX model as a
model of its own (``onnx.utils.Extractor``), so each part can run in its own ONNX Runtime session on its
inputs saved from the part before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .graph import Graph
from .structure import Structure

__all__ = ["Part", "Partition", "partition"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One part of the graph: its name, input and output tensor names, and the names of its nodes."""

    name: str  # "prefix", "layers.N", "head"
    inputs: tuple  # tensor names: the residual input first (none for the prefix), then side inputs
    outputs: tuple  # tensor names: the residual output first (none for the head), then graph outputs made here
    nodes: tuple  # node names, in graph order


@dataclass(frozen=True)
class Partition:
    parts: tuple  # prefix, layers.0 … layers.L-1, head

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def of_node(self) -> dict:
        """``{node name: part name}``."""
        return {n: p.name for p in self.parts for n in p.nodes}

    def within(self, tensors) -> "Partition | None":
        """The same cuts in another version of the graph (the compiled model, whose nodes were renamed and
        fused), which has ``tensors``: each part keeps the inputs and outputs the other graph still has. None
        when a block's residual output is gone there (its cut no longer exists)."""
        if any(p.outputs and p.outputs[0] not in tensors for p in self.parts if p.name != "head"):
            return None
        return Partition(tuple(Part(p.name, tuple(t for t in p.inputs if t in tensors),
                                    tuple(t for t in p.outputs if t in tensors), ()) for p in self.parts))

    def saved(self) -> dict:
        """``{tensor: index of the last part that reads it}`` for every tensor a part passes to a later one."""
        made = {t: i for i, p in enumerate(self.parts) for t in p.outputs}
        last: dict = {}
        for i, p in enumerate(self.parts):
            for t in p.inputs:
                if t in made and made[t] < i:
                    last[t] = i
        return last


def _flow(graph: Graph, structure: Structure) -> tuple:
    """``(E, H)``: the tensors that depend on the token embedding (E), and those of them that carry hidden
    states (H: not computed through a ``Shape``/``Size``)."""
    if structure.embedding is None:
        raise ValueError("no token embedding found: the graph is compiled whole")
    start = structure.embedding.outputs[0]
    dependent, hidden = set(), set()
    frontier = [(start, True)]
    while frontier:
        t, carries = frontier.pop()
        if t.name in dependent and (not carries or t.name in hidden):
            continue
        dependent.add(t.name)
        if carries:
            hidden.add(t.name)
        for consumer in t.outputs:
            through = carries and consumer.op not in ("Shape", "Size")
            frontier.extend((o, through) for o in consumer.outputs)
    return dependent, hidden


def _spine(graph: Graph, structure: Structure, hidden: set) -> list:
    """``[h_-1, h_0, …, h_{L-1}]`` (tensor names): each the output of a node every hidden path to the next
    layer's linears passes through (a dominator in the hidden-state flow from the embedding) — the residual
    stream between blocks, after a post-LN block's norm; the last one before the final norm."""
    import networkx as nx

    layers: dict = {}
    head = None
    for lin in structure.linears:
        if lin.layer is not None:
            layers.setdefault(lin.layer, []).append(lin.node.name)
        elif lin.role == "lm_head":
            head = lin.node.name
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ValueError(f"linears found for layers {sorted(layers)}: not a chain of decoder blocks")
    flow = nx.DiGraph()
    source = structure.embedding.name
    flow.add_node(source)
    for node in graph.gs.nodes:
        for t in node.outputs:
            if t.name in hidden:
                for consumer in t.outputs:
                    flow.add_edge(node.name, consumer.name)
    idom = nx.immediate_dominators(flow, source)

    def dominators(name: str) -> list:  # from the node up to the embedding
        chain = [name]
        while chain[-1] != source:
            chain.append(idom[chain[-1]])
        return chain

    def common(names: list) -> list:  # the dominators all of ``names`` share, deepest first
        chains = [dominators(n) for n in names if n in idom]
        if not chains:
            return []
        shared = set.intersection(*(set(c) for c in chains))
        return [n for n in chains[0] if n in shared and n not in names]

    nodes = graph.node_by_name()

    def hidden_output(name: str) -> str:
        return next(t.name for t in nodes[name].outputs if t.name in hidden)

    spine = [hidden_output(common(layers[0])[0])]
    count = len(layers)
    for i in range(count):
        before = set().union(*(set(dominators(n)) for n in layers[i] if n in idom))
        if i + 1 < count:
            after = [n for n in common(layers[i + 1]) if n not in before]
            cut = after[0] if after else None  # the deepest: after a post-LN block's norm
        else:
            ends = [head] if head in idom else [n.name for n in graph.gs.nodes
                                                  if any(o.name in {t.name for t in graph.gs.outputs} for o in n.outputs)
                                                  and n.name in idom]
            after = [n for n in common(ends) if n not in before] if ends else []
            cut = after[-1] if after else None  # the shallowest: the final norm goes with the head
        if cut is None:
            raise ValueError(f"no single tensor carries the hidden state out of layer {i}")
        spine.append(hidden_output(cut))
    return spine


def partition(graph: Graph, structure: Structure) -> Partition:
    """The parts of ``graph`` (see the module docstring); raises ValueError for a graph that is not a chain
    of decoder blocks (then the caller compiles it whole)."""
    dependent, hidden = _flow(graph, structure)
    spine = _spine(graph, structure, hidden)
    tensors = graph.tensors()
    order = {n.name: i for i, n in enumerate(graph.gs.nodes)}
    graph_outputs = [t.name for t in graph.gs.outputs]
    owner: dict = {}  # node name -> part index

    def closure(index: int, outputs: list, stop: set) -> tuple:
        nodes, inputs, seen = [], [], set()
        stack = [tensors[o] for o in outputs]
        while stack:
            t = stack.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            producer = Graph.producer(t)
            if isinstance(t, gs.Constant) or (producer is None and t.name not in stop and not _is_input(graph, t)):
                continue
            if producer is not None and owner.get(producer.name) == index:
                continue  # another output of a node this part already holds (Split)
            if producer is not None and producer.name in owner and _constant_only(t):
                continue  # a weight's view another part holds too (a tied embedding): each part computes its own
            if t.name in stop or producer is None or producer.name in owner or (
                    index > 0 and t.name not in dependent and not _constant_only(t)):
                if t.name not in outputs:
                    inputs.append(t.name)
                continue
            owner[producer.name] = index
            nodes.append(producer)
            stack.extend(producer.inputs)
        nodes.sort(key=lambda n: order[n.name])
        return tuple(n.name for n in nodes), inputs

    # the prefix: h_-1 and every embedding-independent tensor the blocks read are computed later, once we
    # know which; blocks first (they define the side inputs), then prefix and head
    block_specs = []
    for i in range(1, len(spine)):
        made_here = [o for o in graph_outputs if o not in owner]
        nodes, inputs = closure(i, [spine[i]], {spine[i - 1]})
        extra = [o for o in made_here if Graph.producer(tensors[o]) is not None
                 and Graph.producer(tensors[o]).name in set(nodes)]
        side = [t for t in inputs if t != spine[i - 1]]
        block_specs.append((f"layers.{i - 1}", (spine[i - 1], *sorted(set(side))), (spine[i], *extra), nodes))
    head_outputs = [o for o in graph_outputs if not (Graph.producer(tensors[o]) is not None
                                                     and Graph.producer(tensors[o]).name in owner)]
    head_nodes, head_inputs = closure(len(spine), head_outputs, {spine[-1]})
    head = ("head", (spine[-1], *sorted(set(head_inputs) - {spine[-1]})), tuple(head_outputs), head_nodes)
    needed = [spine[0]] + sorted({t for _, ins, _, _ in block_specs + [head] for t in ins[1:]
                                  if Graph.producer(tensors[t]) is None or Graph.producer(tensors[t]).name not in owner})
    needed = [t for t in needed if not _is_input(graph, tensors[t])] or [spine[0]]
    prefix_nodes, prefix_inputs = closure(0, needed, set())
    specs = [("prefix", tuple(sorted(set(prefix_inputs))), tuple(dict.fromkeys(needed)), prefix_nodes)]
    specs += block_specs + [head]
    # a tensor a part reads from an earlier block (not through the residual stream) is that block's output too
    index_of = {name: i for i, (_, _, _, nodes) in enumerate(specs) for name in nodes}
    extra: dict = {}
    for i, (_, inputs, _, _) in enumerate(specs):
        for t in inputs:
            producer = Graph.producer(tensors[t])
            j = index_of.get(producer.name) if producer is not None else None
            if j is not None and j != i and t not in specs[j][2]:
                extra.setdefault(j, []).append(t)
    for j, names in extra.items():
        name, inputs, outputs, nodes = specs[j]
        specs[j] = (name, inputs, tuple(outputs) + tuple(dict.fromkeys(names)), nodes)
    parts = [Part(*spec) for spec in specs]
    made: dict = {}
    for i, part in enumerate(parts):
        for t in part.outputs:
            made.setdefault(t, i)
    for i, part in enumerate(parts):  # a chain: each part reads only what earlier parts made
        for t in part.inputs:
            j = made.get(t)
            if j is not None and j >= i:
                raise ValueError(f"part {part.name} reads {t}, which {parts[j].name} makes: the blocks do not form a chain "
                                 "at the residual stream")
            if j is None and not (_is_input(graph, tensors[t]) or _constant_only(tensors[t])):
                raise ValueError(f"part {part.name} reads {t}, which no part makes")
    unassigned = [n.name for n in graph.gs.nodes if n.name not in owner and not _constant_only_node(n)]
    if unassigned:  # nodes no output depends on: they run nowhere
        logger.debug("%d node(s) reach no output and belong to no part (first: %s)", len(unassigned), unassigned[0])
    return Partition(tuple(parts))


def _is_input(graph: Graph, t: gs.Tensor) -> bool:
    return any(t is i for i in graph.gs.inputs)


def _constant_only(t: gs.Tensor, limit: int = 16) -> bool:
    """Whether ``t`` is computed from constants alone (a weight seen through a DequantizeLinear or Transpose)."""
    producer = Graph.producer(t)
    if isinstance(t, gs.Constant):
        return True
    if producer is None or limit == 0:
        return False
    return all(_constant_only(i, limit - 1) for i in producer.inputs if i.name)


def _constant_only_node(node: gs.Node) -> bool:
    return all(_constant_only(i) for i in node.inputs if i.name)

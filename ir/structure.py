"""Structural discovery: what a quantizer needs to know about an LLM graph, from its shape alone.

Dynamo exports name weights ``val_127``; nothing here reads a name. A *linear* is a MatMul or Gemm
whose weight is a constant (directly or through Transpose/Reshape/Cast of one). Roles come from the
graph around it:

* attention: each Softmax is traced back to its score ``MatMul(Q, Kᵀ)`` and forward to ``MatMul(P, V)``;
  the linears feeding Q, K and V are ``q``, ``k``, ``v`` (one linear feeding all three is ``qkv``), the
  linear fed by ``P·V`` is ``o``;
* MLP: linears sharing a normalised input outside attention are ``gate``/``up`` (SwiGLU: the gate's output
  goes through Sigmoid/SiLU) or ``fc1`` (one linear followed by an activation); the linear whose input
  derives from them is ``down``/``fc2``;
* ``lm_head``: the linear whose output reaches a graph output, directly or through elementwise ops by
  constants (Gemma2's logit softcapping ``cap·tanh(x/cap)``); ``tied`` when its weight is the embedding's.

Layers: attention linears take their block's index (blocks in graph order); an MLP linear belongs to the
block before the first attention its output reaches — right for sequential blocks and for the parallel
residual of GPT-NeoX and Falcon alike. A linear that looks like an MLP but has no layer is left ``unknown``
with the reason, so no pass quantizes it by guess.

Producers: RMSNorm and LayerNorm, as single ops or decomposed (a ReduceMean upstream of a Mul by a
1-D constant, with a Sub for LayerNorm). A linear that fits none of these keeps role ``unknown`` and a
reason: it is reported, never guessed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from .graph import FLOAT_BRANCH, FUSED_INPUT, RANGE_SPLIT, ROLE_KEY, TRANSPARENT_OPS, ConstantView, Graph

__all__ = ["Linear", "Norm", "Structure", "discover", "lite_linears"]

logger = logging.getLogger(__name__)

NORM_OPS = {"LayerNormalization": "layernorm", "RMSNormalization": "rmsnorm",
            "SimplifiedLayerNormalization": "rmsnorm", "SkipSimplifiedLayerNormalization": "rmsnorm",
            "SkipLayerNormalization": "layernorm"}
ACTIVATION_OPS = {"Sigmoid", "Gelu", "FastGelu", "Erf", "Tanh", "Relu", "Silu", "QuickGelu", "BiasGelu"}
# ops a backward trace may cross without losing track of the data (shape inputs are never followed)
DATA_INPUT0_OPS = TRANSPARENT_OPS | {"QuantizeLinear", "DequantizeLinear", "Slice", "Expand", "Split", "Gather", "Tile", "Pad", "Dropout"}
STOP_OPS = {"Shape", "Size", "Softmax", "ConstantOfShape", "Range"}


@dataclass
class Norm:
    kind: str  # 'rmsnorm' | 'layernorm'
    node: gs.Node  # the node producing the normalised output (fused op, or the Mul/Add by gamma/beta)
    weight: gs.Constant | None
    bias: gs.Constant | None


@dataclass
class Linear:
    node: gs.Node
    weight: ConstantView
    act: gs.Tensor
    in_features: int
    out_features: int
    weight_axis: int  # output-channel axis of the weight as the op consumes it
    role: str = "unknown"
    layer: int | None = None
    name: str = ""
    producer: str = "other"  # rmsnorm | layernorm | activation | attention | embedding | other
    norm: Norm | None = None
    tied_embedding: bool = False
    range_split: bool = False  # its input is Concat(clip(x), residual) along tokens (split-range)
    reason: str = ""

    @property
    def act_quantized(self) -> bool:
        producer = Graph.producer(self.act)
        return producer is not None and producer.op == "DequantizeLinear"

    @property
    def macs_per_token(self) -> int:
        return self.in_features * self.out_features


@dataclass
class Structure:
    linears: list = field(default_factory=list)
    # dicts of node names: layer, softmax, scores (MatMul Q·Kᵀ), context (MatMul P·V), q, k, v (or qkv), o
    attention: list = field(default_factory=list)
    residual_adds: list = field(default_factory=list)
    embedding: gs.Node | None = None
    vocab_size: int | None = None

    def summary(self) -> dict:
        roles: dict = {}
        for lin in self.linears:
            roles[lin.role] = roles.get(lin.role, 0) + 1
        return {"linears": len(self.linears), "roles": roles, "attention_blocks": len(self.attention),
                "residual_adds": len(self.residual_adds), "vocab_size": self.vocab_size,
                "unclassified": [{"node": lin.node.name, "reason": lin.reason}
                                 for lin in self.linears if lin.role == "unknown"]}


def _find_linear(graph: Graph, node: gs.Node) -> Linear | None:
    if node.op == "MatMul" and len(node.inputs) == 2:
        if graph.constant_through(node.inputs[0]) is not None:
            return None
        view = graph.constant_through(node.inputs[1])
        if view is None:
            return None
        shape = _consumed_shape(graph, view)
        if shape is None or len(shape) != 2:
            return None
        return Linear(node, view, node.inputs[0], int(shape[0]), int(shape[1]), weight_axis=1)
    if node.op == "Gemm":
        view = graph.constant_through(node.inputs[1])
        if view is None or graph.constant_through(node.inputs[0]) is not None:
            return None
        if node.attrs.get("transA", 0):
            return None
        shape = _consumed_shape(graph, view)
        if shape is None or len(shape) != 2:
            return None
        if node.attrs.get("transB", 0):
            return Linear(node, view, node.inputs[0], int(shape[1]), int(shape[0]), weight_axis=0)
        return Linear(node, view, node.inputs[0], int(shape[0]), int(shape[1]), weight_axis=1)
    return None


def _consumed_shape(graph: Graph, view: ConstantView):
    """The shape the consumer sees, from the stored shape through the view's chain (no value is read:
    discovery runs after every change, and materializing each quantized weight made it cost the model)."""
    shape = tuple(view.tensor.shape)
    for node in view.chain:
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            shape = tuple(shape[p] for p in perm) if perm is not None else shape[::-1]
        elif node.op == "Reshape":
            target = [int(d) for d in np.asarray(node.inputs[1].values).reshape(-1)]
            if any(d <= 0 for d in target):  # 0 (copy) and -1 (infer): worked out from the values' size
                try:
                    return Graph.materialize(view).shape
                except NotImplementedError:
                    return None
            shape = tuple(target)
        elif node.op not in ("DequantizeLinear", "Cast", "Mul"):  # Mul: a per-channel scale after a DQ
            return None  # Squeeze, Unsqueeze, Flatten: not a view materialize follows either
    return shape


QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _skip_transparent_back(tensor: gs.Tensor) -> gs.Node | None:
    node = Graph.producer(tensor)
    while node is not None and node.op in TRANSPARENT_OPS | QDQ_OPS:
        node = Graph.producer(node.inputs[0])
    return node


def _merges_streams(graph: Graph, node: gs.Node) -> bool:
    """An ``Add`` of two computed tensors (not a bias, not the inner Add of a range split)."""
    return (node.op == "Add" and len(node.inputs) == 2 and _role(graph, node) != RANGE_SPLIT
            and not any(isinstance(t, gs.Constant) or graph.constant_through(t) is not None for t in node.inputs))


BRANCH_STOP_OPS = {"Softmax", "Gather"}


def _branch_linear(graph: Graph, tensor: gs.Tensor, linears: dict, depth: int = 16):
    """The linear a residual branch ends with: back from ``tensor`` through transparent and Q/DQ ops, a bias
    ``Add``, the recombining ``Add`` of a range split and a normalisation after the linear (Gemma2's
    post-attention and post-MLP norms), never across another stream-merging ``Add``; None if none."""
    seen, frontier = set(), [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            node = Graph.producer(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.name in linears:
                return node
            if node.op in BRANCH_STOP_OPS or node.op == "MatMul" or (
                    _merges_streams(graph, node) and _role(graph, node) != RANGE_SPLIT):
                continue
            nxt.extend(i for i in node.inputs if not isinstance(i, gs.Constant))
        frontier = nxt
        if not frontier:
            break
    return None


def _through_qdq(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor behind ``DequantizeLinear(QuantizeLinear(x))`` (``tensor`` itself otherwise)."""
    node = Graph.producer(tensor)
    while node is not None and node.op in QDQ_OPS and not isinstance(node.inputs[0], gs.Constant):
        tensor = node.inputs[0]
        node = Graph.producer(tensor)
    return tensor


def _role(graph: Graph, node: gs.Node | None) -> str | None:
    return None if node is None else graph.node_metadata.get(node.name, {}).get(ROLE_KEY)


def _range_split_source(graph: Graph, tensor: gs.Tensor) -> gs.Tensor | None:
    """``x`` if ``tensor`` (through Q/DQ) is split-range's ``Concat(Clip(x), …)``, else None."""
    node = Graph.producer(_through_qdq(tensor))
    if node is None or node.op != "Concat" or _role(graph, node) != RANGE_SPLIT:
        return None
    clip = Graph.producer(node.inputs[0])
    return clip.inputs[0] if clip is not None and clip.op == "Clip" else None


def _own_input(graph: Graph, tensor: gs.Tensor) -> gs.Tensor:
    """The tensor a linear transforms: through Q/DQ, through a fused side-branch ``Concat`` (a low-rank
    branch appended to the input) to its first input, and through a range split to the unsplit input."""
    source = _range_split_source(graph, tensor)
    if source is not None:
        return source
    tensor = _through_qdq(tensor)
    node = Graph.producer(tensor)
    if node is not None and node.op == "Concat" and _role(graph, node) == FUSED_INPUT:
        return _through_qdq(node.inputs[0])
    return tensor


def _ancestor_ops(node: gs.Node, depth: int) -> set:
    ops, frontier, seen = set(), [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for t in n.inputs:
                p = Graph.producer(t)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    ops.add(p.op)
                    nxt.append(p)
        frontier = nxt
    return ops


def _classify_norm(graph: Graph, tensor: gs.Tensor, seen_through_scale: bool = True) -> Norm | None:
    node = _skip_transparent_back(tensor)
    if node is None:
        return None
    if node.op in NORM_OPS:
        w = node.inputs[1] if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) else None
        b = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
        return Norm(NORM_OPS[node.op], node, w, b)
    bias = None
    if node.op == "Add":
        consts = [t for t in node.inputs if isinstance(t, gs.Constant) and len(t.shape) == 1]
        others = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(consts) != 1 or len(others) != 1:
            return None
        bias = consts[0]
        inner = Graph.producer(others[0])
        if inner is None or inner.op != "Mul":
            return None
        node_for_bias = node
        node = inner
    if node.op != "Mul":
        return None
    consts = [t for t in node.inputs if isinstance(t, gs.Constant) and len(t.shape) == 1]
    others = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    if len(consts) != 1 or len(others) != 1 or Graph.producer(others[0]) is None:
        return None
    if bias is None and seen_through_scale:
        inner = _classify_norm(graph, others[0], seen_through_scale=False)
        if inner is not None:  # a norm's output rescaled per channel (smooth-quant's explicit 1/s): still that norm's
            return inner
    ops = _ancestor_ops(node, 6)
    if "ReduceMean" not in ops or not ops & {"Sqrt", "Reciprocal", "Div", "Rsqrt", "Pow"}:
        return None
    kind = "layernorm" if ("Sub" in ops or bias is not None) else "rmsnorm"
    return Norm(kind, node_for_bias if bias is not None else node, consts[0], bias)


def _trace_back_to_linears(start: gs.Tensor, linear_nodes: set, limit: int = 64, branches: frozenset = frozenset()) -> list:
    """Linears reached walking data edges backward from ``start``, stopping at each linear found and not
    entering the float side branches named in ``branches`` (they read the linear's input, not its output)."""
    found, queue, seen = [], deque([start]), set()
    steps = 0
    while queue and steps < limit:
        tensor = queue.popleft()
        node = Graph.producer(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        steps += 1
        if node.name in linear_nodes:
            found.append(node)
            continue
        if node.op in STOP_OPS or node.name in branches:
            continue
        inputs = node.inputs[:1] if node.op in DATA_INPUT0_OPS else node.inputs
        for t in inputs:
            if not isinstance(t, gs.Constant):
                queue.append(t)
    return found


def _branch_nodes(graph: Graph) -> frozenset:
    """Names of the float side-branch MatMuls passes created (low-rank, split outliers)."""
    return frozenset(name for name, md in graph.node_metadata.items() if md.get(ROLE_KEY) == FLOAT_BRANCH)


def _scales_by_constant(node: gs.Node) -> bool:
    """A ``Mul`` by a constant (e.g. smooth-quant's explicit ``1/s``): values rescaled, roles unchanged."""
    return node.op == "Mul" and len(node.inputs) == 2 and any(isinstance(t, gs.Constant) for t in node.inputs)


def _forward(tensor: gs.Tensor, through: set, scaling: bool = False, nodes: frozenset = frozenset()) -> list:
    """Consumers of ``tensor``, looking through ops in ``through``, nodes named in ``nodes`` (and constant
    scalings if ``scaling``)."""
    out, queue = [], deque([tensor])
    while queue:
        for consumer in queue.popleft().outputs:
            if consumer.op in through or consumer.name in nodes or (scaling and _scales_by_constant(consumer)):
                queue.extend(consumer.outputs)
            else:
                out.append(consumer)
    return out


def _reaches_activation(tensor: gs.Tensor, linear_nodes: set, depth: int = 6) -> bool:
    """Whether a nonlinearity (Sigmoid, Tanh, Erf, Gelu, ...) follows within ``depth`` ops, before any linear."""
    frontier = [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            for consumer in t.outputs:
                if consumer.op in ACTIVATION_OPS:
                    return True
                if consumer.name not in linear_nodes and consumer.op not in STOP_OPS:
                    nxt.extend(consumer.outputs)
        frontier = nxt
    return False


def _attention_blocks(graph: Graph, linear_nodes: set, branches: frozenset) -> list:
    blocks = []
    fused_inputs = frozenset(name for name, md in graph.node_metadata.items() if md.get(ROLE_KEY) in (FUSED_INPUT, RANGE_SPLIT))
    score_ops = {"Mul", "Div", "Add", "Where", "Cast", "Sub", "Tanh"}  # Tanh: Gemma2's attention softcapping
    for sm in [n for n in graph.gs.nodes if n.op == "Softmax"]:
        qk = Graph.producer(sm.inputs[0])
        while qk is not None and qk.op in score_ops:
            nxt = [Graph.producer(t) for t in qk.inputs if not isinstance(t, gs.Constant)]
            nxt = [p for p in nxt if p is not None and (p.op == "MatMul" or p.op in score_ops)]
            qk = next((p for p in nxt if p.op == "MatMul"), nxt[0] if nxt else None)
        if qk is None or qk.op != "MatMul":
            continue
        pv = next((c for c in _forward(sm.outputs[0], {"IsNaN", "Where", "Cast", "Dropout"} | TRANSPARENT_OPS | QDQ_OPS)
                   if c.op == "MatMul"), None)
        if pv is None:
            continue
        q = _trace_back_to_linears(qk.inputs[0], linear_nodes, branches=branches)
        k = _trace_back_to_linears(qk.inputs[1], linear_nodes, branches=branches)
        v = _trace_back_to_linears(pv.inputs[1], linear_nodes, branches=branches)
        o = [c for c in _forward(pv.outputs[0], TRANSPARENT_OPS | QDQ_OPS, scaling=True, nodes=fused_inputs)
             if c.name in linear_nodes]
        blocks.append({"softmax": sm, "scores": qk, "context": pv, "q": q, "k": k, "v": v, "o": o})
    return blocks


def discover(graph: Graph) -> Structure:
    """Find the linears of ``graph`` and what each one is."""
    graph.gs.toposort()
    order = {id(n): i for i, n in enumerate(graph.gs.nodes)}
    linears = [lin for lin in (_find_linear(graph, n) for n in graph.gs.nodes
                               if graph.node_metadata.get(n.name, {}).get(ROLE_KEY) != FLOAT_BRANCH)
               if lin is not None]
    by_name = {lin.node.name: lin for lin in linears}
    names = set(by_name)
    st = Structure(linears=linears)
    for lin in linears:
        lin.range_split = _range_split_source(graph, lin.act) is not None

    gathers = [n for n in graph.gs.nodes if n.op == "Gather" and isinstance(n.inputs[0], gs.Constant)
               and len(n.inputs[0].shape) == 2 and not isinstance(n.inputs[1], gs.Constant)]
    if gathers:  # the token embedding reads the ids input (GPT-2's position table may come first)
        def fed_by(t):
            while (p := Graph.producer(t)) is not None and p.op in ("Reshape", "Unsqueeze", "Squeeze", "Cast",
                                                                    "Identity", "Flatten"):
                t = p.inputs[0]
            return t.name

        gathers.sort(key=lambda n: (fed_by(n.inputs[1]) != "input_ids", fed_by(n.inputs[1]) == "position_ids"))
        st.embedding = gathers[0]
        st.vocab_size = int(gathers[0].inputs[0].shape[0])

    branches = _branch_nodes(graph)
    blocks = _attention_blocks(graph, names, branches)
    blocks.sort(key=lambda b: order[id(b["softmax"])])
    for layer, b in enumerate(blocks):
        entry = {"layer": layer, "softmax": b["softmax"].name, "scores": b["scores"].name, "context": b["context"].name}
        fused = {n.name for n in b["q"]} & {n.name for n in b["k"]} & {n.name for n in b["v"]}
        for role in ("q", "k", "v", "o"):
            for n in b[role]:
                lin = by_name[n.name]
                if lin.role not in ("unknown", role):
                    continue
                lin.role = "qkv" if n.name in fused else role
                lin.layer = layer
                entry.setdefault(lin.role, []).append(n.name)
        st.attention.append(entry)

    softmax_layer = {id(b["softmax"]): i for i, b in enumerate(blocks)}

    def layer_of(node) -> int | None:
        """An MLP linear's layer: the block before the first attention its output reaches (the next layer
        reads this MLP's residual sum, whether the MLP runs after its attention or beside it, as in GPT-NeoX's
        and Falcon's parallel residual); the last block if none does."""
        if not blocks:
            return None
        seen, queue, first, horizon = {id(node)}, deque([node]), len(blocks), len(order)
        while queue:
            for t in queue.popleft().outputs:
                for c in t.outputs:
                    if id(c) in seen or order[id(c)] > horizon:  # past the best softmax: reaches only later ones
                        continue
                    seen.add(id(c))
                    if id(c) in softmax_layer:
                        first, horizon = min(first, softmax_layer[id(c)]), min(horizon, order[id(c)])
                    else:
                        queue.append(c)
        return first - 1 if first > 0 else None

    # lm_head: its output reaches a graph output through transparent ops and head-side elementwise ops by
    # constants (Gemma2's logit softcapping: cap · tanh(logits / cap)); found before the MLP roles, so a
    # softcapped head is never taken for an fc1 followed by an activation
    outputs = {t.name for t in graph.gs.outputs}
    for lin in linears:
        if lin.role == "unknown" and _reaches_output(lin.node.outputs[0], outputs):
            lin.role = "lm_head"
            lin.tied_embedding = st.embedding is not None and lin.weight.tensor is st.embedding.inputs[0]

    # producers and MLP roles
    groups: dict = {}
    for lin in linears:
        source = _own_input(graph, lin.act)
        norm = _classify_norm(graph, source)
        if norm is not None:
            lin.producer, lin.norm = norm.kind, norm
        groups.setdefault(source.name, []).append(lin)
    for members in groups.values():  # one group per activation tensor: q/k/v, gate/up, ...
        free = [m for m in members if m.role == "unknown"]
        if not free or free[0].norm is None:
            continue
        activated = [m for m in free if _reaches_activation(m.node.outputs[0], names)]
        if len(free) == 2 and len(activated) == 1:
            gate = activated[0]
            up = free[0] if free[1] is gate else free[1]
            gate.role, up.role = "gate", "up"
        elif len(free) == 1 and activated:
            free[0].role = "fc1"
        for m in free:
            if m.role != "unknown":
                m.layer = layer_of(m.node)
    for lin in linears:
        if lin.role != "unknown":
            continue
        sources = {by_name[n.name].role for n in _trace_back_to_linears(lin.act, names, branches=branches)}
        producer = _skip_transparent_back(_own_input(graph, lin.act))
        if lin.producer == "other" and producer is not None and (producer.op in ACTIVATION_OPS or producer.op == "Mul"):
            lin.producer = "activation"
        if sources and sources <= {"gate", "up"} and "up" in sources:
            lin.role = "down"
        elif sources == {"fc1"}:
            lin.role = "fc2"
        if lin.role != "unknown":
            lin.layer = layer_of(lin.node)

    for lin in linears:
        if lin.role not in ("unknown", "lm_head") and lin.layer is None:  # never quantized by guess
            lin.reason = (f"looks like an MLP {lin.role} but no attention block precedes it, so it has no layer; "
                          "left in float")
            lin.role = "unknown"
        if lin.role == "o":
            lin.producer = "attention"
        if lin.role == "unknown":
            lin.reason = lin.reason or _why_unknown(lin)
            lin.name = f"unknown.{lin.node.name}"
        elif lin.role == "lm_head":
            lin.name = "lm_head"
        else:
            block = "attn" if lin.role in ("q", "k", "v", "qkv", "o") else "mlp"
            lin.name = f"layers.{lin.layer}.{block}.{lin.role}"

    for node in graph.gs.nodes:
        if not _merges_streams(graph, node):
            continue
        for t in node.inputs:
            p = _branch_linear(graph, t, by_name)
            if p is not None and by_name[p.name].role in ("o", "down", "fc2"):
                st.residual_adds.append({"add": node.name, "after": by_name[p.name].name, "output": node.outputs[0].name})
    _dedupe_names(st)
    return st


HEAD_SIDE_OPS = {"Div", "Mul", "Tanh", "Add", "Sub"}  # by a constant, after the LM head (softcapping, scaling)


def _reaches_output(tensor: gs.Tensor, outputs: set, limit: int = 8) -> bool:
    """Whether ``tensor`` is a graph output or becomes one through a chain of single consumers that are
    transparent ops or elementwise ops whose other inputs are constants."""
    for _ in range(limit):
        if tensor.name in outputs:
            return True
        if len(tensor.outputs) != 1:
            return False
        node = tensor.outputs[0]
        others = [t for t in node.inputs if t is not tensor]
        if not (node.op in TRANSPARENT_OPS or (node.op in HEAD_SIDE_OPS and all(isinstance(t, gs.Constant) for t in others))):
            return False
        tensor = node.outputs[0]
    return tensor.name in outputs


def _why_unknown(lin: Linear) -> str:
    if lin.producer in ("rmsnorm", "layernorm"):
        return f"fed by a {lin.producer} but matches no attention or MLP pattern"
    return "its input and output match no attention, MLP or LM-head pattern"


def _dedupe_names(st: Structure) -> None:
    """Two linears with one role in one layer (an unusual graph) become ``name``, ``name#1``, ..."""
    seen: dict = {}
    for lin in st.linears:
        base = lin.name
        if base in seen:
            lin.name = f"{base}#{seen[base]}"
        seen[base] = seen.get(base, 0) + 1


@dataclass(frozen=True)
class _Named:
    name: str


def lite_linears(structure: Structure) -> list:
    """The structure's linears with names, roles and shapes only: no node, weight or tensor of the graph, so
    keeping them keeps no weight alive while passes replace the originals."""
    return [replace(lin, node=_Named(lin.node.name), weight=None, act=None, norm=None) for lin in structure.linears]


def weight_matrix(lin: Linear) -> np.ndarray:
    """The weight as the op consumes it ([K, N] for MatMul, [N, K] for Gemm transB=1)."""
    return Graph.materialize(lin.weight)

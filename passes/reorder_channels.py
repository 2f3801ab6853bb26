"""Activation-aware channel reordering (QServe): cluster outlier input channels into the same groups, exactly.

A permutation P of a linear's input channels, applied also to the output channels of what produces that
input, changes no output: ``Y = X·W = (X·P)·(Pᵀ·W)``. Channels are ordered by calibrated ``max|x|``,
largest first, so the outlier channels of a layer land in its first quantization groups instead of
spreading one per group — what per-group quantizers along K (4-bit weights in blocks, per-group
activations) then exploit.

* ``down`` / ``fc2`` (input ``silu(gate) ⊙ up`` or ``act(fc1)``): any permutation — the output columns of
  gate and up (or fc1) and their biases are permuted, the rows of down follow;
* ``o`` (input: the attention context, heads side by side): channels move only inside a head, by one
  permutation per kv head (the query heads of a GQA group read the same value head), applied to the value
  projection's output columns; heads do not move (that would need q, k and v permuted together).

Declines: producers it cannot permute (shared weights, an elementwise op other than the activation
product between them, e.g. a split-outliers mask), excluded layers, and ``o`` where the values are also a
graph output (a KV-cache decoder's ``present`` values: the cache would change layout, and a cache written
by the original model, or read by another program, would no longer fit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import Linear
from .select import selected_linears
from .smooth_attention import fused_parts
from .smooth_quant import _bias_after, _private_weight, _swap_input, _weight, head_dim, reshape_target_tail

__all__ = ["ReorderChannelsPass"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = {"Mul", "Sigmoid", "Tanh", "Erf", "Div", "Add", "Relu", "Gelu", "FastGelu", "Softplus", "Pow",
                "HardSigmoid", "HardSwish", "Identity", "Cast"}


def _feeding_linears(tensor: gs.Tensor, width: int, by_output: dict, depth: int = 12):
    """What feeds ``tensor`` through per-element ops only: (linear names, per-channel constants on the way),
    or the reason it cannot be permuted."""
    found, constants, on_path, frontier = set(), [], set(), [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            if t.name in by_output:
                found.add(by_output[t.name].name)
                continue
            if isinstance(t, gs.Constant):
                size = np.asarray(t.values).size
                if size == width and np.asarray(t.values).shape[-1] == width:
                    constants.append(t)  # e.g. smooth-quant's explicit 1/s
                elif size != 1:
                    return f"constant {t.name} of shape {list(t.shape)} on the way"
                continue
            node = Graph.producer(t)
            if node is None:
                return "reaches a graph input"
            if node.op == "Reshape" and reshape_target_tail(node)[0] == width:  # token axes only
                on_path.add(id(node))
                nxt.append(node.inputs[0])
                continue
            if node.op not in _ELEMENTWISE:
                return f"{node.op} between the producing linears and the input"
            on_path.add(id(node))
            nxt.extend(node.inputs)
        frontier = nxt
        if not frontier:
            break
    if frontier or not found:
        return "producing linears not found"
    return found, constants, on_path


def _scalings_since(tensor: gs.Tensor, context: gs.Node, width: int):
    """Per-channel constants of ``Mul`` nodes between the attention context MatMul and ``tensor`` (e.g.
    smooth-quant's explicit 1/s), or None if anything but those and the head merge lies between."""
    consts, t = [], tensor
    for _ in range(8):
        node = Graph.producer(t)
        if node is None:
            return None
        if node is context:
            return consts
        if node.op in ("Reshape", "Transpose"):
            t = node.inputs[0]
        elif node.op == "Mul" and any(isinstance(i, gs.Constant) for i in node.inputs):
            c = next(i for i in node.inputs if isinstance(i, gs.Constant))
            size = np.asarray(c.values).size
            if size == width:
                consts.append(c)
            elif size != 1:
                return None
            t = next(i for i in node.inputs if not isinstance(i, gs.Constant))
        else:
            return None
    return None


def _downstream(tensor: gs.Tensor, on_path: set) -> list:
    """The consumers of ``tensor`` and, through the nodes on the path, of what they produce."""
    out, frontier = [], [tensor]
    while frontier:
        t = frontier.pop()
        for c in t.outputs:
            out.append(c)
            if id(c) in on_path:
                frontier.extend(c.outputs)
    return out


def _reaches_output(tensor: gs.Tensor, outputs: set, stop: gs.Node, depth: int = 8) -> bool:
    """Whether ``tensor``, or what nodes short of ``stop`` make of it within ``depth`` steps, is a graph output."""
    frontier, seen = [tensor], set()
    for _ in range(depth):
        nxt = []
        for t in frontier:
            if t.name in outputs:
                return True
            for c in t.outputs:
                if c is not stop and id(c) not in seen:
                    seen.add(id(c))
                    nxt.extend(c.outputs)
        frontier = nxt
    return any(t.name in outputs for t in frontier)


def _groups_spanned(absmax: np.ndarray, order: np.ndarray, group: int, top: int) -> int:
    """How many ``group``-wide blocks of the input (in ``order``) hold the ``top`` largest channels."""
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    biggest = np.argsort(-absmax, kind="stable")[:top]
    return len(set((rank[biggest] // group).tolist()))


class ReorderChannelsPass(Pass):
    """Permute the input channels of o / down (and their producers' outputs) by calibrated max|x|."""

    name = "reorder-channels"
    phase = "transform"
    changes_activations = True
    exact = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        roles: tuple = ("o", "down", "fc2")
        group_size: int = 32  # only for the report: how many groups the outlier channels span

        def __post_init__(self):
            object.__setattr__(self, "roles", tuple(self.roles))
            if set(self.roles) - {"o", "down", "fc2"}:
                raise ValueError("reorder-channels handles roles o, down and fc2")
            if self.group_size < 1:
                raise ValueError("group_size must be ≥ 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        structure = ctx.structure(graph)
        by_output = {lin.node.outputs[0].name: lin for lin in structure.linears}
        by_role_layer = {(lin.role, lin.layer): lin for lin in structure.linears}
        blocks = {b["layer"]: b for b in structure.attention}
        nodes = graph.node_by_name()
        outputs = {t.name for t in graph.gs.outputs}
        plans = []
        for lin in selected_linears(structure, ctx, self.name, self.options.roles, "weight", rescales_input=True):
            plan = self._plan(lin, by_output, by_role_layer, blocks, nodes, outputs)
            if isinstance(plan, str):
                ctx.decline(self.name, lin.name, plan)
            else:
                plans.append((lin, plan))
        if not plans:
            return PassResult(False, {"reordered": 0})
        stats = ctx.activation_stats(graph, sorted({lin.act.name for lin, _ in plans}))
        for lin, (kind, producers, head) in plans:
            absmax = stats[lin.act.name].channel_absmax.astype(np.float64)
            if kind == "o":
                order_in, order_prod = self._head_orders(absmax, *head)
            else:
                order_in = order_prod = np.argsort(-absmax, kind="stable")
            self._permute_rows(graph, lin, order_in)
            for p in producers:
                if isinstance(p, gs.Constant):  # on the input side of lin: its channel order is lin's
                    self._permute_constant(graph, lin, p, order_in)
                elif isinstance(p, tuple):  # (value projection, first column, end column, tensor)
                    v, start, stop, _ = p
                    full = np.arange(v.out_features)
                    full[start:stop] = start + order_prod
                    self._permute_columns(graph, v, full)
                else:
                    self._permute_columns(graph, p, order_prod)
            top = max(1, len(absmax) // 100)
            g = self.options.group_size
            ctx.record(lin.name, reorder_kind=kind,
                       outlier_groups_before=_groups_spanned(absmax, np.arange(len(absmax)), g, top),
                       outlier_groups_after=_groups_spanned(absmax, order_in, g, top), outlier_channels=top)
        return PassResult(True, {"reordered": len(plans)})

    def _plan(self, lin: Linear, by_output: dict, by_role_layer: dict, blocks: dict, nodes: dict, outputs: set):
        if lin.role == "o":
            v = by_role_layer.get(("v", lin.layer))
            if v is not None:
                side = (v, 0, v.out_features, v.node.outputs[0])
            elif ("qkv", lin.layer) in by_role_layer and lin.layer in blocks:
                parts = fused_parts(by_role_layer[("qkv", lin.layer)], {"v": (nodes[blocks[lin.layer]["context"]], 1)})
                if isinstance(parts, str):
                    return parts
                p = parts["v"]
                side = (p.lin, p.start, p.stop, p.tensor)
            else:
                return "no value projection found for this attention block"
            if not _private_weight(side[0]):
                return "the value projection's weight is shared"
            context = nodes[blocks[lin.layer]["context"]] if lin.layer in blocks else None
            if _reaches_output(side[3], outputs, context):
                return ("the values are a graph output (a KV cache): permuting their channels would change the "
                        "cache's layout")
            width = side[2] - side[1]
            d = head_dim(side[3])
            if d is None or lin.in_features % width or width % d:
                return "head layout of the attention context not found"
            consts = _scalings_since(lin.act, context, lin.in_features) if context is not None else None
            if consts is None:
                return "an op other than a head merge or a constant scaling between the context and o"
            return "o", [side] + consts, (lin.in_features // width, d)
        feeders = _feeding_linears(lin.act, lin.in_features, by_output)
        if isinstance(feeders, str):
            return f"input is not a per-element function of the producing linears: {feeders}"
        names, constants, on_path = feeders
        producers = [lin2 for lin2 in by_output.values() if lin2.name in names]
        if any(not _private_weight(p) for p in producers):
            return "a producing linear's weight is shared"
        if any(p.out_features != lin.in_features for p in producers):
            return "producing linears do not match the input width"
        # every tensor between the producers and the input must be read only on the way (a split-outliers
        # side branch reading the product, for one, would see permuted channels)
        for p in producers:
            if any(id(c) not in on_path and c is not lin.node and c.op not in ("Shape", "Size")
                   for c in _downstream(p.node.outputs[0], on_path)):
                return "an intermediate tensor is also read outside the path (e.g. a split-outliers branch)"
        return "mlp", producers + constants, None

    @staticmethod
    def _head_orders(absmax: np.ndarray, group: int, d: int) -> tuple:
        """Per kv head, one order of its D channels (by the max over its query heads); the o-row order."""
        per_kv = absmax.reshape(-1, group, d).max(axis=1)  # [kv heads, D]
        orders = np.argsort(-per_kv, axis=1, kind="stable")
        kv = per_kv.shape[0]
        v_order = (orders + (np.arange(kv) * d)[:, None]).reshape(-1)
        o_order = np.concatenate([orders[h // group] + h * d for h in range(kv * group)])
        return o_order, v_order

    def _permute_rows(self, graph: Graph, lin: Linear, order: np.ndarray) -> None:
        w = _weight(lin)
        w = w[order, :] if lin.weight_axis == 1 else w[:, order]
        lin.node.inputs[1] = graph.make_constant(f"{lin.name}.weight_reordered", np.ascontiguousarray(w), self.name)

    def _permute_constant(self, graph: Graph, lin: Linear, const: gs.Constant, order: np.ndarray) -> None:
        new = graph.make_constant(f"{lin.name}.channel_constant_reordered",
                                  np.ascontiguousarray(np.asarray(const.values)[..., order]), self.name)
        for consumer in list(const.outputs):
            _swap_input([consumer], const, new)

    def _permute_columns(self, graph: Graph, lin: Linear, order: np.ndarray) -> None:
        w = _weight(lin)
        w = w[:, order] if lin.weight_axis == 1 else w[order, :]
        lin.node.inputs[1] = graph.make_constant(f"{lin.name}.weight_reordered", np.ascontiguousarray(w), self.name)
        bias = _bias_after(lin)
        if bias is not None:
            node, const = bias
            _swap_input([node], const, graph.make_constant(f"{lin.name}.bias_reordered",
                                                           np.asarray(const.values)[order], self.name))

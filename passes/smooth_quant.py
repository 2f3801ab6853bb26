"""SmoothQuant: move activation outliers into the weights, exactly.

``Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W)`` with, per input channel j (SmoothQuant, Xiao et al. 2023, eq. 4)

    s_j = max|X_j|^α / max|W_j|^(1−α),   clamped to ≥ 1e-5

``diag(s)`` is folded into the rows (input channels) of every linear reading X; ``diag(s)⁻¹`` into what
produces X:

* RMSNorm / LayerNorm: ``γ' = γ / s`` (and ``β' = β / s``) — a new constant for this norm, so a weight that
  an exporter de-duplicated across layers is never changed for the others — only when the group's linears
  are the norm output's only readers: in a post-LN block (BERT, OPT-350m) the norm's output is also the
  residual stream, which the fold would rescale too, so there the explicit ``Mul`` below is used;
* attention output (``X_o = P·V``): the columns of ``W_v`` (and its bias) are divided by ``s``; each head's
  channels read their own kv head, so under GQA ``s`` is tied across the query heads of a group;
* SwiGLU product (``X_d = silu(gate) ⊙ up``): the columns of ``W_up`` (and its bias) are divided by ``s``,
  when up's output reaches nothing but that product and the product nothing but the group;
* anything else (e.g. after GELU): an explicit ``Mul(X, 1/s)`` is inserted and the report says so.

α is fixed, or searched per group over a grid, minimising ``Σ‖X·W − Q(X/s)·Q(s·W)‖²`` over the group's
linears on a calibration batch (per-tensor INT8 activations, per-channel INT8 weights). The pass changes
activations, so calibration statistics are recollected afterwards (never reused stale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import FLOAT_BRANCH, ROLE_KEY, TRANSPARENT_OPS, Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import Linear, weight_matrix
from .qdq_math import fake_quant, weight_scales
from .select import selected_linears

__all__ = ["FoldSmoothQuantScalesPass"]

logger = logging.getLogger(__name__)

GROUP_OF_ROLE = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "gate": "gate_up", "up": "gate_up",
                 "fc1": "gate_up", "o": "o", "down": "down", "fc2": "down"}


def _in_axis(lin: Linear) -> int:
    """Axis of the input channels in the weight as consumed."""
    return 1 - lin.weight_axis


def _weight(lin: Linear) -> np.ndarray:
    """The weight the linear's node reads now (an earlier group of this pass may have replaced it)."""
    w = lin.node.inputs[1]
    return np.asarray(w.values, dtype=np.float32) if isinstance(w, gs.Constant) else weight_matrix(lin).astype(np.float32)


def _row_absmax(lin: Linear) -> np.ndarray:
    return np.abs(_weight(lin)).max(axis=lin.weight_axis)


def _scale_rows(lin: Linear, s: np.ndarray) -> np.ndarray:
    return _weight(lin) * (s[:, None] if _in_axis(lin) == 0 else s[None, :])


def _private_weight(lin: Linear) -> bool:
    """True when the weight the linear reads now is a constant read by this linear only, with no ops between."""
    w = lin.node.inputs[1]
    return isinstance(w, gs.Constant) and len(w.outputs) == 1


def reshape_target_tail(node: gs.Node) -> tuple:
    """(last dimension, rank) of a Reshape's target shape — a constant, or ``Concat(..., [D])`` built at run
    time — or (None, 0) when it cannot be read."""
    shape = node.inputs[1]
    if isinstance(shape, gs.Constant):
        dims = np.asarray(shape.values).reshape(-1)
        rank = dims.size
    else:
        concat = Graph.producer(shape)
        if concat is None or concat.op != "Concat" or not isinstance(concat.inputs[-1], gs.Constant):
            return None, 0
        dims, rank = np.asarray(concat.inputs[-1].values).reshape(-1), len(concat.inputs)
    return (int(dims[-1]), rank) if dims.size else (None, 0)


def head_dim(tensor: gs.Tensor) -> int | None:
    """The head size D from the first Reshape splitting ``tensor`` into heads ([.., heads, D]), looking through
    Split, Identity and Cast (a fused qkv projection's parts)."""
    queue = [tensor]
    while queue:
        for consumer in queue.pop(0).outputs:
            if consumer.op == "Reshape":
                last, rank = reshape_target_tail(consumer)
                if last is not None and rank >= 3 and last > 0:
                    return last
            elif consumer.op in ("Split", "Identity", "Cast"):
                queue.extend(consumer.outputs)
    return None


def _head_dim(v: Linear) -> int | None:
    """The head size D of v's output, if it divides v's width."""
    d = head_dim(v.node.outputs[0])
    return d if d is not None and v.out_features % d == 0 else None


def _bias_after(lin: Linear):
    """The constant bias of an ``Add`` right after the linear (a Gemm's C), if any: (node, constant)."""
    if lin.node.op == "Gemm" and len(lin.node.inputs) > 2 and isinstance(lin.node.inputs[2], gs.Constant):
        return lin.node, lin.node.inputs[2]
    consumers = lin.node.outputs[0].outputs
    if len(consumers) == 1 and consumers[0].op == "Add":
        consts = [t for t in consumers[0].inputs if isinstance(t, gs.Constant)]
        if len(consts) == 1 and consts[0].values.ndim == 1:
            return consumers[0], consts[0]
    return None


class FoldSmoothQuantScalesPass(Pass):
    """Smooth the inputs of linear groups and fold the scales into neighbouring constants.

    Handles: norm → q/k/v (or fused qkv), norm → gate/up (or fc1), v → o (with GQA tying), up → down;
    otherwise an explicit Mul. Declines: groups whose linear weights are shared outside the group or
    reached through other ops ("initializer shared outside the match"), excluded layers, groups with no
    calibrated range.
    """

    name = "smooth-quant"
    phase = "transform"
    changes_activations = True
    exact = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5
        group_alpha: tuple = ()  # per smoothing group, e.g. {down: 0.8}: overrides alpha for that group
        alpha_grid: tuple = ()  # non-empty: search α per group over these values
        groups: tuple = ("qkv", "gate_up", "o", "down")
        fallback_mul: bool = True

        def __post_init__(self):
            pairs = self.group_alpha.items() if isinstance(self.group_alpha, dict) else self.group_alpha
            object.__setattr__(self, "group_alpha", tuple(sorted((str(g), float(a)) for g, a in pairs)))
            object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
            object.__setattr__(self, "groups", tuple(self.groups))
            if {g for g, _ in self.group_alpha} - {"qkv", "gate_up", "o", "down"}:
                raise ValueError("group_alpha keys are smoothing groups: qkv, gate_up, o, down")
            for a in (self.alpha, *self.alpha_grid, *(a for _, a in self.group_alpha)):
                if not 0.0 <= a <= 1.0:
                    raise ValueError(f"alpha must be in [0, 1], got {a}")
            unknown = set(self.groups) - {"qkv", "gate_up", "o", "down"}
            if unknown:
                raise ValueError(f"unknown smoothing group(s) {sorted(unknown)}; use qkv, gate_up, o, down")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        structure = ctx.structure(graph)
        roles = tuple(r for r, g in GROUP_OF_ROLE.items() if g in o.groups)
        groups: dict = {}
        for lin in selected_linears(structure, ctx, self.name, roles, "weight", rescales_input=True):
            groups.setdefault(lin.act.name, []).append(lin)
        plans = []
        for name, members in sorted(groups.items(), key=lambda kv: kv[1][0].name):
            reason = next((f"initializer of {m.name} shared outside the group" for m in members if not _private_weight(m)), None)
            if reason is None and len({m.in_features for m in members}) != 1:
                reason = "linears reading one tensor disagree on its width"
            if reason:
                for m in members:
                    ctx.decline(self.name, m.name, reason)
                continue
            plans.append((name, members))
        if not plans:
            return PassResult(False, {"smoothed_groups": 0})
        samples = self._samples(graph, ctx, [n for n, _ in plans]) if self._needs_samples() else {}
        channel_absmax = self._channel_absmax(graph, ctx, [n for n, _ in plans], samples)
        by_role_layer = {(lin.role, lin.layer): lin for lin in structure.linears}
        readers = _Readers(frozenset(t.name for t in graph.gs.outputs),
                           frozenset(n for n, md in graph.node_metadata.items() if md.get(ROLE_KEY) == FLOAT_BRANCH))
        counts: dict = {}
        iterator = ctx.progress(plans, self.name) if ctx.progress else plans
        for name, members in iterator:
            x_max = channel_absmax[name].astype(np.float64)
            fold = self._fold_target(members, by_role_layer, readers)
            tie = fold[2] if fold and fold[0] == "v" else None
            if fold is None and not o.fallback_mul:
                for m in members:
                    ctx.decline(self.name, m.name, "nothing can absorb 1/s and fallback_mul is off")
                continue
            s, s_fold, record = self._group_scales(members, x_max, samples.get(name), tie)
            how = self._apply(graph, members, s, s_fold, fold)
            counts[how] = counts.get(how, 0) + 1
            after = x_max / s
            for m in members:
                ctx.record(m.name, **record, smooth_fold=how,
                           outlier_ratio_before=float(x_max.max() / max(np.median(x_max), 1e-12)),
                           outlier_ratio_after=float(after.max() / max(np.median(after), 1e-12)))
            self._after_group(graph, ctx, members, samples.get(name), s)
            samples.pop(name, None)  # a group's sample (AWQ: its Gram matrix, 0.8 GB at 14336 channels) ends here
        return PassResult(bool(counts), {"smoothed_groups": sum(counts.values()), "folded_into": counts})

    # ---- the scale rule (subclasses replace these) ----
    def _needs_samples(self) -> bool:
        return bool(self.options.alpha_grid)

    def _samples(self, graph: Graph, ctx: PassContext, names: list) -> dict:
        return ctx.activation_sample(graph, names)

    def _channel_absmax(self, graph: Graph, ctx: PassContext, names: list, samples: dict) -> dict:
        return {name: st.channel_absmax for name, st in ctx.activation_stats(graph, names).items()}

    def _group_scales(self, members: list, x_max: np.ndarray, sample, tie) -> tuple:
        """(s for the consumers' rows, s for the producer's columns, what to record per linear)."""
        alpha = self._choose_alpha(members, x_max, sample, tie)
        s, s_fold = self._scales(members, x_max, alpha, tie)
        return s, s_fold, {"smooth_alpha": alpha}

    def _after_group(self, graph: Graph, ctx: PassContext, members: list, sample, s: np.ndarray) -> None:
        """Hook run after a group's scales are folded (AWQ clips the scaled weights here)."""

    # ---- planning ----
    @staticmethod
    def _fold_target(members: list, by_role_layer: dict, readers: _Readers):
        lin = members[0]
        if lin.norm is not None:
            return ("norm", lin.norm, None) if readers.only_group(lin.norm.node.outputs[0], members) else None
        if lin.layer is None:
            return None
        if lin.role == "o":
            v = by_role_layer.get(("v", lin.layer))
            if v is not None and _private_weight(v) and lin.in_features % v.out_features == 0:
                d = _head_dim(v)
                if d is not None:
                    return ("v", v, (lin.in_features // v.out_features, d))
        if lin.role == "down":
            up = by_role_layer.get(("up", lin.layer))
            if (up is not None and _private_weight(up) and up.out_features == lin.in_features
                    and readers.only_into_group(up, members)):
                return ("up", up, None)
        return None

    @staticmethod
    def _scales(members: list, x_max: np.ndarray, alpha: float, tie) -> tuple:
        """(s for the consumers' rows, s for the producer's columns) — equal unless tied across GQA heads."""
        w_max = np.max([_row_absmax(m) for m in members], axis=0).astype(np.float64)
        if tie is not None:  # o's channel (h·D + d) reads kv head h // g: one scale per (kv head, d)
            x_max, w_max = _tie(x_max, *tie), _tie(w_max, *tie)
        s = np.power(np.maximum(x_max, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1.0 - alpha)
        s = np.where(x_max > 0, np.maximum(s, 1e-5), 1.0).astype(np.float32)
        return (_untie(s, *tie), s) if tie is not None else (s, s)

    def _choose_alpha(self, members: list, x_max: np.ndarray, sample, tie) -> float:
        o = self.options
        if not o.alpha_grid or sample is None:
            return dict(o.group_alpha).get(GROUP_OF_ROLE.get(members[0].role), o.alpha)
        x = sample.reshape(-1, sample.shape[-1]).astype(np.float32)
        refs = [x @ _oriented(m, _weight(m)) for m in members]
        best, best_err = o.alpha, np.inf
        for alpha in o.alpha_grid:
            s, _ = self._scales(members, x_max, alpha, tie)
            xs = x / s
            xq = fake_quant(xs, np.float32(np.abs(xs).max() / 127 or 1.0), None, 8, narrow=False)
            err = 0.0
            for m, ref in zip(members, refs):
                w = _oriented(m, _scale_rows(m, s))
                wq = fake_quant(w, weight_scales(w, 1, 8), 1, 8)
                err += float(np.sum((ref - xq @ wq) ** 2))
            if err < best_err:
                best, best_err = alpha, err
        return best

    # ---- rewriting ----
    def _apply(self, graph: Graph, members: list, s: np.ndarray, s_fold: np.ndarray, fold) -> str:
        kind = fold[0] if fold else None
        for m in members:
            m.node.inputs[1] = graph.make_constant(f"{m.name}.weight_smoothed", _scale_rows(m, s), self.name)
        inv = (1.0 / s).astype(np.float32)
        if kind == "norm":
            norm = fold[1]
            nodes = [norm.node] + [Graph.producer(t) for t in norm.node.inputs if Graph.producer(t) is not None]
            for const, label in ((norm.weight, "gamma"), (norm.bias, "beta")):
                if const is not None:
                    new = graph.make_constant(f"{members[0].name}.norm_{label}_smoothed",
                                              (np.asarray(const.values, np.float32) * inv).astype(np.float32), self.name)
                    _swap_input(nodes, const, new)
            return norm.kind
        if kind in ("v", "up"):
            producer: Linear = fold[1]
            cols = (1.0 / s_fold).astype(np.float32)
            w = _weight(producer) * (cols[None, :] if producer.weight_axis == 1 else cols[:, None])
            producer.node.inputs[1] = graph.make_constant(f"{producer.name}.weight_smoothed", w, self.name)
            bias = _bias_after(producer)
            if bias is not None:
                node, const = bias
                _swap_input([node], const, graph.make_constant(f"{producer.name}.bias_smoothed",
                                                               np.asarray(const.values, np.float32) * cols, self.name))
            return kind
        x = members[0].act
        scaled = graph.make_node("Mul", [x, graph.make_constant(f"{members[0].name}.smooth_inv_scale", inv, self.name)],
                                 f"{members[0].name}.smoothed_input", self.name, out_dtype=np.float32)
        for m in members:
            m.node.inputs[0] = scaled
        return "mul"


@dataclass(frozen=True)
class _Readers:
    """Who reads a tensor, for deciding whether a fold may rescale it: the graph's output names (a fold
    would change them for the caller) and the float side branches split-outliers made (they read only
    channels whose smoothing scale is 1, their statistic being zero in the masked input)."""

    outputs: frozenset
    branches: frozenset

    def of(self, tensor: gs.Tensor) -> list | None:
        """The nodes reading ``tensor`` through value-preserving ops and constant per-element scalings
        (which commute with a per-channel scale), side branches excepted; None if it reaches a graph output."""
        out, queue = [], [tensor]
        while queue:
            t = queue.pop()
            if t.name in self.outputs:
                return None
            for c in t.outputs:
                if c.name in self.branches:
                    continue
                if (c.op in TRANSPARENT_OPS or c.op in ("QuantizeLinear", "DequantizeLinear", "Gather")
                        or (c.op == "Mul" and any(isinstance(i, gs.Constant) for i in c.inputs))):
                    queue.extend(c.outputs)
                else:
                    out.append(c)
        return out

    def only_group(self, tensor: gs.Tensor, members: list) -> bool:
        """Whether the group's linears are all that reads ``tensor`` (so scaling it scales nothing else)."""
        readers = self.of(tensor)
        return readers is not None and {id(n) for n in readers} <= {id(m.node) for m in members}

    def only_into_group(self, up: Linear, members: list) -> bool:
        """up's output reaches one elementwise product, and that product reaches only the group."""
        readers = self.of(up.node.outputs[0])
        if readers is None or len(readers) != 1 or readers[0].op != "Mul":
            return False
        return self.only_group(readers[0].outputs[0], members)


def _oriented(lin: Linear, w: np.ndarray) -> np.ndarray:
    """The weight as ``[K, N]`` whatever the op's layout."""
    return w if lin.weight_axis == 1 else w.T


def _tie(v: np.ndarray, g: int, d: int) -> np.ndarray:
    """[heads·D] → [kv_heads·D] taking the max over the g query heads of each kv head."""
    return v.reshape(-1, g, d).max(axis=1).reshape(-1)


def _untie(v: np.ndarray, g: int, d: int) -> np.ndarray:
    """[kv_heads·D] → [heads·D]: each query head of a group takes its kv head's values."""
    return np.repeat(v.reshape(-1, 1, d), g, axis=1).reshape(-1)


def _swap_input(nodes: list, old: gs.Tensor, new: gs.Tensor) -> None:
    for node in nodes:
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new

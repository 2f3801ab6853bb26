"""SmoothAttention (QServe / QoQ, Lin et al. 2024): move key outliers into the queries, exactly.

Attention scores are ``q·kᵀ`` per head. For a per-channel scale ``λ`` of the head dimension,
``(q·diag(λ))·(k·diag(λ)⁻¹)ᵀ = q·kᵀ``, so dividing the key channels by ``λ`` and multiplying the query channels
by it changes no score, while the keys — what a KV cache stores and quantizes — lose their outlier channels.
Per key channel i (QServe, α = 0.5 by default):

    λ_i = max|K_i|^α,   clamped to ≥ 1e-5

The scales are folded into the output channels (columns) of ``W_k`` and ``W_q`` (and their biases), i.e.
*before* the rotary embedding. RoPE rotates channel pairs — (i, i + D/2) in the rotate-half form, (2i, 2i+1)
in the interleaved form — with the same angle, so it commutes with ``diag(λ)`` only when λ is equal on
both channels of every pair: λ is tied across each pair (max over the pair) before folding. Under GQA
each query head reads its kv head's keys, so a query head takes its kv head's λ.

Declines (with the reason in the report): fused projections the pass cannot split into q and k columns,
anything between the projections and the scores that does not commute with a per-channel scale (a q/k
norm, an unrecognised rotary form), weights shared outside the block, excluded layers.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import Linear
from .smooth_quant import _bias_after, _private_weight, _swap_input, _weight, head_dim

__all__ = ["FoldSmoothAttentionScalesPass", "fused_parts"]

logger = logging.getLogger(__name__)

# ops that commute with a per-channel scale of the head dimension (given pair-tied λ for the rotary ones)
_COMMUTING = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile", "Identity", "Cast", "Slice",
              "Neg", "Concat", "Mul", "Add", "Sub", "Split", "Div"}
_SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class _Side:
    """The output columns of one linear that carry the queries (or the keys) of one attention block."""
    lin: Linear
    start: int
    stop: int
    tensor: gs.Tensor  # where these columns flow on their own (the linear's output, or a Split output)


def _split_sizes(node: gs.Node, width: int):
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(v) for v in np.asarray(node.inputs[1].values).reshape(-1)]
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    return [width // n] * n if width % n == 0 else None


def _reaches(tensor: gs.Tensor, target: gs.Node, index: int, limit: int = 64) -> bool:
    """Whether ``tensor`` flows into input ``index`` of ``target`` (walking data edges forward)."""
    queue, seen = deque([tensor]), set()
    while queue and len(seen) < limit:
        t = queue.popleft()
        for c in t.outputs:
            if c is target and any(inp is t for inp in c.inputs[index:index + 1]):
                return True
            if id(c) in seen or c.op in _SHAPE_ONLY or c.op in ("MatMul", "Softmax"):
                continue
            seen.add(id(c))
            queue.extend(c.outputs)
    return False


def _path_ops(tensor: gs.Tensor, score: gs.Node, limit: int = 64) -> list:
    """The nodes between ``tensor`` and the score MatMul (shape-only consumers skipped)."""
    out, queue, seen = [], deque([tensor]), set()
    while queue and len(seen) < limit:
        for c in queue.popleft().outputs:
            if c is score or id(c) in seen or c.op in _SHAPE_ONLY:
                continue
            seen.add(id(c))
            out.append(c)
            if c.op not in ("MatMul", "Softmax"):
                queue.extend(c.outputs)
    return out


def _rotary_pairing(ops: list, d: int) -> str | None:
    """'half' (rotate-half RoPE), 'interleaved', 'none' (no rotary), or None (a rotary form not recognised)."""
    half = interleaved = False
    for node in ops:
        if node.op != "Slice":
            continue
        consts = [np.asarray(t.values).reshape(-1) if isinstance(t, gs.Constant) else None for t in node.inputs[1:]]
        starts, ends = consts[0], consts[1] if len(consts) > 1 else None
        steps = consts[3] if len(consts) > 3 else None
        if steps is not None and np.any(steps == 2):
            interleaved = True
        elif any(v is not None and np.any(v == d // 2) for v in (starts, ends)):
            half = True
    if half and not interleaved:
        return "half"
    if interleaved and not half:
        return "interleaved"
    if half or interleaved or any(n.op == "Neg" for n in ops):
        return None
    return "none"


def _tie_pairs(lam: np.ndarray, d: int, pairing: str) -> np.ndarray:
    """λ over [kv_heads·D] made equal on the two channels of every rotary pair (max of the pair)."""
    heads = lam.reshape(-1, d)
    if pairing == "half":
        m = np.maximum(heads[:, :d // 2], heads[:, d // 2:])
        heads = np.concatenate([m, m], axis=1)
    elif pairing == "interleaved":
        m = np.maximum(heads[:, 0::2], heads[:, 1::2])
        heads = np.repeat(m, 2, axis=1)
    return heads.reshape(-1)


def fused_parts(lin: Linear, targets: dict):
    """Column ranges of a fused projection, from the Split that separates its parts: ``{part: _Side}`` for
    ``targets`` = ``{part: (node, input index)}`` naming where each part must flow (e.g. k into the
    scores' second input), or the reason they cannot be told apart."""
    queue, split = deque([lin.node.outputs[0]]), None
    while queue and split is None:
        for c in queue.popleft().outputs:
            if c.op == "Split":
                split = c
            elif c.op in ("Reshape", "Identity", "Cast"):
                queue.extend(c.outputs)
    if split is None or int(split.attrs.get("axis", 0)) not in (-1, len(split.inputs[0].shape or [0, 0, 0]) - 1):
        return "fused qkv projection without a Split on its last axis"
    sizes = _split_sizes(split, lin.out_features)
    if sizes is None or sum(sizes) != lin.out_features:
        return "fused qkv Split sizes not known"
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = {}
    for part, (node, index) in targets.items():
        hits = [i for i, t in enumerate(split.outputs) if _reaches(t, node, index)]
        if len(hits) != 1:
            return f"fused qkv Split outputs do not map to one {part} part"
        i = hits[0]
        parts[part] = _Side(lin, int(offsets[i]), int(offsets[i + 1]), split.outputs[i])
    if len({p.start for p in parts.values()}) != len(parts):
        return "fused qkv Split outputs do not map to distinct parts"
    return parts


class FoldSmoothAttentionScalesPass(Pass):
    """Scale key channels down and query channels up by λ, folded into W_k / W_q before RoPE.

    Handles: separate q and k projections, or a fused qkv projection split into q, k, v by a Split; MHA and
    GQA; rotate-half and interleaved RoPE, or none. Declines: what the module docstring lists.
    """

    name = "smooth-attention"
    phase = "transform"
    changes_activations = True
    exact = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        structure = ctx.structure(graph)
        by_node = {lin.node.name: lin for lin in structure.linears}
        nodes = graph.node_by_name()
        plans = []
        for block in structure.attention:
            where = f"layers.{block['layer']}.attn"
            plan = self._plan(block, by_node, nodes)
            if isinstance(plan, str):
                ctx.decline(self.name, where, plan)
                continue
            if any(ctx.exclude(side.lin.name, side.lin.node.name) for side in plan[:2]):
                ctx.decline(self.name, where, "excluded by --exclude")
                continue
            plans.append((where, plan))
        if not plans:
            return PassResult(False, {"smoothed_blocks": 0})
        stats = ctx.activation_stats(graph, sorted({p[1].lin.node.outputs[0].name for _, p in plans}))
        for where, (q, k, d, group, pairing) in plans:
            k_max = stats[k.lin.node.outputs[0].name].channel_absmax[k.start:k.stop].astype(np.float64)
            lam = np.power(np.maximum(k_max, 1e-12), self.options.alpha)
            lam = np.where(k_max > 0, np.maximum(lam, 1e-5), 1.0)
            lam = _tie_pairs(lam, d, pairing).astype(np.float32)
            lam_q = np.repeat(lam.reshape(-1, 1, d), group, axis=1).reshape(-1)
            self._scale_columns(graph, q, lam_q)
            self._scale_columns(graph, k, (1.0 / lam).astype(np.float32))
            after = k_max / lam
            ctx.record(where, smooth_attention_alpha=self.options.alpha, rotary_pairing=pairing,
                       key_outlier_ratio_before=float(k_max.max() / max(np.median(k_max), 1e-12)),
                       key_outlier_ratio_after=float(after.max() / max(np.median(after), 1e-12)),
                       key_amax_before=float(k_max.max()), key_amax_after=float(after.max()))
        return PassResult(True, {"smoothed_blocks": len(plans)})

    # ---- planning ----
    def _plan(self, block: dict, by_node: dict, nodes: dict):
        """(q side, k side, head dim, query heads per kv head, rotary pairing) or the reason to decline."""
        score = nodes[block["scores"]]
        if "qkv" in block:
            if len(block["qkv"]) != 1:
                return "several fused qkv projections"
            sides = fused_parts(by_node[block["qkv"][0]], {"q": (score, 0), "k": (score, 1)})
            if isinstance(sides, str):
                return sides
            q, k = sides["q"], sides["k"]
        else:
            if len(block.get("q", [])) != 1 or len(block.get("k", [])) != 1:
                return "not exactly one q and one k projection"
            ql, kl = by_node[block["q"][0]], by_node[block["k"][0]]
            q = _Side(ql, 0, ql.out_features, ql.node.outputs[0])
            k = _Side(kl, 0, kl.out_features, kl.node.outputs[0])
        for side in (q, k):
            if not _private_weight(side.lin):
                return f"initializer of {side.lin.name} shared outside the block"
        paths = [_path_ops(side.tensor, score) for side in (q, k)]
        for ops in paths:
            bad = sorted({n.op for n in ops} - _COMMUTING)
            if bad:
                return f"{', '.join(bad)} between the projection and the scores does not commute with a channel scale"
            if any(n.op in ("Add", "Sub") and any(isinstance(t, gs.Constant) for t in n.inputs) for n in ops):
                return "a constant Add between the projection and the scores (a bias after the head split)"
        d = head_dim(k.tensor)
        if d is None or (k.stop - k.start) % d or (q.stop - q.start) % d:
            return "head size not found from the Reshape into heads"
        kv_heads, q_heads = (k.stop - k.start) // d, (q.stop - q.start) // d
        if q_heads % kv_heads:
            return f"{q_heads} query heads do not group over {kv_heads} kv heads"
        pairings = {_rotary_pairing(ops, d) for ops in paths}
        if None in pairings or len(pairings) != 1:
            return "rotary embedding of a form not recognised (neither rotate-half nor interleaved)"
        return q, k, d, q_heads // kv_heads, pairings.pop()

    # ---- rewriting ----
    def _scale_columns(self, graph: Graph, side: _Side, factor: np.ndarray) -> None:
        lin = side.lin
        cols = np.ones(lin.out_features, np.float32)
        cols[side.start:side.stop] = factor
        w = _weight(lin) * (cols[None, :] if lin.weight_axis == 1 else cols[:, None])
        lin.node.inputs[1] = graph.make_constant(f"{lin.name}.weight_attn_smoothed", w.astype(np.float32), self.name)
        bias = _bias_after(lin)
        if bias is not None:
            node, const = bias
            _swap_input([node], const, graph.make_constant(f"{lin.name}.bias_attn_smoothed",
                                                           np.asarray(const.values, np.float32) * cols, self.name))

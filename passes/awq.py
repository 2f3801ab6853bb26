"""AWQ (Lin et al. 2024): activation-aware scales searched for 4-bit weights, then a clipping search.

Same exact rewrite as SmoothQuant — ``X·W = (X·diag(s)⁻¹)·(diag(s)·W)`` with ``1/s`` folded into the norm,
``v`` (tied across GQA heads), ``up``, or an explicit ``Mul`` — but ``s`` is chosen for the weights'
quantizer, not for the activations (which stay float, W4A16). Per group of linears reading one tensor X
(norm → q/k/v, norm → gate/up, v → o, up → down), on a calibration sample of X:

    s(r) = mean|X_j|^r / sqrt(max · min of mean|X|^r),   r = i / grid, i = 0 … grid−1

and r minimises ``Σ_members ‖X·W − (X/s)·Q(diag(s)·W)‖²`` with Q the weight quantizer that follows (4-bit,
group 128, symmetric by default). The error is the group's own linear outputs (the reference measures the
whole attention / MLP block output).

Clip search (after scaling, all linears but q and k): per output channel and input group, the weight range
shrinks by ``1 − i/grid`` for i < ``max_shrink·grid`` (1.0 → 0.55 with the defaults), keeping the one with
the least error of that group's partial output ``X_g·W_g`` on up to ``clip_tokens`` tokens; the weight is
clamped to it in float, so the RTN quantizer that follows (``quantize-weights``) uses the clipped range.

The report records, per linear, the relative output error of plain RTN and of AWQ on the sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..ir.passes import PassContext
from .qdq_math import block_size_for, fake_quant_blocks, relative_error
from .smooth_quant import FoldSmoothQuantScalesPass, _oriented, _tie, _untie, _weight

__all__ = ["ActivationAwareScalesPass", "weight_fake_quant", "clip_search"]

logger = logging.getLogger(__name__)


def weight_fake_quant(w_kn: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Quantize-dequantize a ``[K, N]`` weight with the per-group quantizer ``quantize-weights`` applies."""
    return fake_quant_blocks(w_kn, bits, block_size_for(w_kn.shape[0], group), symmetric)


def clip_search(x: np.ndarray, w_kn: np.ndarray, bits: int, group: int, symmetric: bool, grid: int = 20,
                max_shrink: float = 0.5) -> np.ndarray:
    """Per (input group, output channel) clip ratio minimising the group's partial-output error; returns the
    clamped weight ``[K, N]``."""
    k, n = w_kn.shape
    b = block_size_for(k, group)
    out = w_kn.copy()
    steps = max(1, int(max_shrink * grid))
    for g in range(k // b):
        xg, wg = x[:, g * b:(g + 1) * b], w_kn[g * b:(g + 1) * b]
        ref = xg @ wg
        hi, lo = wg.max(axis=0), wg.min(axis=0)
        best_err = np.full(n, np.inf)
        best = wg
        for i in range(steps):
            ratio = 1.0 - i / grid
            wc = np.clip(wg, lo * ratio, hi * ratio) if not symmetric else \
                np.clip(wg, -np.abs(wg).max(axis=0) * ratio, np.abs(wg).max(axis=0) * ratio)
            q = fake_quant_blocks(wc, bits, b, symmetric)  # one block: a scale per output channel
            err = np.mean((xg @ q - ref) ** 2, axis=0)
            better = err < best_err
            if np.any(better):
                best_err = np.where(better, err, best_err)
                best = np.where(better[None, :], wc, best)
        out[g * b:(g + 1) * b] = best
    return out


class ActivationAwareScalesPass(FoldSmoothQuantScalesPass):
    """AWQ scale search and clip search; folds like ``smooth-quant``. Run ``quantize-weights`` (4-bit,
    per-group, same group and symmetry) after it."""

    name = "awq"
    phase = "transform"
    changes_activations = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        group_size: int = 128
        symmetric: bool = True
        grid: int = 20
        clip: bool = True
        max_shrink: float = 0.5
        clip_tokens: int = 512
        tokens: int = 512  # tokens of the calibration sample the scale search runs on
        groups: tuple = ("qkv", "gate_up", "o", "down")
        fallback_mul: bool = True

        def __post_init__(self):
            object.__setattr__(self, "groups", tuple(self.groups))
            if self.bits not in (4, 8) or self.group_size < 2 or self.grid < 2:
                raise ValueError("bits 4 or 8, group_size ≥ 2, grid ≥ 2")
            if not 0.0 < self.max_shrink < 1.0:
                raise ValueError("max_shrink must be in (0, 1)")
            if set(self.groups) - {"qkv", "gate_up", "o", "down"}:
                raise ValueError("groups are qkv, gate_up, o, down")

    def _needs_samples(self) -> bool:
        return True

    def _sample_rows(self, sample, limit: int) -> np.ndarray:
        x = sample.reshape(-1, sample.shape[-1]).astype(np.float32)
        if len(x) > limit:  # evenly spaced tokens: deterministic
            x = x[np.linspace(0, len(x) - 1, limit).round().astype(int)]
        return x

    def _group_scales(self, members: list, x_max: np.ndarray, sample, tie) -> tuple:
        o = self.options
        x = self._sample_rows(sample, o.tokens)
        mean_abs = np.abs(x).mean(axis=0).astype(np.float64)
        if tie is not None:
            mean_abs = _tie(mean_abs, *tie)
        weights = [_oriented(m, _weight(m)) for m in members]
        refs = [x @ w for w in weights]
        best = (np.inf, 0.0, np.ones(len(mean_abs)))
        for i in range(o.grid):
            r = i / o.grid
            s = np.power(np.maximum(mean_abs, 1e-4), r)
            s = s / np.sqrt(s.max() * s.min())
            s_full = (_untie(s, *tie) if tie is not None else s).astype(np.float32)
            xs = x / s_full
            err = sum(np.sum((ref - xs @ weight_fake_quant(w * s_full[:, None], o.bits, o.group_size, o.symmetric)) ** 2)
                      for w, ref in zip(weights, refs))
            if err < best[0]:
                best = (err, r, s)
        _, r, s = best
        s_fold = s.astype(np.float32)
        s = (_untie(s, *tie) if tie is not None else s).astype(np.float32)
        rtn = [relative_error(ref, x @ weight_fake_quant(w, o.bits, o.group_size, o.symmetric)) for w, ref in zip(weights, refs)]
        self._pending = {m.name: e for m, e in zip(members, rtn)}
        return s, s_fold, {"awq_ratio": r}

    def _after_group(self, graph: Graph, ctx: PassContext, members: list, sample, s: np.ndarray) -> None:
        o = self.options
        x = self._sample_rows(sample, max(o.tokens, o.clip_tokens)) / s  # the input the scaled weights now see
        xc = x[np.linspace(0, len(x) - 1, min(len(x), o.clip_tokens)).round().astype(int)]
        for m in members:
            w = _oriented(m, _weight(m))  # already scaled by s
            ref = x @ w
            if o.clip and m.role not in ("q", "k", "qkv"):
                w = clip_search(xc, w, o.bits, o.group_size, o.symmetric, o.grid, o.max_shrink)
                stored = w if m.weight_axis == 1 else w.T
                m.node.inputs[1] = graph.make_constant(f"{m.name}.weight_clipped", np.ascontiguousarray(stored), self.name)
            err = relative_error(ref, x @ weight_fake_quant(w, o.bits, o.group_size, o.symmetric))
            ctx.record(m.name, weight_out_err_rtn=self._pending.get(m.name), weight_out_err_awq=err,
                       awq_clipped=bool(o.clip and m.role not in ("q", "k", "qkv")))


"""AWQ (Lin et al. 2024): activation-aware scales searched for 4-bit weights, then a clipping search.

Same exact rewrite as SmoothQuant — ``X·W = (X·diag(s)⁻¹)·(diag(s)·W)`` with ``1/s`` folded into the norm,
``v`` (tied across GQA heads), ``up``, or an explicit ``Mul`` — but ``s`` is chosen for the weights'
quantizer, not for the activations (which stay float, W4A16). Per group of linears reading one tensor X
(norm → q/k/v, norm → gate/up, v → o, up → down):

    s(r) = mean|X_j|^r / sqrt(max · min of mean|X|^r),   r = i / grid, i = 0 … grid−1

(with ``duo``, also AutoAWQ's ``mean|X_j|^r / w_mean_j^(1−r)``, ``w_mean`` the mean of ``|w|`` relative to its
group's max: 2 × grid candidates) and r minimises ``Σ_members ‖X·W − (X/s)·Q(diag(s)·W)‖²`` with Q the weight quantizer that follows (4-bit,
group 128, symmetric by default). The error is the group's own linear outputs (the reference measures the
whole attention / MLP block output), taken over **every** calibration token: X's Gram matrix ``XᵀX/n`` and
mean |X| are streamed over all batches, and ``‖X·Δ‖² = Σ Δ ⊙ (XᵀX Δ)`` — K²·N work per candidate instead of
tokens·K·N, so the search uses all tokens and stays fast (a 512-token sample, as before, gave SmolLM2-135M
47.9 at 16 WikiText windows; all 8192 tokens 45.2). K²·N grows fast with size (Llama-3-8B's down
projection: 14336² × 4096 × 40 candidates, 3.4·10¹³ multiply-adds per block), so a group costing more
than ``SEARCH_BUDGET`` per candidate is scored on a seeded sample of its output channels (``search_columns``,
at least 512): every token still counts, and since each output channel's error depends on its own weight
column only (the quantizer's groups run along K), the sampled sum scaled up is an unbiased estimate of the
whole one. Every group of SmolLM2-135M is under the budget and searched whole.

Clip search (after scaling; q and k too unless ``clip_qk`` is off, as the reference has it): per output channel and input group, the weight range
shrinks by ``1 − i/grid`` for i < ``max_shrink·grid`` (1.0 → 0.55 with the defaults; symmetric INT4 shrinks
the step of its −8…7 codes), keeping the one with
the least error of that group's partial output ``X_g·W_g`` (its diagonal block of the Gram matrix); the
weight is clamped to it in float, so the RTN quantizer that follows (``quantize-weights``) uses the clipped
range.

The report records, per linear, the relative output error of plain RTN and of AWQ over the calibration tokens.
All statistics come from one streamed run of the graph as the pass finds it (the float model's inputs, as the
reference searches on float activations); the Gram matrices of the block's groups (float64 while streaming,
float32 above 4096 channels) are the pass's memory peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..ir.passes import PassContext
from .qdq_math import (block_size_for, fake_quant_blocks, fake_quant_progressive, output_error,
                       symmetric_weight_scale, weight_code_range)
from .smooth_quant import GROUP_OF_ROLE, FoldSmoothQuantScalesPass, _oriented, _tie, _untie, _weight

__all__ = ["ActivationAwareScalesPass", "clip_search", "input_accumulator", "stream_inputs", "weight_fake_quant"]

logger = logging.getLogger(__name__)


def weight_fake_quant(w_kn: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Quantize-dequantize a ``[K, N]`` weight with the per-group quantizer ``quantize-weights`` applies."""
    return fake_quant_blocks(w_kn, bits, block_size_for(w_kn.shape[0], group), symmetric)


def clip_search(gram: np.ndarray, w_kn: np.ndarray, bits: int, group: int, symmetric: bool, grid: int = 20,
                max_shrink: float = 0.5) -> np.ndarray:
    """Per (input group, output channel) clip ratio minimising that group's partial-output error
    ``‖X_g (W_g − Q(clip(W_g)))‖²`` (its block of the Gram matrix); returns the clamped weight ``[K, N]``."""
    k, n = w_kn.shape
    b = block_size_for(k, group)
    out = w_kn.copy()
    steps = max(1, int(max_shrink * grid))
    for g in range(k // b):
        rows = slice(g * b, (g + 1) * b)
        gg, wg = gram[rows, rows], w_kn[rows]
        hi, lo = wg.max(axis=0), wg.min(axis=0)
        step = symmetric_weight_scale(lo, hi, bits)
        code_lo, code_hi = weight_code_range(bits)
        best_err = np.full(n, np.inf)
        best = wg
        for i in range(steps):
            ratio = 1.0 - i / grid
            # symmetric: shrink the step and clamp to the codes it reaches (the quantizer then finds that step)
            wc = (np.clip(wg, code_lo * step * ratio, code_hi * step * ratio) if symmetric
                  else np.clip(wg, lo * ratio, hi * ratio))
            err = output_error(gg, wg - fake_quant_blocks(wc, bits, b, symmetric), axis=0)  # one block per column
            better = err < best_err
            if np.any(better):
                best_err = np.where(better, err, best_err)
                best = np.where(better[None, :], wc, best)
        out[rows] = best
    return out


WIDE_CHUNK = 1024  # columns of a wide Gram matrix updated at a time


class _Inputs:
    """What AWQ keeps of one group's input over all calibration tokens: the Gram matrix and mean |x|."""

    def __init__(self, width: int):
        # the running sum in float64 where that is cheap; above 4096 channels in float32, the precision finish()
        # keeps anyway (Llama-3-8B's down projection: 0.8 GB instead of 1.6 GB, and no second copy at finish)
        self.gram = np.zeros((width, width), np.float64 if width <= 4096 else np.float32)
        self.abs_sum = np.zeros(width, np.float64)
        self.abs_max = np.zeros(width, np.float32)
        self.n = 0

    def update(self, value: np.ndarray) -> None:
        x = value.reshape(-1, value.shape[-1]).astype(np.float32)
        if self.gram.dtype == np.float64:
            self.gram += x.T @ x  # one batch in float32 (fast), the running sum in float64
        else:  # wide: 1024 columns at a time, with no K×K product beside the sum; the blocks on and above the
            # diagonal only (the matrix is symmetric: half the multiply-adds), the rest mirrored at finish()
            for start in range(0, x.shape[1], WIDE_CHUNK):
                end = start + WIDE_CHUNK
                self.gram[:end, start:end] += x[:, :end].T @ x[:, start:end]
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.abs_max = np.maximum(self.abs_max, np.abs(x).max(axis=0))
        self.n += len(x)

    def finish(self) -> "_Inputs":
        if self.gram.dtype == np.float32:
            k = len(self.gram)
            for start in range(0, k, WIDE_CHUNK):  # below the diagonal, from above it (exactly symmetric)
                end = min(start + WIDE_CHUNK, k)
                self.gram[start:end, :start] = self.gram[:start, start:end].T
                block = self.gram[start:end, start:end]
                block[...] = np.triu(block) + np.triu(block, 1).T
            self.gram /= max(self.n, 1)  # in place
        else:
            self.gram = (self.gram / max(self.n, 1)).astype(np.float32)  # float32 scores the candidates twice as fast
        self.mean_abs = self.abs_sum / max(self.n, 1)
        return self


def input_accumulator() -> tuple:
    """``(each, finish)``: ``each(name, array)`` adds a calibration batch of a tensor to its Gram sums,
    ``finish()`` returns ``{tensor: _Inputs}``: what :func:`stream_inputs` collects, for a caller that runs the
    calibration itself (the block loop, in the run that advances a float-propagated block)."""
    acc: dict = {}

    def each(name, value):
        acc.setdefault(name, _Inputs(value.shape[-1])).update(value)

    return each, lambda: {name: inputs.finish() for name, inputs in acc.items()}


def stream_inputs(graph: Graph, ctx: PassContext, names: list) -> dict:
    """``{tensor: _Inputs}`` (Gram matrix, mean and max |x|) streamed over every calibration batch (one batch
    if no stream is given). Those the context holds already (``ctx.prefetched_inputs``, made in the run that
    advanced the block) are taken from it, once; only the others are streamed."""
    out = {name: ctx.prefetched_inputs.pop(name) for name in names if name in ctx.prefetched_inputs}
    missing = [name for name in names if name not in out]
    if missing:
        each, finish = input_accumulator()
        ctx.stream(graph, missing, each)
        out.update(finish())
    return out


class ActivationAwareScalesPass(FoldSmoothQuantScalesPass):
    """AWQ scale search and clip search; folds like ``smooth-quant``. Run ``quantize-weights`` (4-bit,
    per-group, same group and symmetry) after it."""

    name = "awq"
    phase = "transform"
    changes_activations = True
    exact = False  # the clip search changes weights
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        group_size: int = 128
        symmetric: bool = True
        grid: int = 20
        duo: bool = True  # also try AutoAWQ's mean|x|^r / w_mean^(1-r) scales (2 × grid candidates)
        clip: bool = True
        clip_qk: bool = True  # the reference leaves q and k unclipped; on SmolLM2-135M clipping them too: 43.96 → 43.76
        max_shrink: float = 0.5
        groups: tuple = ("qkv", "gate_up", "o", "down")
        fallback_mul: bool = True
        # the scale search scores each candidate on a seeded sample of the group's output channels when the
        # whole group costs more than SEARCH_BUDGET per candidate (0: always every channel; see search_columns)
        search_columns: int = -1
        # the weight quantizer the scales are searched for: rtn (quantize-weights' per-group INT4) or progressive
        # (QoQ's INT8-per-channel → UINT4-per-group, quantize-weights-progressive; no clip search: QoQ's g128 clips nothing)
        quantizer: str = "rtn"

        def __post_init__(self):
            object.__setattr__(self, "groups", tuple(self.groups))
            if self.bits not in (4, 8) or self.group_size < 2 or self.grid < 2:
                raise ValueError("bits 4 or 8, group_size ≥ 2, grid ≥ 2")
            if not 0.0 < self.max_shrink < 1.0:
                raise ValueError("max_shrink must be in (0, 1)")
            if set(self.groups) - {"qkv", "gate_up", "o", "down"}:
                raise ValueError("groups are qkv, gate_up, o, down")
            if self.search_columns < -1:
                raise ValueError("search_columns: -1 (by cost), 0 (all) or a count")
            if self.quantizer not in ("rtn", "progressive"):
                raise ValueError(f"quantizer must be rtn or progressive, not {self.quantizer!r}")
            if self.quantizer == "progressive" and (self.clip or self.bits != 4):
                raise ValueError("the progressive quantizer is 4-bit and has no clip search (set clip: false)")

    def _needs_samples(self) -> bool:
        return True

    def prefetch_inputs(self, structure, ctx: PassContext) -> tuple | None:
        """What the block loop can collect for this pass in the run that advances the block (float propagation:
        the same weights, so the same numbers): ``(names, each, finish)``, the inputs of the linears of its groups
        that are not quantized yet and that no ``--exclude`` names, the accumulator ``each(name, batch)`` and
        ``finish()`` giving ``{name: _Inputs}`` for ``ctx.prefetched_inputs``; None if there are none."""
        names = sorted({lin.act.name for lin in structure.linears
                        if GROUP_OF_ROLE.get(lin.role) in self.options.groups and not lin.weight.quantized
                        and not ctx.exclude(lin.name, lin.node.name)})
        if not names:
            return None
        each, finish = input_accumulator()
        return names, each, finish

    def _fake_quant(self, w_kn: np.ndarray) -> np.ndarray:
        """The weight quantizer that follows this pass, quantize-dequantize of ``[K, N]``."""
        o = self.options
        if o.quantizer == "progressive":
            return fake_quant_progressive(w_kn, o.group_size)
        return weight_fake_quant(w_kn, o.bits, o.group_size, o.symmetric)

    def _samples(self, graph: Graph, ctx: PassContext, names: list) -> dict:
        return stream_inputs(graph, ctx, names)

    def _channel_absmax(self, graph: Graph, ctx: PassContext, names: list, samples: dict) -> dict:
        return {name: samples[name].abs_max for name in names}  # streamed with the Gram matrices: no second run

    def _group_scales(self, members: list, x_max: np.ndarray, inputs: _Inputs, tie) -> tuple:
        o = self.options
        mean_abs = inputs.mean_abs
        if tie is not None:
            mean_abs = _tie(mean_abs, *tie)
        weights = [_oriented(m, _weight(m)).astype(np.float32) for m in members]
        scored = _column_sample(weights, search_columns(weights[0].shape[0], o.search_columns))
        # the reported errors are taken on the channels the search scored (all of them unless sampled)
        self._columns = {m.name: cols for m, (_, _, cols) in zip(members, scored)}
        best = (np.inf, 0.0, np.ones(len(mean_abs)))
        candidates = [(i / o.grid, False) for i in range(o.grid)]
        if o.duo:
            w_mean = _weight_mean(weights, o.group_size)
            if tie is not None:
                w_mean = _tie(w_mean, *tie)
            candidates += [(i / o.grid, True) for i in range(o.grid)]
        for r, duo in candidates:
            s = np.power(np.maximum(mean_abs, 1e-4), r)
            if duo:
                s = np.maximum(s / (np.power(w_mean, 1 - r) + 1e-4), 1e-4)
            s = s / np.sqrt(s.max() * s.min())
            s_full = (_untie(s, *tie) if tie is not None else s).astype(np.float32)
            err = sum(weight * output_error(inputs.gram, w - self._fake_quant(w * s_full[:, None]) / s_full[:, None])
                      for w, weight, _ in scored)
            if err < best[0]:
                best = (err, (r, duo), s)
        _, (r, duo), s = best
        s_fold = s.astype(np.float32)
        s = (_untie(s, *tie) if tie is not None else s).astype(np.float32)
        # per member ‖X·W‖² (the same after scaling: (X/s)·(s·W) = X·W, so _after_group reuses it) and RTN's error
        self._signal, self._pending = {}, {}
        for m, (w, _, _) in zip(members, scored):
            self._signal[m.name] = max(_error_by_columns(inputs.gram, w.shape[1], lambda c, w=w: w[:, c]), 1e-30)
            rtn = _error_by_columns(inputs.gram, w.shape[1], lambda c, w=w: w[:, c] - self._fake_quant(w[:, c]))
            self._pending[m.name] = rtn / self._signal[m.name]
        return s, s_fold, {"awq_ratio": r, "awq_duo": duo}

    def _after_group(self, graph: Graph, ctx: PassContext, members: list, inputs: _Inputs, s: np.ndarray) -> None:
        o = self.options
        gram = _ScaledGram(inputs.gram, s)  # the input the scaled weights now see: X / s (its diagonal blocks)
        inv = (1.0 / s).astype(np.float32)[:, None]
        for m in members:
            w = _oriented(m, _weight(m))  # already scaled by s
            ref = w
            if o.clip and (o.clip_qk or m.role not in ("q", "k", "qkv")):
                w = clip_search(gram, w, o.bits, o.group_size, o.symmetric, o.grid, o.max_shrink)
                stored = w if m.weight_axis == 1 else w.T
                m.node.inputs[1] = graph.make_constant(f"{m.name}.weight_clipped", np.ascontiguousarray(stored), self.name)
            # ‖(X/s)·(s·W − Q(clipped))‖² = ‖X·(W − Q(clipped)/s)‖², on the unscaled Gram matrix
            picked = self._columns[m.name]
            if picked is not None:
                w, ref = w[:, picked], ref[:, picked]
            unscaled = lambda cols, w=w, ref=ref: (ref[:, cols] - self._fake_quant(w[:, cols])) * inv  # noqa: E731
            err = _error_by_columns(inputs.gram, w.shape[1], unscaled) / self._signal[m.name]
            if picked is not None:
                ctx.record(m.name, weight_out_err_channels=len(picked))
            ctx.record(m.name, weight_out_err_rtn=self._pending.get(m.name), weight_out_err_awq=err,
                       awq_clipped=bool(o.clip and (o.clip_qk or m.role not in ("q", "k", "qkv"))))


class _ScaledGram:
    """``G / (s sᵀ)`` read by diagonal blocks only (what :func:`clip_search` reads), never built whole: the
    same numbers as indexing the divided matrix, without its K×K copy."""

    def __init__(self, gram: np.ndarray, s: np.ndarray):
        self.gram, self.s = gram, s

    def __getitem__(self, index):
        rows, cols = index
        return self.gram[rows, cols] / np.outer(self.s[rows], self.s[cols])


def _error_by_columns(gram: np.ndarray, n: int, delta, chunk: int = 2048) -> float:
    """``‖X·Δ‖²`` (see :func:`output_error`) over ``n`` output channels a chunk at a time, ``delta(columns)``
    giving ``Δ``'s ``K × chunk`` slice, so no ``K × N`` temporary is made. Exact by chunks: each channel's
    quantization uses its own column only."""
    return sum(float(output_error(gram, delta(slice(start, start + chunk)))) for start in range(0, n, chunk))


SEARCH_BUDGET = 2 ** 31  # K²·N multiply-adds per candidate: SmolLM2-135M's largest group is 1.4·10⁹


def search_columns(k: int, option: int) -> int:
    """How many output channels the scale search scores for an input of ``k`` channels: ``option`` if > 0,
    every one if 0, else (-1, the default) as many as ``SEARCH_BUDGET / K²`` affords, at least 512."""
    if option >= 0:
        return option
    return max(512, SEARCH_BUDGET // (k * k))


def _column_sample(weights: list, limit: int) -> list:
    """``[(weight, factor, columns)]``: the members' ``[K, N]`` weights cut to about ``limit`` output channels in
    all, drawn without replacement (seeded) from each member in proportion to its width, each member's error
    scaled by ``N / drawn`` (unbiased: a channel's error depends on its own column only, as the quantizer's
    groups run along K). All columns, factor 1, columns None, when ``limit`` is 0 or covers them."""
    total = sum(w.shape[1] for w in weights)
    if limit <= 0 or total <= limit:
        return [(w, 1.0, None) for w in weights]
    rng = np.random.default_rng(0)
    out = []
    for w in weights:
        n = w.shape[1]
        take = min(n, max(1, round(limit * n / total)))
        cols = np.sort(rng.choice(n, take, replace=False))
        out.append((np.ascontiguousarray(w[:, cols]), n / take, cols))
    return out


def _weight_mean(weights: list, group: int) -> np.ndarray:
    """Per input channel, the mean over all members' output channels of ``|w|`` relative to its group's max
    (AutoAWQ's ``w_mean`` for its "duo" scales ``mean|x|^r / w_mean^(1−r)``)."""
    parts = []
    for w in weights:  # [K, N]
        k = w.shape[0]
        b = block_size_for(k, group)
        a = np.abs(w).reshape(k // b, b, -1)
        parts.append((a / (a.max(axis=1, keepdims=True) + 1e-6)).reshape(k, -1))
    return np.concatenate(parts, axis=1).mean(axis=1).astype(np.float64)

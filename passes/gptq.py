"""GPTQ (Frantar et al. 2023): quantize a weight column by column, feeding each column's error forward through
the inverse Hessian of the layer's input, then write it as INT4/INT8 block Q/DQ.

Per linear with input X (rows = tokens) and weight ``W [N, K]`` (output × input channels):

1. ``H = (2/n) Σ xᵀx`` accumulated streaming over **all** calibration batches (never all activations at once);
   inputs shared by several linears (q/k/v, gate/up) share one H. Dead channels (``H_jj = 0``) get ``H_jj = 1``
   and zero weight.
2. ``H += λ·I`` with ``λ = damp · mean(diag H)`` (default 0.01); ``U`` = upper Cholesky factor of ``H⁻¹``.
3. Act-order (optional): columns in descending ``diag H``, with **static groups** — each group's scale comes
   from the original weight's contiguous block of ``group_size`` input channels — so groups stay the
   contiguous blocks ``DequantizeLinear(block_size)`` expresses.
4. Columns in blocks of 128 (lazy batch updates): ``q = Q(w)``, ``e = (w − q) / U_ii``,
   ``W[:, i:] −= e · U[i, i:]`` inside the block, then the whole block's error to the columns after it.
   Without act-order the group scales are found on the updated weight when a group starts.

Held-out check (default on): per linear, GPTQ fitted on the even calibration batches is measured on the odd
ones' Hessian (``tr(ΔᵀHΔ)`` is the output error) and vice versa; where that two-fold error is not below
RTN's, the linear keeps RTN — GPTQ can fit its calibration text's input statistics at the expense of others
(measured on SmolLM2's down projections). With one calibration batch both halves are that batch.

``format: fp8``: the same column loop on FP8 E4M3 codes with one static scale per output channel,
``s = max|W| / 448`` of the original weight (what ``quantize-weights format: fp8`` writes): ``q = fp8(w / s)``,
the error fed forward as above. FP8's error is relative to each weight, so no scale search helps it; error
feedback does (the rounding of one column is cancelled by the later ones through H).

The quantized weight is written here (``DequantizeLinear`` of an int4/int8 initializer, blocked along K),
not left to ``quantize-weights``: re-deriving scales from GPTQ's output would move it off its grid.
Hessians come from the float model (the reference quantizes layers sequentially on the quantized model's
activations). The report records, per linear, the relative output error of RTN and of GPTQ on a
calibration sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import weight_matrix
from .qdq_math import (FP8, QuantizedWeight, add_dequantize, block_size_for, fp8_quantize, output_error, quantize_weight,
                       quantize_weight_fp8, relative_error, sqnr_db, weight_code_range)
from .select import selected_linears

__all__ = ["GPTQPass", "gptq_quantize", "hessians"]

logger = logging.getLogger(__name__)

DEFAULT_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")


def hessians(graph: Graph, ctx: PassContext, names: list) -> dict:
    """``{tensor: (H_even, H_odd)}``: ``H = 2/n Σ xᵀx`` (float64 ``[K, K]``) over the even and the odd
    calibration batches, streamed; their mean (equal batch sizes) is the Hessian of all batches."""
    acc: dict = {}
    seen: dict = {}

    def each(name, value):
        x = value.reshape(-1, value.shape[-1]).astype(np.float64)
        half = seen.get(name, 0) % 2
        seen[name] = seen.get(name, 0) + 1
        parts = acc.setdefault(name, [[0.0, 0], [0.0, 0]])
        parts[half][0] = parts[half][0] + x.T @ x
        parts[half][1] += len(x)

    ctx.stream(graph, names, each)
    out = {}
    for name, ((h0, n0), (h1, n1)) in acc.items():
        even = (2.0 / n0) * h0
        out[name] = (even, (2.0 / n1) * h1 if n1 else even)
    return out


def _group_params(w_block_kn: np.ndarray, bits: int, symmetric: bool, scale_dtype=np.float32) -> tuple:
    """(scale [N], zero point [N] as float) of one group of input channels."""
    qw = quantize_weight(w_block_kn, 1, bits, "per-channel", symmetric=symmetric, scale_dtype=scale_dtype)
    return qw.scale, qw.zero_point.astype(np.float32)


def _quantize_col(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, symmetric: bool) -> tuple:
    lo, hi = weight_code_range(bits) if symmetric else (0, 2 ** bits - 1)
    q = np.clip(np.rint(w / scale) + zp, lo, hi)
    return q, (q - zp) * scale


def gptq_quantize(w_kn: np.ndarray, h: np.ndarray, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                  damp: float = 0.01, block: int = 128, act_order: bool = True, scale_dtype=np.float32,
                  fmt: str = "int") -> QuantizedWeight:
    """GPTQ on one weight ``[K, N]`` with input Hessian ``h [K, K]``; returns it blocked along K (``fmt`` int)
    or FP8 E4M3 per output channel (``fmt`` fp8; ``bits``, ``group_size``, ``symmetric`` unused), its scales
    representable in ``scale_dtype`` (the model's float type)."""
    k, n = w_kn.shape
    fp8 = fmt == "fp8"
    g = k if fp8 else block_size_for(k, group_size)
    W = w_kn.T.astype(np.float64).copy()  # [N, K]
    H = h.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if fp8:  # one static scale per output channel, from the (dead-zeroed) weight
        fp8_scale = quantize_weight_fp8(W.T.astype(np.float32), 1, "per-channel", scale_dtype).scale
    groups = [_group_params(W[:, j:j + g].T, bits, symmetric, scale_dtype) for j in range(0, k, g)] \
        if act_order and not fp8 else None
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor of H⁻¹
    Q = np.zeros((n, k), FP8 if fp8 else np.float64)  # codes, permuted order
    scales = np.zeros((k // g, n), np.float32)
    zps = np.zeros((k // g, n), np.float32)
    current = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1))
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            if fp8:
                q = fp8_quantize(W1[:, i], fp8_scale)
                dq = q.astype(np.float64) * fp8_scale
            else:
                if act_order:
                    scale, zp = groups[col // g]
                elif col % g == 0:  # columns in order: a group starts; find its range on the updated weight
                    current = _group_params(W1[:, i:i + g].T if i + g <= i2 - i1 else
                                            np.concatenate([W1[:, i:], W[:, i2:i1 + i + g]], axis=1).T, bits,
                                            symmetric, scale_dtype)
                if not act_order:
                    scale, zp = current
                scales[col // g], zps[col // g] = scale, zp
                q, dq = _quantize_col(W1[:, i], scale, zp, bits, symmetric)
            Q[:, i1 + i] = q
            err = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = np.argsort(perm)
    codes = Q[:, inv].T  # [K, N] in the original channel order
    if fp8:
        return QuantizedWeight(np.ascontiguousarray(codes), fp8_scale, np.zeros(fp8_scale.shape, FP8), 1, 0)
    dtype = QuantizedWeight.storage(bits, symmetric)
    carrier = np.int8 if symmetric else np.uint8
    return QuantizedWeight(codes.astype(carrier).astype(dtype), scales, zps.astype(carrier).astype(dtype), 0, g)


class GPTQPass(Pass):
    """GPTQ-quantize the weights of selected linears (INT block Q/DQ along K, or FP8 per output channel)."""

    name = "gptq"
    phase = "quantize"
    changes_activations = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        group_size: int = 128
        symmetric: bool = True
        damp: float = 0.01
        block: int = 128
        act_order: bool = True
        holdout_check: bool = True  # per linear, keep RTN where GPTQ loses on the other half of the batches
        roles: tuple = DEFAULT_ROLES
        format: str = "int"  # int | fp8 (E4M3, 8 bits, symmetric, one scale per output channel)

        def __post_init__(self):
            object.__setattr__(self, "roles", tuple(self.roles))
            if self.bits not in (4, 8) or self.group_size < 2 or self.block < 1 or not 0 < self.damp < 1:
                raise ValueError("bits 4 or 8, group_size ≥ 2, block ≥ 1, damp in (0, 1)")
            if self.format not in ("int", "fp8"):
                raise ValueError(f"format must be int or fp8, not {self.format!r}")
            if self.format == "fp8" and (self.bits != 8 or not self.symmetric):
                raise ValueError("fp8 weights are 8 bits and symmetric (one scale per output channel)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears = selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "weight", rescales_input=True)
        if not linears:
            return PassResult(False, {"quantized": 0})
        names = sorted({lin.act.name for lin in linears})
        hs = hessians(graph, ctx, names)
        sample = ctx.activation_sample(graph, names) if ctx.sample_provider else {}
        fp8 = o.format == "fp8"
        kind = "fp8e4m3" if fp8 else f"{'int' if o.symmetric else 'uint'}{o.bits}"
        gains, fallbacks = [], 0
        iterator = ctx.progress(linears, self.name) if ctx.progress else linears
        for lin in iterator:
            w = weight_matrix(lin).astype(np.float32)
            w_kn = w if lin.weight_axis == 1 else w.T
            h_even, h_odd = hs[lin.act.name]
            args = (o.bits, o.group_size, o.symmetric, o.damp, o.block, o.act_order, graph.float_dtype, o.format)
            method, cv_ratio = "gptq", None
            rtn = quantize_weight_fp8(w_kn, 1, "per-channel", graph.float_dtype) if fp8 else \
                quantize_weight(w_kn, 1, o.bits, "per-group", o.group_size, o.symmetric, graph.float_dtype)
            if o.holdout_check:  # two-fold: fit on one half of the batches, measure on the other
                w_rtn = rtn.dequantize()
                # tr(ΔᵀHΔ): the output error on the held-out half's inputs
                cv_gptq = (output_error(h_odd, w_kn - gptq_quantize(w_kn, h_even, *args).dequantize())
                           + output_error(h_even, w_kn - gptq_quantize(w_kn, h_odd, *args).dequantize()))
                cv_rtn = output_error(h_odd, w_kn - w_rtn) + output_error(h_even, w_kn - w_rtn)
                cv_ratio = cv_gptq / max(cv_rtn, 1e-30)
                if cv_gptq >= cv_rtn:
                    method = "rtn"
                    fallbacks += 1
            qw = gptq_quantize(w_kn, (h_even + h_odd) / 2, *args) if method == "gptq" else rtn
            if lin.weight_axis == 0:  # Gemm transB: stored [N, K]: blocks along axis 1, output channels on axis 0
                qw = QuantizedWeight(qw.q.T.copy(), qw.scale.T.copy(), qw.zero_point.T.copy(), 0 if fp8 else 1,
                                     qw.block_size)
            q = graph.make_constant(f"{lin.name}.weight_{kind}", qw.q, self.name)
            lin.node.inputs[1] = add_dequantize(graph, q, qw.scale, qw.axis, self.name, f"{lin.name}.weight",
                                                zero_point=qw.zero_point, block_size=qw.block_size)
            row = dict(weight_bits=o.bits, weight_format=kind, weight_granularity="per-channel" if fp8 else "per-group",
                       weight_symmetric=o.symmetric, weight_method=method, weight_axis=qw.axis,
                       weight_sqnr_db=round(sqnr_db(w, qw.dequantize()), 2), gptq_heldout_err_ratio=cv_ratio)
            if qw.block_size:
                row["weight_block_size"] = qw.block_size
            x = sample.get(lin.act.name)
            if x is not None:
                x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
                ref = x2 @ w_kn
                mine = qw.dequantize() if lin.weight_axis == 1 else qw.dequantize().T
                row["weight_out_err_rtn"] = relative_error(ref, x2 @ rtn.dequantize())
                row["weight_out_err_gptq"] = relative_error(ref, x2 @ mine)
                gains.append(row["weight_out_err_gptq"] / max(row["weight_out_err_rtn"], 1e-30))
            ctx.record(lin.name, **row)
        return PassResult(True, {"quantized": len(linears), "format": kind, "rtn_fallbacks": fallbacks,
                                 "median_err_ratio_vs_rtn": float(np.median(gains)) if gains else None})


"""Weight quantization of linears with the basic quantizers: ``W ≈ DQ(q, s, z)``.

Default: INT8, symmetric (absmax, zero point 0), per output channel, ``s_n = max_k |W[k, n]| / 127`` (narrow
range ±127), stored along the weight's output-channel axis as the op consumes it (TensorRT rule): MatMul B
``[K, N]`` → ``axis=1``; Gemm ``transB=1`` B ``[N, K]`` → ``axis=0``. Also selectable in a recipe: 4 bits
(INT4 / UINT4 initializers), per-tensor, per-group (``DequantizeLinear`` blocked along K with ``block_size``,
scale ``[K/B, N]``; B reduced to the largest power of two dividing K, and the report says so) and
asymmetric (zero point, unsigned — ONNX Runtime only: TensorRT takes symmetric weights), and ``format: fp8``:
FP8 E4M3 codes with ``s = max|W| / 448`` per output channel or per tensor (TensorRT's FP8). The new initializer
holds the weight in the layout the op consumes, so a Transpose/Reshape of the float constant disappears (a
tied LM head keeps its float embedding for the Gather and gets its own quantized copy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import weight_matrix
from .qdq_math import GRANULARITIES, QuantizedWeight, add_dequantize, quantize_weight, quantize_weight_fp8, sqnr_db
from .select import selected_linears

__all__ = ["QuantizeWeightsPass"]

logger = logging.getLogger(__name__)

DEFAULT_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")


class QuantizeWeightsPass(Pass):
    """Replace each selected linear's float weight by ``DequantizeLinear(int8, scale)``.

    Handles: MatMul with a constant B (also through Transpose/Reshape/Cast of a constant), Gemm with
    constant B (``transB`` 0 or 1). Declines: linears whose role is not selected, excluded by pattern, or
    whose weight is already quantized (its producer is a DequantizeLinear, so it is not a linear here).
    """

    name = "quantize-weights"
    phase = "quantize"
    changes_activations = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 8
        format: str = "int"  # int | fp8 (E4M3, 8 bits, symmetric, per-channel or per-tensor)
        granularity: str = "per-channel"  # per-tensor | per-channel | per-group
        group_size: int = 128  # per-group: input channels per block (reduced to divide K)
        symmetric: bool = True  # False: zero point, unsigned (ONNX Runtime only)
        roles: tuple = DEFAULT_ROLES

        def __post_init__(self):
            if self.bits not in (4, 8):
                raise ValueError("weights are 8 or 4 bits")
            if self.granularity not in GRANULARITIES:
                raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {self.granularity!r}")
            if self.group_size < 2:
                raise ValueError("group_size must be ≥ 2")
            if self.format not in ("int", "fp8"):
                raise ValueError(f"format must be int or fp8, not {self.format!r}")
            if self.format == "fp8" and (self.bits != 8 or not self.symmetric or self.granularity == "per-group"):
                raise ValueError("fp8 weights are 8 bits, symmetric, per-channel or per-tensor")
            object.__setattr__(self, "roles", tuple(self.roles))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        done, worst, reduced = 0, None, 0
        for lin in selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "weight"):
            wsqnr, was_reduced, _ = self._quantize(graph, ctx, lin)
            worst = wsqnr if worst is None else min(worst, wsqnr)
            reduced += was_reduced
            done += 1
        return PassResult(done > 0, self._stats(done, reduced, worst))

    def _format(self) -> str:
        if self.options.format == "fp8":
            return "fp8e4m3"
        return f"{'int' if self.options.symmetric else 'uint'}{self.options.bits}"

    def _stats(self, done: int, reduced: int, worst) -> dict:
        o = self.options
        return {"quantized": done, "format": self._format(), "granularity": o.granularity,
                "blocks_reduced": reduced, "worst_weight_sqnr_db": None if worst is None else round(float(worst), 2)}

    def _quantize(self, graph: Graph, ctx: PassContext, lin, w: np.ndarray | None = None,
                  append: QuantizedWeight | None = None, qw: QuantizedWeight | None = None) -> tuple:
        """Replace ``lin``'s weight (``w`` if given, in the op's layout; ``qw`` if already quantized) by its
        DequantizeLinear, with the blocks of ``append`` after its own along K if given; returns (weight SQNR
        in dB, whether the block was reduced, the dequantized weight in the op's layout)."""
        o = self.options
        w = (weight_matrix(lin) if w is None else w).astype(np.float32)
        if qw is None and o.format == "fp8":
            qw = quantize_weight_fp8(w, lin.weight_axis, o.granularity, graph.float_dtype)
        elif qw is None:
            qw = quantize_weight(w, lin.weight_axis, o.bits, o.granularity, o.group_size, o.symmetric,
                                 graph.float_dtype)
        stored = qw if append is None else qw.concat(append)
        q = graph.make_constant(f"{lin.name}.weight_{self._format()}", stored.q, self.name)
        lin.node.inputs[1] = add_dequantize(graph, q, stored.scale, stored.axis, self.name, f"{lin.name}.weight",
                                            zero_point=stored.zero_point, block_size=stored.block_size)
        dq = qw.dequantize()
        wsqnr = sqnr_db(w, dq)
        row = dict(weight_bits=o.bits, weight_format=self._format(), weight_granularity=o.granularity, weight_axis=qw.axis,
                   weight_symmetric=o.symmetric, weight_scale_min=float(qw.scale.min()),
                   weight_scale_max=float(qw.scale.max()), weight_sqnr_db=round(wsqnr, 2))
        reduced = bool(qw.block_size and qw.block_size != o.group_size)
        if qw.block_size:
            row["weight_block_size"] = qw.block_size
            if reduced:
                row["weight_block_note"] = (f"block {o.group_size} does not divide K = {lin.in_features}; "
                                            f"used {qw.block_size}")
        ctx.record(lin.name, **row)
        return wsqnr, reduced, dq

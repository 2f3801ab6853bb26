"""Weight quantization of linears: ``W ≈ DQ(q, s) = q · s`` with ``q`` int8, symmetric, zero point 0.

Per output channel, ``s_n = max_k |W[k, n]| / 127`` (narrow range ±127), stored along the weight's
output-channel axis as the op consumes it (TensorRT rule): MatMul B ``[K, N]`` → ``axis=1``;
Gemm ``transB=1`` B ``[N, K]`` → ``axis=0``. The new int8 initializer holds the weight in the layout the
op consumes, so a Transpose/Reshape of the float constant disappears (a tied LM head keeps its float
embedding for the Gather and gets its own int8 copy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import weight_matrix
from .qdq_math import add_dequantize, fake_quant, quantize, sqnr_db, weight_scales
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
        granularity: str = "per-channel"  # per-channel | per-tensor
        roles: tuple = DEFAULT_ROLES

        def __post_init__(self):
            if self.bits != 8:
                raise ValueError("only 8-bit weights are supported by this pass (4-bit comes with the block quantizers)")
            if self.granularity not in ("per-channel", "per-tensor"):
                raise ValueError(f"granularity must be per-channel or per-tensor, not {self.granularity!r}")
            object.__setattr__(self, "roles", tuple(self.roles))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        structure = ctx.structure(graph)
        done, worst = 0, None
        for lin in selected_linears(structure, ctx, self.name, o.roles, "weight"):
            w = weight_matrix(lin).astype(np.float32)
            axis = lin.weight_axis if o.granularity == "per-channel" else None
            scale = weight_scales(w, axis, o.bits)
            q = graph.make_constant(f"{lin.name}.weight_int8", quantize(w, scale, axis, o.bits), self.name)
            lin.node.inputs[1] = add_dequantize(graph, q, scale, axis, self.name, f"{lin.name}.weight")
            wsqnr = sqnr_db(w, fake_quant(w, scale, axis, o.bits))
            ctx.record(lin.name, weight_bits=o.bits, weight_granularity=o.granularity, weight_axis=axis,
                       weight_scale_min=float(scale.min()), weight_scale_max=float(scale.max()),
                       weight_sqnr_db=round(wsqnr, 2))
            worst = wsqnr if worst is None else min(worst, wsqnr)
            done += 1
        return PassResult(done > 0, {"quantized": done, "worst_weight_sqnr_db": None if worst is None else round(worst, 2)})

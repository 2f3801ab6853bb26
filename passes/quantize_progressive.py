"""QServe's QoQ progressive group quantization of linear weights: INT4 codes that become INT8 exactly.

Per linear (:func:`~llmq.passes.qdq_math.progressive_quantize`): level 1 per output channel,
``s1 = max|W| / 119`` and ``v = W / s1`` (the protective range ±119); level 2 per group of 128 input channels,
UINT4 codes with an integer scale ``s2 = round((max v − min v) / 15)`` and a UINT4 zero point. ``(q − z)·s2``
is an INT8 weight inside ±127, so a W4A8 kernel widens the 4-bit codes to INT8 with integer operations and
runs an INT8 × INT8 GEMM with ``s1 × s_token`` in its epilogue.

In the graph (standard ONNX, what ONNX Runtime evaluates exactly and the W4A8 plugin lowering reads back)::

    W = Mul(DequantizeLinear(q uint4, s2, z uint4, axis=K, block_size=128), s1)

Not TensorRT-native: TensorRT takes zero-point-free weights and has no INT8-activation W4 kernel (see the
``tensorrt`` backend's plugin). Declines: linears not selected, excluded, or already quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import weight_matrix
from .qdq_math import PROTECTIVE_RANGE, add_progressive_dequantize, progressive_quantize, sqnr_db
from .select import selected_linears

__all__ = ["QuantizeWeightsProgressivePass"]

logger = logging.getLogger(__name__)


class QuantizeWeightsProgressivePass(Pass):
    """Replace each selected linear's float weight by its two-level (INT8 per channel → UINT4 per group) form."""

    name = "quantize-weights-progressive"
    phase = "quantize"
    changes_activations = True

    @dataclass(frozen=True)
    class Options:
        group_size: int = 128
        roles: tuple = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")

        def __post_init__(self):
            if self.group_size < 2:
                raise ValueError("group_size must be ≥ 2")
            object.__setattr__(self, "roles", tuple(self.roles))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done, worst, reduced = 0, None, 0
        for lin in selected_linears(ctx.structure(graph), ctx, self.name, self.options.roles, "weight"):
            w = weight_matrix(lin).astype(np.float32)
            w_kn = w if lin.weight_axis == 1 else w.T
            pw = progressive_quantize(w_kn, self.options.group_size, graph.float_dtype)
            lin.node.inputs[1] = add_progressive_dequantize(graph, pw, lin.weight_axis, self.name, f"{lin.name}.weight")
            wsqnr = sqnr_db(w_kn, pw.dequantize())
            worst = wsqnr if worst is None else min(worst, wsqnr)
            row = dict(weight_bits=4, weight_format="uint4 progressive", weight_granularity="per-group",
                       weight_block_size=pw.block_size, weight_symmetric=False, weight_sqnr_db=round(wsqnr, 2),
                       weight_scale_min=float(pw.channel_scale.min()), weight_scale_max=float(pw.channel_scale.max()),
                       weight_group_scale_max=int(pw.group_scale.max()), weight_protective_range=PROTECTIVE_RANGE)
            if pw.block_size != self.options.group_size:
                reduced += 1
                row["weight_block_note"] = (f"block {self.options.group_size} does not divide K = {lin.in_features}; "
                                            f"used {pw.block_size}")
            ctx.record(lin.name, **row)
            done += 1
        return PassResult(done > 0, {"quantized": done, "format": "uint4 progressive (int8 per channel, uint4 per group)",
                                     "blocks_reduced": reduced,
                                     "worst_weight_sqnr_db": None if worst is None else round(float(worst), 2)})

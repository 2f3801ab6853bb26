"""Lowering INT8 Q/DQ linears to ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat``.

The portable graph computes ``Y = DQ(Q(X, s_a)) · DQ(W_q, s_w)``. ONNX Runtime fuses that pattern by itself
only when every DequantizeLinear feeds a single node; its common-subexpression elimination merges the
per-consumer DQs of a tensor read by several linears (q/k/v, gate/up), so those stay unfused float MatMuls
(measured on SmolLM2-135M: 60 of 210 linears fused). This pass writes the fused form explicitly:

    Y = MatMulIntegerToFloat(Q(X, s_a, 128 as uint8), W_q, s_a, s_w, 128, 0)

which is exact: ``clip(round(X/s_a), −128, 127) + 128 = clip(round(X/s_a) + 128, 0, 255)`` and the kernel
subtracts the zero points before its int32 accumulation. The uint8 activation is what ONNX Runtime's CPU
kernels prefer (its own S8→U8 rewrite does the same). One uint8 Quantize is shared by all linears that read
the same tensor with the same scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult

__all__ = ["LowerToIntegerMatMulPass"]

logger = logging.getLogger(__name__)


def _per_tensor_int8_qdq(tensor: gs.Tensor):
    """(x, scale constant) if ``tensor`` is DQ(Q(x)) per tensor with int8 zero point 0, else None."""
    dq = Graph.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = Graph.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear" or len(q.inputs) < 3:
        return None
    scale, zp = q.inputs[1], q.inputs[2]
    if not (isinstance(scale, gs.Constant) and isinstance(zp, gs.Constant)) or scale.values.size != 1:
        return None
    if zp.values.dtype != np.int8 or np.any(zp.values != 0) or dq.inputs[1] is not scale:
        return None
    return q.inputs[0], scale


def _int8_weight(tensor: gs.Tensor):
    """(int8 constant [K, N], scale constant [N] or scalar) if ``tensor`` is DQ of one along axis 1."""
    dq = Graph.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or dq.attrs.get("block_size", 0):
        return None
    w, scale = dq.inputs[0], dq.inputs[1]
    if not (isinstance(w, gs.Constant) and isinstance(scale, gs.Constant)) or w.values.dtype != np.int8 or w.values.ndim != 2:
        return None
    if len(dq.inputs) > 2 and np.any(np.asarray(dq.inputs[2].values) != 0):
        return None
    if scale.values.size > 1 and dq.attrs.get("axis", 1) % 2 != 1:
        return None
    return w, scale


class LowerToIntegerMatMulPass(Pass):
    """Rewrite ``MatMul(DQ(Q(x)), DQ(W_int8))`` into ``com.microsoft.MatMulIntegerToFloat``.

    Handles: MatMul with a per-tensor int8 Q/DQ activation and an int8 weight quantized per tensor or per
    output channel (axis 1). Declines: Gemm, block-quantized (4-bit) weights, asymmetric or non-constant
    scales — those stay as Q/DQ for ONNX Runtime's own fusions.
    """

    name = "lower-int8-matmul"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shared: dict = {}
        lowered = 0
        for node in list(graph.gs.nodes):
            if node.op != "MatMul" or len(node.inputs) != 2:
                continue
            act, weight = _per_tensor_int8_qdq(node.inputs[0]), _int8_weight(node.inputs[1])
            if act is None or weight is None:
                continue
            x, a_scale = act
            w, w_scale = weight
            key = (x.name, float(a_scale.values.reshape(-1)[0]))
            if key not in shared:
                zp = graph.make_constant("a_zero_point_u8", np.asarray(128, np.uint8), self.name)
                q = graph.make_node("QuantizeLinear", [x, a_scale, zp], f"{x.name}_u8", self.name, out_dtype=np.uint8)
                shared[key] = (q, zp)
            q, zp = shared[key]
            b_zp = graph.make_constant("b_zero_point", np.zeros(w_scale.values.shape, np.int8), self.name)
            out = node.outputs[0]
            node.outputs.clear()
            fused = gs.Node("MatMulIntegerToFloat", name=graph.unique_name(f"{self.name}/{node.name}"),
                            domain="com.microsoft", inputs=[q, w, a_scale, w_scale, zp, b_zp], outputs=[out])
            graph.gs.nodes.append(fused)
            graph.tag(fused.name, self.name)
            lowered += 1
        if lowered:
            graph.other_opsets.setdefault("com.microsoft", 1)
            graph.touch()
        return PassResult(lowered > 0, {"lowered": lowered})

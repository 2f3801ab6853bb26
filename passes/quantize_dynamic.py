"""Per-token dynamic INT8 activations with INT8 weights, computed with integer MatMul (ONNX Runtime).

For each token t (a row of X) the scale is taken at run time, weights are per output channel:

    s_t = max_k |X[t, k]| / 127,   q_t = clip(round(X[t] / s_t), −127, 127)
    Y[t, n] = (Σ_k q_t[k] · W_q[k, n]) · s_t · s_w[n]            (MatMulInteger, int32 accumulation)

Written with standard ops (ReduceMax, Div, Round, Add, Clip, Cast, MatMulInteger, Mul). The integer
activation is stored as ``q + 128`` in uint8 with zero point 128 — the same values, in the u8 × s8 form
ONNX Runtime's fast integer GEMM kernels take (its s8 × s8 path measured 3× slower here). The weights stay
int8: u8 × s8 (on x86 CPUs without VNNI a session needs ``session.x64quantprecision=1`` or the model is compiled
with ``--int8-weights unsigned``; see ``backends.ort_lowering``). TensorRT's parser
rejects MatMulInteger and has no per-token Q/DQ form before 10.15, so recipes using this pass are for
ONNX Runtime only. One per-token quantizer is shared by all linears reading the same tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import weight_matrix
from .qdq_math import add_token_scale, quantize, representable_scale, sqnr_db, weight_scales
from .select import selected_linears

__all__ = ["QuantizeActivationsPerTokenPass", "per_token_fake_quant"]

logger = logging.getLogger(__name__)


def per_token_fake_quant(x: np.ndarray) -> np.ndarray:
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-8).astype(np.float32) / np.float32(127)
    return np.clip(np.rint(x / s), -127, 127) * s


class QuantizeActivationsPerTokenPass(Pass):
    """Replace each selected MatMul linear by a per-token dynamic INT8 × per-channel INT8 integer MatMul.

    Handles: MatMul linears with a float weight. Declines: Gemm, linears whose weight or activation is
    already quantized, excluded layers.
    """

    name = "quantize-activations-dynamic"
    phase = "quantize"
    changes_activations = True

    @dataclass(frozen=True)
    class Options:
        roles: tuple = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")
        only_switched: bool = False  # only the linears a sensitivity budget (action: per-token) handed over

        def __post_init__(self):
            object.__setattr__(self, "roles", tuple(self.roles))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        linears = [lin for lin in selected_linears(ctx.structure(graph), ctx, self.name, self.options.roles, "weight")
                   if lin.node.op == "MatMul" and not lin.act_quantized
                   and (not self.options.only_switched or lin.name in ctx.per_token_activations)]
        if not linears:
            return PassResult(False, {"quantized": 0})
        sample = ctx.activation_sample(graph, sorted({lin.act.name for lin in linears})) if ctx.sample_provider else {}
        quantizers: dict = {}
        for lin in linears:
            w = weight_matrix(lin).astype(np.float32)
            scale = representable_scale(weight_scales(w, 1, 8), graph.float_dtype)
            wq = quantize(w, scale, 1, 8)
            if lin.act.name not in quantizers:
                quantizers[lin.act.name] = self._token_quantizer(graph, lin)
            q, s, zp = quantizers[lin.act.name]
            acc = graph.make_node("MatMulInteger", [q, graph.make_constant(f"{lin.name}.weight_int8", wq.astype(np.int8), self.name), zp],
                                  f"{lin.name}.acc", self.name, out_dtype=np.int32)
            acc_f = graph.make_node("Cast", [acc], f"{lin.name}.acc_f", self.name, {"to": graph.float_onnx_type},
                                    out_dtype=np.float32)
            scaled = graph.make_node("Mul", [acc_f, s], f"{lin.name}.acc_token", self.name, out_dtype=np.float32)
            out = lin.node.outputs[0]
            lin.node.outputs.clear()
            node = Graph.producer(graph.make_node("Mul", [scaled, graph.make_constant(f"{lin.name}.weight_scale", scale, self.name)],
                                                  f"{lin.name}.out", self.name, out_dtype=np.float32))
            node.outputs[0] = out
            record = {"weight_bits": 8, "weight_granularity": "per-channel", "act_bits": 8, "act_granularity": "per-token dynamic"}
            x = sample.get(lin.act.name)
            if x is not None:
                x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
                record["sqnr_db"] = round(sqnr_db(x2 @ w, per_token_fake_quant(x2) @ (wq.astype(np.float32) * scale)), 2)
            ctx.record(lin.name, **record)
        graph.gs.cleanup()
        return PassResult(True, {"quantized": len(linears), "token_quantizers": len(quantizers)})

    def _token_quantizer(self, graph: Graph, lin):
        """(int8 tensor, per-token scale [.., 1]) for the linear's input."""
        x, p = lin.act, self.name
        s = add_token_scale(graph, x, p, f"{lin.name}.in")
        r = graph.make_node("Round", [graph.make_node("Div", [x, s], f"{lin.name}.in_div", p, out_dtype=np.float32)],
                            f"{lin.name}.in_round", p, out_dtype=np.float32)
        lo = graph.make_constant(f"{lin.name}.in_lo", np.asarray(1, np.float32), p)
        hi = graph.make_constant(f"{lin.name}.in_hi", np.asarray(255, np.float32), p)
        shifted = graph.make_node("Add", [r, graph.make_constant(f"{lin.name}.in_shift", np.asarray(128, np.float32), p)],
                                  f"{lin.name}.in_shifted", p, out_dtype=np.float32)
        c = graph.make_node("Clip", [shifted, lo, hi], f"{lin.name}.in_clip", p, out_dtype=np.float32)
        q = graph.make_node("Cast", [c], f"{lin.name}.in_uint8", p, {"to": onnx.TensorProto.UINT8}, out_dtype=np.uint8)
        zp = graph.make_constant(f"{lin.name}.in_zero_point", np.asarray(128, np.uint8), p)
        return q, s, zp

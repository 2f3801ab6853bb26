"""Static per-tensor activation quantization of linear inputs: ``X ≈ DQ(Q(X, s), s)``, ``s = amax / 127``.

``amax`` comes from calibration statistics of the float graph through an observer (minmax, percentile,
mse, entropy). One QuantizeLinear is inserted per distinct activation tensor (q/k/v share one, gate/up another)
and one DequantizeLinear per selected linear reading it, following the TensorRT placement rule: quantize
the inputs of weighted ops, not their outputs. Zero point int8 0 (symmetric); ``symmetric: false`` gives the
zero-point quantizer over the calibrated ``[min(0, min), max(0, max)]`` in UINT8 (ONNX Runtime only);
``format: fp8`` gives FP8 E4M3 per-tensor activations, ``s = amax / 448``, zero point FP8 0 (TensorRT's FP8).

``granularity: per-token`` (INT8, symmetric, dynamic — QServe's W4A8 activations): each token's scale is taken at
run time, ``s_t = max_k |x[t, k]| / 127``, and the Q/DQ pair is opset 21's blocked form, one block spanning the
whole row: ``QuantizeLinear(x, s_t, axis=-1, block_size=K, output_dtype=int8)`` → ``DequantizeLinear``. Portable
ONNX that ONNX Runtime evaluates exactly; TensorRT takes only constant activation scales (a W4A8 plugin absorbs
this pattern).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..calib.observers import OBSERVERS, amax
from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from .qdq_math import FP8, FP8_MAX, add_per_token_qdq, add_qdq_pair, qmax
from .select import selected_linears

__all__ = ["QuantizeActivationsPass"]

logger = logging.getLogger(__name__)


class QuantizeActivationsPass(Pass):
    """Insert ``QuantizeLinear → DequantizeLinear`` on the activation input of each selected linear.

    Handles: any MatMul/Gemm linear found by structure discovery. Declines: linears not selected or
    excluded; a tensor whose calibrated range is zero (no scale can be positive and meaningful).
    Requires calibration statistics (collected on the graph as it stands when the pass runs).
    """

    name = "quantize-activations"
    phase = "quantize"
    changes_activations = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 8
        format: str = "int"  # int | fp8 (E4M3, per tensor, symmetric)
        granularity: str = "per-tensor"  # per-tensor (static, calibrated) | per-token (dynamic, INT8 symmetric)
        observer: str = "minmax"
        percentile: float = 99.99
        symmetric: bool = True
        roles: tuple = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")

        def __post_init__(self):
            if self.bits != 8:
                raise ValueError("only INT8 activations are supported")
            if self.observer not in OBSERVERS:
                raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, not {self.observer!r}")
            if self.format not in ("int", "fp8"):
                raise ValueError(f"format must be int or fp8, not {self.format!r}")
            if self.format == "fp8" and (not self.symmetric or self.observer not in ("minmax", "percentile")):
                raise ValueError("fp8 activations are symmetric, with the minmax or percentile observer")
            if not self.symmetric and self.observer != "minmax":
                raise ValueError("asymmetric activations use the minmax range (observer: minmax)")
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (50, 100]")
            if self.granularity not in ("per-tensor", "per-token"):
                raise ValueError(f"granularity must be per-tensor or per-token, not {self.granularity!r}")
            if self.granularity == "per-token" and (self.format != "int" or not self.symmetric):
                raise ValueError("per-token activations are INT8 symmetric")
            object.__setattr__(self, "roles", tuple(self.roles))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears = selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "activation")
        by_tensor: dict = {}
        for lin in linears:
            by_tensor.setdefault(lin.act.name, []).append(lin)
        if not by_tensor:
            return PassResult(False, {"quantized_tensors": 0})
        if o.granularity == "per-token":
            for name in sorted(by_tensor, key=lambda n: by_tensor[n][0].name):
                group = by_tensor[name]
                for lin, dq in zip(group, add_per_token_qdq(graph, group[0].act, group[0].in_features, self.name,
                                                            f"{group[0].name}.input", len(group))):
                    lin.node.inputs[0] = dq
                    ctx.record(lin.name, act_bits=8, act_format="int8", act_granularity="per-token dynamic")
            return PassResult(True, {"quantized_tensors": len(by_tensor), "granularity": "per-token",
                                     "quantized_linears": sum(len(g) for g in by_tensor.values())})
        stats = ctx.activation_stats(graph, sorted(by_tensor))
        inserted = 0
        for name in sorted(by_tensor, key=lambda n: by_tensor[n][0].name):
            group = by_tensor[name]
            st = stats[name]
            rng = amax(st, o.observer, qmax(o.bits), o.percentile)
            if rng <= 0.0:
                for lin in group:
                    ctx.decline(self.name, lin.name, "calibrated activation range is zero")
                continue
            scale, zp = rng / qmax(o.bits), None
            if o.format == "fp8":
                scale, zp = rng / FP8_MAX, np.zeros((), FP8)
            if not o.symmetric:
                lo, hi = min(st.min, 0.0), max(st.max, 0.0)
                scale = (hi - lo) / 255.0
                zp = np.asarray(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
            dqs = add_qdq_pair(graph, group[0].act, scale, self.name, f"{group[0].name}.input", len(group), zp)
            for lin, dq in zip(group, dqs):
                lin.node.inputs[0] = dq
                ch = st.channel_absmax
                ctx.record(lin.name, act_bits=o.bits, act_format="fp8e4m3" if o.format == "fp8" else "int8",
                           act_observer=o.observer, act_amax=rng, act_absmax=st.absmax, act_scale=scale,
                           act_symmetric=o.symmetric,
                           act_outlier_ratio=float(ch.max() / max(float(np.median(ch)), 1e-12)))
            inserted += 1
        return PassResult(inserted > 0, {"quantized_tensors": inserted,
                                         "quantized_linears": sum(len(g) for g in by_tensor.values())})

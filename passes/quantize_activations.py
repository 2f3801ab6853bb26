"""Static per-tensor activation quantization of linear inputs: ``X ≈ DQ(Q(X, s), s)``, ``s = amax / 127``.

``amax`` comes from calibration statistics of the float graph through an observer (minmax, percentile,
mse, entropy). One QuantizeLinear is inserted per distinct activation tensor (q/k/v share one, gate/up another)
and one DequantizeLinear per selected linear reading it, following the TensorRT placement rule: quantize
the inputs of weighted ops, not their outputs. Zero point int8 0 (symmetric); ``symmetric: false`` gives the
zero-point quantizer over the calibrated ``[min(0, min), max(0, max)]`` in UINT8 (ONNX Runtime only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..calib.observers import OBSERVERS, amax
from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from .qdq_math import add_qdq_pair, qmax
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
        observer: str = "minmax"
        percentile: float = 99.99
        symmetric: bool = True
        roles: tuple = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")

        def __post_init__(self):
            if self.bits != 8:
                raise ValueError("only INT8 activations are supported")
            if self.observer not in OBSERVERS:
                raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, not {self.observer!r}")
            if not self.symmetric and self.observer != "minmax":
                raise ValueError("asymmetric activations use the minmax range (observer: minmax)")
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (50, 100]")
            object.__setattr__(self, "roles", tuple(self.roles))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears = selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "activation")
        by_tensor: dict = {}
        for lin in linears:
            by_tensor.setdefault(lin.act.name, []).append(lin)
        if not by_tensor:
            return PassResult(False, {"quantized_tensors": 0})
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
            if not o.symmetric:
                lo, hi = min(st.min, 0.0), max(st.max, 0.0)
                scale = (hi - lo) / 255.0
                zp = np.asarray(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
            dqs = add_qdq_pair(graph, group[0].act, scale, self.name, f"{group[0].name}.input", len(group), zp)
            for lin, dq in zip(group, dqs):
                lin.node.inputs[0] = dq
                ch = st.channel_absmax
                ctx.record(lin.name, act_bits=o.bits, act_observer=o.observer, act_amax=rng,
                           act_absmax=st.absmax, act_scale=scale, act_symmetric=o.symmetric,
                           act_outlier_ratio=float(ch.max() / max(float(np.median(ch)), 1e-12)))
            inserted += 1
        return PassResult(inserted > 0, {"quantized_tensors": inserted,
                                         "quantized_linears": sum(len(g) for g in by_tensor.values())})

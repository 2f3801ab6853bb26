"""Range splitting: a linear's input as a clipped part plus a scaled residual, both under one INT8 scale.

Per-tensor static INT8 fails on SmolLM2's down-proj inputs because a few tokens (the first of a sequence,
some delimiters) carry values 4–175× larger than the 99.9th percentile, even after smoothing: one scale for
the whole tensor spends its 127 steps on them and rounds everything else coarsely. Channel splitting does not
help (at those tokens the whole row is large) and clipping them hurts (the model uses them). Here, with ``T`` a calibrated
clip value (a high percentile of ``|x|``), ``A = max|x|`` and ``k = (A − T) / T``:

    c = clip(x, −T, T)        r = (x − c) / k        Y = [c; r]·W  →  Y_c + k·Y_r  =  x·W

``c`` and ``r`` are stacked along the token axis, so the linear stays **one** MatMul with **one** weight,
and both halves span ``[−T, T]`` on the calibration data: the ordinary per-tensor INT8 activation quantizer
that runs afterwards gives the bulk of the values a step of ``T/127`` and the residual one of ``(A − T)/127``.
Exact in float (the rewrite changes no value beyond fp32 rounding); the cost is the linear's MACs run
twice, all INT8 — a TensorRT-deployable static scheme (one INT8 GEMM over twice the rows). The report records
the threshold, the range ratio ``A / T`` and the extra MACs.

Runs after the passes that rescale or permute the linear's input (smooth-quant, reorder-channels,
split-outliers, GPTQ): they decline a range-split linear, since its threshold is fixed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..calib.observers import OBSERVERS, amax
from ..ir.graph import RANGE_SPLIT, ROLE_KEY, Graph
from ..ir.passes import Pass, PassContext, PassResult
from .select import selected_linears

__all__ = ["SplitRangePass", "residual_factor"]

logger = logging.getLogger(__name__)


def residual_factor(node: gs.Node) -> float | None:
    """``k`` of a range-split linear ``node`` (its output halves recombine as ``Y_c + k·Y_r``), else None."""
    split = next((c for c in node.outputs[0].outputs if c.op == "Split"), None)
    if split is None or len(split.outputs) != 2:
        return None
    mul = next((c for c in split.outputs[1].outputs if c.op == "Mul"), None)
    const = None if mul is None else next((t for t in mul.inputs if isinstance(t, gs.Constant)), None)
    return None if const is None else float(np.asarray(const.values).reshape(-1)[0])


class SplitRangePass(Pass):
    """Stack ``clip(x, T)`` and the scaled residual as the input of selected linears (see the module doc).

    Handles: MatMul linears of the selected roles with a rank ≥ 2 input, and Gemm (its bias moves after the
    recombining Add, so it is added once). Declines: Gemm with ``beta ≠ 1``, linears whose calibrated
    ``max|x|`` is under ``min_ratio × T`` (one scale already fits), excluded layers, and linears whose input
    is already quantized.
    """

    name = "split-range"
    phase = "transform"
    changes_activations = True
    exact = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        observer: str = "percentile"  # how T is chosen from the calibrated |x| histogram
        percentile: float = 99.9
        min_ratio: float = 4.0  # split only where max|x| ≥ min_ratio × T
        roles: tuple = ("down", "fc2")

        def __post_init__(self):
            object.__setattr__(self, "roles", tuple(self.roles))
            if self.observer not in OBSERVERS or self.observer == "minmax":
                raise ValueError(f"observer must clip: one of {', '.join(o for o in OBSERVERS if o != 'minmax')}")
            if not 50.0 < self.percentile < 100.0:
                raise ValueError("percentile must be in (50, 100)")
            if self.min_ratio <= 1.0:
                raise ValueError("min_ratio must be > 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears = []
        for lin in selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "activation"):
            if lin.node.op == "Gemm" and len(lin.node.inputs) > 2 and lin.node.attrs.get("beta", 1.0) != 1.0:
                ctx.decline(self.name, lin.name, "Gemm with beta ≠ 1")
            elif lin.range_split:
                ctx.decline(self.name, lin.name, "input already split by range")
            else:
                linears.append(lin)
        if not linears:
            return PassResult(False, {"split_linears": 0})
        by_tensor: dict = {}
        for lin in linears:  # linears reading one tensor (q/k/v, gate/up) share one stacked input
            by_tensor.setdefault(lin.act.name, []).append(lin)
        stats = ctx.activation_stats(graph, sorted(by_tensor))
        split, extra_macs, ratios = 0, 0, []
        for name in sorted(by_tensor, key=lambda t: by_tensor[t][0].name):
            group, st = by_tensor[name], stats[name]
            clip = amax(st, o.observer, percentile=o.percentile) if st.count and st.absmax > 0.0 else 0.0
            if clip <= 0.0:
                for lin in group:
                    ctx.decline(self.name, lin.name, "no calibrated range, or the clip value is 0")
                continue
            full = st.absmax
            ratio = full / clip
            if ratio < o.min_ratio:
                for lin in group:
                    ctx.decline(self.name, lin.name, f"max|x| is {ratio:.2f}× the clip value, under {o.min_ratio:g}×")
                continue
            k = (full - clip) / clip
            stacked = self._stack(graph, group[0].act, clip, k, group[0].name)
            for lin in group:
                self._recombine(graph, lin, stacked, k)
                ctx.record(lin.name, range_split_threshold=float(clip), range_split_absmax=float(full),
                           range_split_ratio=round(float(ratio), 3), range_split_int8_macs_per_token=lin.macs_per_token)
                split += 1
                extra_macs += lin.macs_per_token
            ratios.append(ratio)
        return PassResult(split > 0, {"split_linears": split, "extra_macs_per_token": extra_macs,
                                      "max_ratio": round(float(max(ratios)), 2) if ratios else None})

    def _stack(self, graph: Graph, x: gs.Tensor, clip: float, k: float, n: str) -> gs.Variable:
        """``Concat(clip(x, ±clip), (x − clip(x)) / k)`` along the token axis."""
        tag = self._tag(graph)
        lo = graph.make_constant(f"{n}.range_min", np.asarray(-clip, np.float32), self.name)
        hi = graph.make_constant(f"{n}.range_max", np.asarray(clip, np.float32), self.name)
        c = tag(graph.make_node("Clip", [x, lo, hi], f"{n}.clipped", self.name, out_dtype=np.float32))
        r = tag(graph.make_node("Sub", [x, c], f"{n}.residual", self.name, out_dtype=np.float32))
        inv = graph.make_constant(f"{n}.residual_scale", np.asarray(1.0 / k, np.float32), self.name)
        rs = tag(graph.make_node("Mul", [r, inv], f"{n}.residual_scaled", self.name, out_dtype=np.float32))
        return tag(graph.make_node("Concat", [c, rs], f"{n}.range_split", self.name, attrs={"axis": -2},
                                   out_dtype=np.float32))

    def _recombine(self, graph: Graph, lin, stacked: gs.Variable, k: float) -> None:
        """``lin`` reads ``stacked``; its output halves are added back as ``Y_c + k·Y_r`` (+ a Gemm's bias)."""
        tag, n = self._tag(graph), lin.name
        lin.node.inputs[0] = stacked
        bias = lin.node.inputs[2] if lin.node.op == "Gemm" and len(lin.node.inputs) > 2 else None
        while len(lin.node.inputs) > 2:
            lin.node.inputs.pop()
        y = lin.node.outputs[0]
        both = gs.Variable(graph.unique_name(f"{n}.range_split_out"), dtype=y.dtype)
        lin.node.outputs[0] = both
        halves = [gs.Variable(graph.unique_name(f"{n}.{h}_out"), dtype=y.dtype) for h in ("clipped", "residual")]
        split = gs.Node("Split", name=graph.unique_name(f"{self.name}/Split"), attrs={"axis": -2, "num_outputs": 2},
                        inputs=[both], outputs=halves)
        graph.gs.nodes.append(split)
        graph.tag(split.name, self.name)
        tag(halves[0])
        kk = graph.make_constant(f"{n}.residual_unscale", np.asarray(k, np.float32), self.name)
        back = tag(graph.make_node("Mul", [halves[1], kk], f"{n}.residual_out", self.name, out_dtype=np.float32))
        if bias is None:
            add = gs.Node("Add", name=graph.unique_name(f"{self.name}/Add"), inputs=[halves[0], back], outputs=[y])
        else:
            total = tag(graph.make_node("Add", [halves[0], back], f"{n}.range_sum", self.name, out_dtype=np.float32))
            add = gs.Node("Add", name=graph.unique_name(f"{self.name}/Add"), inputs=[total, bias], outputs=[y])
        graph.gs.nodes.append(add)
        graph.tag(add.name, self.name)
        tag(y)
        graph.touch()

    @staticmethod
    def _tag(graph: Graph):
        def tag(t: gs.Variable) -> gs.Variable:
            graph.node_metadata.setdefault(Graph.producer(t).name, {})[ROLE_KEY] = RANGE_SPLIT
            return t
        return tag

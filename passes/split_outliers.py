"""Static outlier-channel splitting (a calibration-chosen variant of LLM.int8()).

For a linear ``Y = X·W`` and a set O of input channels whose calibrated ``max|X_j|`` exceeds a threshold
(default 6.0, LLM.int8()'s), with ``m`` the 0/1 mask that is 0 on O:

    Y = (X ⊙ m)·W  +  X[:, O]·W[O, :]

The first term is the ordinary linear (its input no longer carries the outliers, so per-tensor INT8
activations fit the rest); the second is a small float MatMul over |O| channels. Exact in float.

This is **not** LLM.int8(): there the split is chosen per input at run time from the values themselves;
here O is fixed from calibration statistics, so an outlier in another channel at run time stays in the
INT8 path. The report says which channels were split and what share of the MACs runs in float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import FLOAT_BRANCH, ROLE_KEY, Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.structure import weight_matrix
from .select import selected_linears

__all__ = ["SplitOutlierChannelsPass"]

logger = logging.getLogger(__name__)


class SplitOutlierChannelsPass(Pass):
    """Route calibrated outlier input channels of selected linears through a float side branch.

    Handles: MatMul linears (weight ``[K, N]``) of the selected roles. Declines: linears with no channel
    over the threshold, Gemm (its bias makes the split a different rewrite), excluded layers.
    """

    name = "split-outliers"
    phase = "transform"
    changes_activations = True
    exact = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        threshold: float = 6.0
        ratio: float | None = None  # instead of threshold: channels over ratio × the median channel's max|x|
        max_fraction: float = 0.05  # at most this share of a layer's input channels goes to float
        roles: tuple = ("down", "fc2")

        def __post_init__(self):
            object.__setattr__(self, "roles", tuple(self.roles))
            if self.threshold <= 0 or not 0 < self.max_fraction <= 1:
                raise ValueError("threshold must be > 0 and max_fraction in (0, 1]")
            if self.ratio is not None and self.ratio <= 1:
                raise ValueError("ratio must be > 1 (a multiple of the median channel's max|x|)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears = [lin for lin in selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "activation", rescales_input=True)
                   if lin.node.op == "MatMul"]
        if not linears:
            return PassResult(False, {"split_linears": 0})
        stats = ctx.activation_stats(graph, sorted({lin.act.name for lin in linears}))
        split, float_channels = 0, 0
        for lin in linears:
            absmax = stats[lin.act.name].channel_absmax
            limit = o.threshold if o.ratio is None else o.ratio * float(np.median(absmax))
            over = np.nonzero(absmax > limit)[0]
            if len(over) == 0:
                ctx.decline(self.name, lin.name, f"no input channel over {limit:.4g}")
                continue
            cap = max(1, int(o.max_fraction * lin.in_features))
            chosen = np.sort(over[np.argsort(-absmax[over], kind="stable")][:cap])
            self._split(graph, lin, chosen)
            ctx.record(lin.name, split_channels=[int(c) for c in chosen], split_float_macs_per_token=len(chosen) * lin.out_features,
                       split_over_threshold=int(len(over)), split_max_outside=float(np.delete(absmax, chosen).max()))
            split += 1
            float_channels += len(chosen)
        return PassResult(split > 0, {"split_linears": split, "float_channels": float_channels})

    def _split(self, graph: Graph, lin, channels: np.ndarray) -> None:
        w = weight_matrix(lin).astype(np.float32)
        mask = np.ones(lin.in_features, np.float32)
        mask[channels] = 0.0
        x = lin.act
        masked = graph.make_node("Mul", [x, graph.make_constant(f"{lin.name}.inlier_mask", mask, self.name)],
                                 f"{lin.name}.inliers", self.name, out_dtype=np.float32)
        picked = graph.make_node("Gather", [x, graph.make_constant(f"{lin.name}.outlier_channels", channels.astype(np.int64), self.name)],
                                 f"{lin.name}.outliers", self.name, attrs={"axis": -1}, out_dtype=np.float32)
        side = graph.make_node("MatMul", [picked, graph.make_constant(f"{lin.name}.outlier_weight", w[channels], self.name)],
                               f"{lin.name}.outlier_out", self.name, out_dtype=np.float32)
        graph.node_metadata[Graph.producer(side).name][ROLE_KEY] = FLOAT_BRANCH
        graph.add_to_output(lin.node, side, f"{lin.name}.inlier_out", self.name)
        lin.node.inputs[0] = masked

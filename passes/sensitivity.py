"""Sensitivity of the model's output to INT8 activations, one group at a time, and a budget.

For each activation tensor X that selected linears read (one group: q/k/v share one, gate/up another), the
model is run on a calibration batch with only X fake-quantized (per-tensor INT8, the observer's range) and
the mean per-token KL divergence ``KL(p_float ‖ p_X)`` of the next-token distributions is measured. All
groups are measured in one ONNX Runtime session: each quantized copy sits behind ``Where(flag_X, DQ(Q(X)), X)``
with ``flag_X`` a boolean graph input, so one run per group switches one flag on.

The budget keeps the most sensitive groups' activations in float (the weights are still quantized), or with
``action: per-token`` hands them to ``quantize-activations-dynamic`` (``only_switched: true``) instead —
per-token INT8 for ONNX Runtime, where a static scale cannot hold them:
``keep_float`` names a count; ``max_kl`` keeps the fewest most-sensitive groups in float such that the KL
measured with **all the other groups quantized at once** fits the budget (a binary search over the ranking,
one run per step: the joint effect, not a sum of single-group KLs, which underestimates it several-fold on
SmolLM2). ``KL ≈ ln(ppl_q / ppl_float)`` on text like the calibration batch, so a budget of ``ln(1.02)``
aims at +2 % perplexity. ``ranking: marginal`` orders groups by what each adds to the joint KL with all
the others quantized (one more run per group) instead of by its KL alone: interactions make the two differ;
``marginal-per-mac`` divides that by the group's MACs, for budgets bound by ``min_int8_macs``. When the joint
KL with every group quantized already meets ``max_kl`` (and ``keep_float`` is 0), nothing goes float and the
marginal runs are skipped: the report ranks by isolated KL and says so (``ranking`` in the pass stats).
The ranking and the joint KL before and after the budget go into the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..calib.observers import OBSERVERS, amax
from ..ir.feeds import input_specs, prompt_feeds
from ..ir.graph import Graph
from ..ir.storage import graph_session
from ..ir.passes import Pass, PassContext, PassResult
from .qdq_math import qmax, representable_scale
from .select import selected_linears

__all__ = ["AnalyzeSensitivityPass", "mean_kl"]

logger = logging.getLogger(__name__)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray, ref_log_probs: np.ndarray | None = None) -> float:
    """Mean over tokens of KL(softmax(ref) ‖ softmax(logits)); pass ``ref_log_probs`` to reuse them."""
    lp = _log_softmax(ref_logits) if ref_log_probs is None else ref_log_probs
    lq = _log_softmax(logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


class AnalyzeSensitivityPass(Pass):
    """Rank activation groups by output KL when quantized alone; keep the worst in float within a budget.

    Changes no node: it records the ranking and marks which linears' inputs the activation quantizer must
    leave in float. Needs a calibration batch and statistics.
    """

    name = "sensitivity"
    phase = "quantize"
    changes_activations = False
    requires_stats = True
    block_local = False  # ranks activation groups by their effect on the whole model's logits

    @dataclass(frozen=True)
    class Options:
        observer: str = "minmax"
        keep_float: int = 0
        max_kl: float | None = None
        tokens: int = 256  # tokens of the calibration batch the measurement runs on
        action: str = "float"  # what the budget does to the groups it takes out: float | per-token
        min_int8_macs: float = 0.0  # action float: at least this share of the decoder's linear MACs keeps INT8 inputs
        # isolated: KL of the group quantized alone; marginal: KL it adds to all the others; marginal-per-mac: that
        # per linear MAC of the group (the most loss removed per float MAC under a min_int8_macs floor)
        ranking: str = "isolated"
        roles: tuple = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")

        def __post_init__(self):
            object.__setattr__(self, "roles", tuple(self.roles))
            if self.observer not in OBSERVERS:
                raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}")
            if self.keep_float < 0 or (self.max_kl is not None and self.max_kl < 0):
                raise ValueError("keep_float and max_kl must be ≥ 0")
            if self.tokens < 2:
                raise ValueError("tokens must be ≥ 2")
            if self.action not in ("float", "per-token"):
                raise ValueError("action must be float or per-token")
            if self.ranking not in ("isolated", "marginal", "marginal-per-mac"):
                raise ValueError("ranking must be isolated, marginal or marginal-per-mac")
            if not 0.0 <= self.min_int8_macs <= 1.0:
                raise ValueError("min_int8_macs is a fraction in [0, 1]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        groups: dict = {}
        for lin in selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "activation"):
            groups.setdefault(lin.act.name, []).append(lin)
        if not groups:
            return PassResult(False, {"groups": 0})
        names = sorted(groups, key=lambda n: groups[n][0].name)
        stats = ctx.activation_stats(graph, names)
        scales = {n: amax(stats[n], o.observer, qmax(8)) / qmax(8) for n in names}
        kls, joint = self._measure(graph, ctx, names, scales)
        joint_all = joint(set(names))
        # with the budget met by every group quantized nothing goes float: the marginal runs would decide nothing
        met = o.max_kl is not None and o.keep_float == 0 and joint_all <= o.max_kl
        ranking_used = "isolated" if met else o.ranking
        if ranking_used.startswith("marginal"):  # what each group adds with every other group quantized too
            iterator = ctx.progress(names, "sensitivity (marginal)") if ctx.progress else names
            marginal = {n: joint_all - joint(set(names) - {n}) for n in iterator}
            if o.ranking == "marginal-per-mac":
                marginal = {n: v / sum(lin.macs_per_token for lin in groups[n]) for n, v in marginal.items()}
            ranking = sorted(names, key=lambda n: -marginal[n])
        else:
            ranking = sorted(names, key=lambda n: -kls[n])
        cap = self._mac_cap(ctx, ctx.structure(graph), ranking, groups) if o.action == "float" else len(ranking)
        count = min(o.keep_float, cap)
        if o.max_kl is not None and not met:  # the smallest prefix of the ranking whose removal meets the budget
            lo, hi = count, cap
            while lo < hi:
                mid = (lo + hi) // 2
                if joint(set(ranking[mid:])) <= o.max_kl:
                    hi = mid
                else:
                    lo = mid + 1
            count = lo
        keep = set(ranking[:count])
        joint_after = joint(set(ranking[count:]))
        for rank, n in enumerate(ranking, 1):
            for lin in groups[n]:
                ctx.record(lin.name, sensitivity_kl=kls[n], sensitivity_rank=rank)
                if n in keep:
                    what = "kept float" if o.action == "float" else "switched to per-token dynamic"
                    ctx.float_activations[lin.name] = f"{what} by the sensitivity budget (rank {rank}, KL {kls[n]:.3g})"
                    if o.action == "per-token":
                        ctx.per_token_activations.add(lin.name)
        kept = [groups[n][0].name for n in ranking if n in keep]
        return PassResult(False, {"groups": len(names), "kept_float": kept, "ranking": ranking_used,
                                  "kl_sum_all": float(sum(kls.values())), "kl_joint_all": joint_all,
                                  "kl_joint_after_budget": joint_after, "max_kl": o.max_kl,
                                  "limited_by_min_int8_macs": count == cap < len(ranking) and o.min_int8_macs > 0})

    def _mac_cap(self, ctx: PassContext, structure, ranking: list, groups: dict) -> int:
        """The longest prefix of the ranking that may go float with ``min_int8_macs`` of the decoder's
        linear MACs (all linears but the LM head) still reading INT8 activations — counted as the report
        counts them: the float MACs of split-off outlier channels are in the total and already float."""
        decoder = [lin for lin in structure.linears if lin.role != "lm_head"]
        split = sum(ctx.layers.get(lin.name, {}).get("split_float_macs_per_token", 0) for lin in decoder)
        total = sum(lin.macs_per_token for lin in decoder) + split
        allowed, spent = (1.0 - self.options.min_int8_macs) * total, split
        for i, n in enumerate(ranking):
            spent += sum(lin.macs_per_token for lin in groups[n])
            if spent > allowed + 1e-9 * total:
                return i
        return len(ranking)

    def _measure(self, graph: Graph, ctx: PassContext, names: list, scales: dict) -> tuple:
        """KL per group, and a function measuring any set of groups together: one ONNX Runtime session
        with a boolean switch per group."""
        if ctx.calibration_batch is None:
            raise ValueError("the sensitivity analysis needs a calibration batch")
        sample = np.ascontiguousarray(ctx.calibration_batch[..., :self.options.tokens])
        probe = graph.snapshot()  # nodes copied, weights shared: the switches are added to the copy only
        tensors = probe.tensors()
        flags = []
        for i, name in enumerate(names):
            x = tensors[name]
            consumers = list(x.outputs)
            flag = gs.Variable(f"__llmq_sens_flag_{i}", dtype=np.bool_, shape=[])
            probe.gs.inputs.append(flag)
            s = gs.Constant(f"__llmq_sens_scale_{i}",
                            np.asarray(representable_scale(scales[name], probe.float_dtype), probe.float_dtype))
            z = gs.Constant(f"__llmq_sens_zp_{i}", np.asarray(0, np.int8))
            q = probe.make_node("QuantizeLinear", [x, s, z], f"__llmq_sens_q_{i}", self.name, out_dtype=np.int8)
            dq = probe.make_node("DequantizeLinear", [q, s, z], f"__llmq_sens_dq_{i}", self.name, out_dtype=np.float32)
            sw = probe.make_node("Where", [flag, dq, x], f"__llmq_sens_sw_{i}", self.name, out_dtype=np.float32)
            for c in consumers:
                for j, t in enumerate(c.inputs):
                    if t is x and c is not Graph.producer(q):
                        c.inputs[j] = sw
            flags.append(flag.name)
        session = graph_session(probe, prepack=True)  # run once per group: packed weights pay for their copy
        inputs = input_specs(t for t in probe.gs.inputs if t.name not in flags)
        feeds = {**prompt_feeds(inputs, sample), **{f: np.asarray(False) for f in flags}}
        ref = session.run(None, feeds)[0][0]
        ref_lp = _log_softmax(ref)
        kls = {}
        iterator = ctx.progress(names, "sensitivity") if ctx.progress else names
        for name, flag in zip(iterator, flags):
            feeds[flag] = np.asarray(True)
            kls[name] = max(0.0, mean_kl(ref, session.run(None, feeds)[0][0], ref_lp))
            feeds[flag] = np.asarray(False)
        flag_of = dict(zip(names, flags))
        cache: dict = {}

        def joint(quantized: set) -> float:
            """KL with every group in ``quantized`` quantized at once."""
            key = frozenset(quantized)
            if key not in cache:
                run = dict(feeds)
                for n in quantized:
                    run[flag_of[n]] = np.asarray(True)
                cache[key] = max(0.0, mean_kl(ref, session.run(None, run)[0][0], ref_lp)) if quantized else 0.0
            return cache[key]
        return kls, joint

"""Sensitivity of the model's output to INT8 (or, ``format: fp8``, FP8 E4M3) activations, one group at a time,
and a budget.

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

**Block by block** (a partitioned graph, ``ctx.partition``: what a compile of a large model runs), no session
holds the whole model. The INT8 scale of each group comes from its part's full calibration
(:meth:`prepare_block`, in the sweep of the transforms before this pass). Then the sample is carried through
the parts, in float: in each block, every group of that block is scored by the noise it adds to the block's
output, relative to the residual stream there (``block_noise``: isolated, the group alone; marginal, what it
adds with the block's other groups quantized). The ranking is by that score instead of output KL (a local
proxy for a global effect: on SmolLM2-135M it picks the same kind of groups, see ``docs/scale.md``). The
budget itself is still decided on the joint output KL, measured exactly: the sample is carried through the
parts once per candidate budget, up to ``BATCH`` candidates in one sweep (a bracketing search over the
prefix length), and with every group quantized it equals the whole-model measurement. The report's
``measure`` says which of the two ranked, and the per-linear scores are ``sensitivity_block_noise`` /
``sensitivity_block_marginal`` instead of ``sensitivity_kl``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..calib.blockwise import PartSweep
from ..calib.observers import OBSERVERS, amax
from ..ir.errors import LlmqError
from ..ir.feeds import input_specs, prompt_feeds
from ..ir.graph import Graph
from ..ir.storage import graph_session
from ..ir.passes import Pass, PassContext, PassResult
from .qdq_math import FP8, FP8_MAX, qmax, representable_scale
from .select import selected_linears

__all__ = ["AnalyzeSensitivityPass", "mean_kl"]

logger = logging.getLogger(__name__)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray, ref_log_probs: np.ndarray | None = None,
            chunk: int = 64) -> float:
    """Mean over tokens of KL(softmax(ref) ‖ softmax(logits)); pass ``ref_log_probs`` to reuse them. Computed
    ``chunk`` tokens at a time in float64 (a 128k vocabulary makes whole-batch float64 copies hundreds of MB)."""
    vocab = ref_logits.shape[-1]
    ref_logits, logits = ref_logits.reshape(-1, vocab), logits.reshape(-1, vocab)
    if ref_log_probs is not None:
        ref_log_probs = ref_log_probs.reshape(-1, vocab)
    total = 0.0
    for start in range(0, ref_logits.shape[0], chunk):
        part = slice(start, start + chunk)
        lp = _log_softmax(ref_logits[part]) if ref_log_probs is None else ref_log_probs[part].astype(np.float64)
        lq = _log_softmax(logits[part])
        total += float(np.sum(np.exp(lp) * (lp - lq)))
    return total / max(ref_logits.shape[0], 1)


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
    by_parts = True  # ... which a partitioned graph measures in bounded memory (see the module)
    BATCH = 16  # candidate budgets measured together in one sweep of the parts

    @dataclass(frozen=True)
    class Options:
        observer: str = "minmax"
        format: str = "int"  # the activations' format the groups are scored in: int (INT8) | fp8 (E4M3)
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
            if self.format not in ("int", "fp8"):
                raise ValueError(f"format must be int or fp8, not {self.format!r}")
            if self.format == "fp8" and (self.observer not in ("minmax", "percentile") or self.action != "float"):
                raise ValueError("fp8 groups are scored with the minmax or percentile range and kept float")
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

    def _groups(self, graph: Graph, ctx: PassContext) -> dict:
        """``{activation tensor: [linears reading it]}`` of the selected linears (in scope)."""
        groups: dict = {}
        for lin in selected_linears(ctx.structure(graph), ctx, self.name, self.options.roles, "activation"):
            groups.setdefault(lin.act.name, []).append(lin)
        return groups

    def _scale(self, stats) -> float:
        top = FP8_MAX if self.options.format == "fp8" else qmax(8)
        return amax(stats, self.options.observer, qmax(8)) / top

    def prepare_block(self, graph: Graph, ctx: PassContext) -> None:
        """Block by block: the INT8 scale of each group of the part, from the part's full calibration."""
        declined = len(ctx.declined)
        groups = self._groups(graph, ctx)
        del ctx.declined[declined:]  # selecting declines what it skips: recorded once, when the pass runs
        stats = ctx.activation_stats(graph, sorted(groups)) if groups else {}
        ctx.prepared.setdefault(self.name, {}).update({n: self._scale(stats[n]) for n in groups})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        groups = self._groups(graph, ctx)
        if not groups:
            return PassResult(False, {"groups": 0})
        names = sorted(groups, key=lambda n: groups[n][0].name)
        if ctx.partition is not None:
            return self._run_by_parts(graph, ctx, groups, names)
        stats = ctx.activation_stats(graph, names)
        scales = {n: self._scale(stats[n]) for n in names}
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
        joint_after = joint(set(ranking[count:]))
        self._apply(ctx, groups, ranking, count, {n: {"sensitivity_kl": kls[n]} for n in names})
        return PassResult(False, {"groups": len(names), "kept_float": [groups[n][0].name for n in ranking[:count]],
                                  "ranking": ranking_used, "measure": "output KL",
                                  "kl_sum_all": float(sum(kls.values())), "kl_joint_all": joint_all,
                                  "kl_joint_after_budget": joint_after, "max_kl": o.max_kl,
                                  "limited_by_min_int8_macs": count == cap < len(ranking) and o.min_int8_macs > 0})

    def _apply(self, ctx: PassContext, groups: dict, ranking: list, count: int, scores: dict) -> None:
        """Record each group's rank and ``scores``; the first ``count`` of the ranking go float (or per-token)."""
        for rank, n in enumerate(ranking, 1):
            for lin in groups[n]:
                ctx.record(lin.name, sensitivity_rank=rank, **scores[n])
                if rank <= count:
                    what = "kept float" if self.options.action == "float" else "switched to per-token dynamic"
                    score = ", ".join(f"{k.replace('sensitivity_', '').replace('_', ' ')} {v:.3g}" for k, v in scores[n].items())
                    ctx.float_activations[lin.name] = f"{what} by the sensitivity budget (rank {rank}, {score})"
                    if self.options.action == "per-token":
                        ctx.per_token_activations.add(lin.name)

    def _run_by_parts(self, graph: Graph, ctx: PassContext, groups: dict, names: list) -> PassResult:
        """The budget on a partitioned graph, in bounded memory (see the module): each group ranked by the
        noise it adds to its block's output, on the sample carried through the float graph; then the joint
        output KL of candidate budgets measured exactly, several at once, carried through the parts."""
        o = self.options
        scales = ctx.prepared.get(self.name, {})
        missing = [n for n in names if n not in scales]
        if missing:
            raise ValueError(f"no prepared scale for {missing[0]}: prepare_block did not run on its part")
        probe, flag_of = self._switches(graph, names, scales)
        sweep = PartSweep(probe, ctx.partition, self._sample(ctx), [t for t in probe.gs.inputs if t.name not in flag_of.values()])
        off = {f: np.asarray(False) for f in flag_of.values()}
        owner = ctx.partition.of_node()
        part_of = {}
        for n in names:  # a linear made after partitioning (a split-off branch) belongs to its layer's part
            lin = groups[n][0]
            part_of[n] = owner.get(lin.node.name) or (f"layers.{lin.layer}" if lin.layer is not None else None)
            if part_of[n] is None:
                raise ValueError(f"{lin.name} is in no part of the partition")
        logits = graph.gs.outputs[0].name  # the logits, as the whole-model measure reads them
        last = [i for i, p in enumerate(ctx.partition.parts) if logits in p.outputs]
        if not last:
            raise LlmqError(f"no part of the partition makes the graph's first output {logits}",
                            "compile whole (--no-blocks)")
        last = last[0]

        def switched(quantized) -> dict:
            return {**off, **{flag_of[n]: np.asarray(True) for n in quantized}}

        isolated, marginal, state, ref = {}, {}, {}, None
        iterator = ctx.progress(sweep, "sensitivity (blocks)") if ctx.progress else sweep
        for index, part, run in iterator:
            base = run(state, off)
            mine = [n for n in names if part_of[n] == part.name]
            if mine and part.outputs:
                out = part.outputs[0]

                def noise(quantized) -> float:
                    return block_noise(base[out], run(state, switched(quantized))[out])

                every = noise(mine)
                for n in mine:
                    isolated[n] = noise([n])
                    marginal[n] = every - noise([m for m in mine if m != n]) if len(mine) > 1 else every
            if index == last:
                ref = base[logits]
            state = sweep.carry(index, state, base)
        if o.ranking == "isolated":
            score = isolated
        elif o.ranking == "marginal":
            score = marginal
        else:
            score = {n: v / sum(lin.macs_per_token for lin in groups[n]) for n, v in marginal.items()}
        ranking = sorted(names, key=lambda n: -score[n])
        cap = self._mac_cap(ctx, ctx.structure(graph), ranking, groups) if o.action == "float" else len(ranking)
        known: dict = {}

        def measure(counts) -> None:
            """The joint KL with the first ``count`` groups of the ranking left out, for each of ``counts``."""
            for c in set(counts) - set(known):
                if c >= len(ranking):  # every group left float: the float model itself
                    known[c] = 0.0
            todo = sorted(set(counts) - set(known))
            if not todo:
                return
            sets = [switched(ranking[c:]) for c in todo]
            states = [{} for _ in todo]
            label = f"sensitivity ({len(todo)} budget{'s' if len(todo) > 1 else ''})"
            for index, part, run in (ctx.progress(sweep, label) if ctx.progress else sweep):
                for k, flags in enumerate(sets):
                    out = run(states[k], flags)
                    if index == last:
                        known[todo[k]] = max(0.0, mean_kl(ref, out[logits]))
                    states[k] = sweep.carry(index, states[k], out)

        count = min(o.keep_float, cap)
        measure([0, count])
        if o.max_kl is not None and not (o.keep_float == 0 and known[0] <= o.max_kl):
            lo, hi = count, cap  # the smallest count in [lo, hi] whose joint KL meets the budget (hi if none does)
            while lo < hi and known.get(lo, np.inf) > o.max_kl:
                candidates = sorted({int(round(x)) for x in np.linspace(lo, hi, min(hi - lo + 1, self.BATCH))})
                measure(candidates)
                inside = [c for c in known if lo <= c <= hi]
                good = [c for c in inside if known[c] <= o.max_kl]
                top = min(good) if good else hi
                below = [c for c in inside if c < top and known[c] > o.max_kl]
                lo, hi = (max(below) + 1 if below else lo), top
                if hi == lo or all(c in known for c in range(lo, hi)):
                    break
            count = lo if known.get(lo, np.inf) <= o.max_kl else hi
            measure([count])
        self._apply(ctx, groups, ranking, count,
                    {n: {"sensitivity_block_noise": isolated[n], "sensitivity_block_marginal": marginal[n]} for n in names})
        return PassResult(False, {"groups": len(names), "kept_float": [groups[n][0].name for n in ranking[:count]],
                                  "ranking": o.ranking, "measure": "block output noise (block by block)",
                                  "kl_joint_all": known[0], "kl_joint_after_budget": known[count], "max_kl": o.max_kl,
                                  "budgets_measured": len(known),
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
        sample = self._sample(ctx)
        probe, flag_of = self._switches(graph, names, scales)
        flags = [flag_of[n] for n in names]
        session = graph_session(probe, prepack=True)  # run once per group: packed weights pay for their copy
        inputs = input_specs(t for t in probe.gs.inputs if t.name not in flags)
        feeds = {**prompt_feeds(inputs, sample), **{f: np.asarray(False) for f in flags}}
        ref = session.run(None, feeds)[0][0]
        kls = {}
        iterator = ctx.progress(names, "sensitivity") if ctx.progress else names
        for name, flag in zip(iterator, flags):
            feeds[flag] = np.asarray(True)
            kls[name] = max(0.0, mean_kl(ref, session.run(None, feeds)[0][0]))
            feeds[flag] = np.asarray(False)
        cache: dict = {}

        def joint(quantized: set) -> float:
            """KL with every group in ``quantized`` quantized at once."""
            key = frozenset(quantized)
            if key not in cache:
                run = dict(feeds)
                for n in quantized:
                    run[flag_of[n]] = np.asarray(True)
                cache[key] = max(0.0, mean_kl(ref, session.run(None, run)[0][0])) if quantized else 0.0
            return cache[key]
        return kls, joint

    def _sample(self, ctx: PassContext) -> np.ndarray:
        if ctx.calibration_batch is None:
            raise ValueError("the sensitivity analysis needs a calibration batch")
        return np.ascontiguousarray(ctx.calibration_batch[..., :self.options.tokens])

    def _switches(self, graph: Graph, names: list, scales: dict) -> tuple:
        """A copy of the graph (weights shared) where each group's tensor passes through
        ``Where(flag, DQ(Q(x)), x)`` with ``flag`` a boolean graph input; returns (copy, {group: flag name})."""
        probe = graph.snapshot()  # nodes copied, weights shared: the switches are added to the copy only
        tensors = probe.tensors()
        flag_of = {}
        for i, name in enumerate(names):
            x = tensors[name]
            consumers = list(x.outputs)
            flag = gs.Variable(f"__llmq_sens_flag_{i}", dtype=np.bool_, shape=[])
            probe.gs.inputs.append(flag)
            s = gs.Constant(f"__llmq_sens_scale_{i}",
                            np.asarray(representable_scale(scales[name], probe.float_dtype), probe.float_dtype))
            fp8 = self.options.format == "fp8"
            z = gs.Constant(f"__llmq_sens_zp_{i}", np.zeros((), FP8) if fp8 else np.asarray(0, np.int8))
            q = probe.make_node("QuantizeLinear", [x, s, z], f"__llmq_sens_q_{i}", self.name,
                                out_dtype=None if fp8 else np.int8)
            dq = probe.make_node("DequantizeLinear", [q, s, z], f"__llmq_sens_dq_{i}", self.name, out_dtype=np.float32)
            sw = probe.make_node("Where", [flag, dq, x], f"__llmq_sens_sw_{i}", self.name, out_dtype=np.float32)
            for c in consumers:
                for j, t in enumerate(c.inputs):
                    if t is x and c is not Graph.producer(q):
                        c.inputs[j] = sw
            flag_of[name] = flag.name
        return probe, flag_of


def block_noise(reference: np.ndarray, value: np.ndarray) -> float:
    """Mean over tokens of ``‖value_t − reference_t‖² / ‖reference_t‖²`` (the last axis is the feature axis):
    the noise a change adds to the residual stream, relative to it, as the next norm sees it."""
    r = np.asarray(reference, np.float64).reshape(-1, reference.shape[-1])
    d = np.asarray(value, np.float64).reshape(-1, reference.shape[-1]) - r
    return float(np.mean(np.sum(d * d, axis=-1) / np.maximum(np.sum(r * r, axis=-1), 1e-30)))

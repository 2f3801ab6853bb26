"""The block-by-block compile: the recipe's passes run on one part of the graph at a time.

The graph is partitioned once at its block boundaries (:mod:`llmq.ir.partition`: prefix, ``layers.i``, head).
For each part, in order:

1. the passes see only that part's linears and attention block (:class:`~llmq.ir.passes.Scope`; the
   structure is found again after every change, restricted to the part);
2. their calibration comes from :class:`~llmq.calib.blockwise.BlockwiseRunner`: one ONNX Runtime session over
   the part's weights, fed with the part's inputs saved on disk; an exact pass proves itself on the part's
   outputs (its residual output and any graph output made in it) instead of the logits;
3. the part advances: its outputs, as compiled (``calibration: {propagate: quantized}``, the default:
   GPTQ's order, each block calibrated on what the deployed model will feed it) or as given (``propagate:
   float``: advanced before its passes run), are saved for the parts after it;
4. its new constants move to a scratch file read lazily (:func:`~llmq.ir.storage.spill`), and the structure
   and samples that held its old weights are dropped.

So memory holds one block's weights and one batch of its activations, not the model. Each part's work is a
function of (the graph's part, its saved inputs, the recipe), which is what a later fan-out to workers needs
(see ``docs/scale.md``).

A pass that ranks or budgets across the whole model (``block_local = False``) splits the work into sweeps if
it can run over the partition in bounded memory (``by_parts``: sensitivity): the passes before it run in
one sweep, which also has it gather what it needs of each part (its ``prepare_block``); it runs once over the
partitioned graph; the passes after it run in a second sweep, calibrated afresh (so ``w8a8`` propagates its
calibration twice). A model-wide pass that cannot, or a graph that does not partition into a chain of blocks,
compiles whole, and the report says why.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from .calib.blockwise import BlockwiseRunner
from .ir.partition import Partition, partition
from .ir.passes import PassContext, PassManager, Scope
from .ir.storage import release_memory, spill
from .report import layer_sqnr

__all__ = ["BlockPlan", "plan_blocks", "run_blocks"]

logger = logging.getLogger(__name__)


@dataclass
class BlockPlan:
    """How a compile runs its passes: ``parts`` (block by block) or whole, with the reason."""

    parts: Partition | None
    why_whole: str | None = None
    propagate: str = "quantized"
    blocks: list = field(default_factory=list)  # per part and sweep: name, sweep, linears, seconds
    spilled_bytes: int = 0
    activation_bytes: int = 0

    def summary(self) -> dict:
        if self.parts is None:
            return {"mode": "whole", "why": self.why_whole}
        layers = [b for b in self.blocks if b["name"].startswith("layers.")]
        per_block = sum(b["seconds"] for b in layers) / len({b["name"] for b in layers}) if layers else None
        return {"mode": "blocks", "parts": len(self.parts.parts), "propagate": self.propagate,
                "sweeps": max((b["sweep"] for b in self.blocks), default=0),
                "seconds_per_block": round(per_block, 3) if per_block is not None else None,
                "activation_bytes_written": self.activation_bytes, "weight_bytes_spilled": self.spilled_bytes,
                "blocks": self.blocks}


def plan_blocks(graph, structure, pipeline: PassManager, propagate: str) -> BlockPlan:
    """Block by block where every pass is block-local and the graph partitions; otherwise whole, saying why."""
    whole = [p.name for p in pipeline.passes if not p.block_local and not p.by_parts]
    if not pipeline.passes:
        return BlockPlan(None, "the recipe has no passes")
    if whole:
        return BlockPlan(None, f"{', '.join(whole)} ranks across the whole model")
    try:
        parts = partition(graph, structure)
    except ValueError as exc:
        return BlockPlan(None, f"the graph does not partition into blocks: {exc}")
    owner = parts.of_node()
    for part in parts.parts:  # a part's linears are its layer's, or it is not a chain of blocks
        layer = _layer(part.name)
        nodes = set(part.nodes)
        wrong = [lin.name for lin in structure.linears if lin.node.name in nodes and layer is not None
                 and lin.layer not in (layer, None)]
        if wrong:
            return BlockPlan(None, f"part {part.name} holds linears of another layer ({wrong[0]})")
    for lin in structure.linears:  # a fold into a norm the part before holds would change its finished outputs
        if lin.norm is not None and owner.get(lin.norm.node.name) not in (None, owner.get(lin.node.name)):
            return BlockPlan(None, f"{lin.name} reads a norm of the part before ({owner[lin.norm.node.name]}: a "
                                   "post-LN block), so folds into it would cross parts")
    return BlockPlan(parts, propagate=propagate)


def _layer(name: str) -> int | None:
    m = re.fullmatch(r"layers\.(\d+)", name)
    return int(m.group(1)) if m else None


def run_blocks(graph, plan: BlockPlan, pipeline: PassManager, ctx: PassContext, batches, sqnr: bool, scratch: str,
               progress=None) -> tuple:
    """Run ``pipeline`` part by part (see the module); returns (pass records merged over the parts, SQNR per
    linear). ``batches``: int64 [samples, seq] calibration tokens, or None (weight-only recipes).

    A model-wide pass that works by parts (``by_parts``: sensitivity) splits the pipeline: the passes before
    it run in one sweep of the parts, which also calls its ``prepare_block`` on each; it then runs once over
    the partitioned graph; the passes after it run in a sweep of their own, calibrated afresh."""
    records: list = []
    sqnr_values: dict = {}
    segments = _segments(pipeline.passes)
    for number, (local, model_wide) in enumerate(segments, 1):
        sub = PassManager(local, verify=pipeline.verify, dump_dir=pipeline.dump_dir, progress=pipeline.progress,
                          release=False)
        label = "blocks" if len(segments) == 1 else f"blocks (sweep {number}/{len(segments)})"
        if local or model_wide is not None:
            records.extend(_sweep(graph, plan, sub, ctx, batches, sqnr, scratch, progress, label, number, model_wide,
                                  sqnr_values))
        if model_wide is not None:
            ctx.partition = plan.parts
            try:
                records.extend(PassManager([model_wide], progress=pipeline.progress, release=False).run(graph, ctx))
            finally:
                ctx.partition = None
                ctx.prepared.pop(model_wide.name, None)
                ctx.invalidate(activations=True)
    return records, sqnr_values


def _segments(passes: list) -> list:
    """``[(block-local passes, the model-wide pass after them or None)]``, split at each ``by_parts`` pass."""
    out, local = [], []
    for p in passes:
        if p.block_local:
            local.append(p)
        else:
            out.append((local, p))
            local = []
    if local or not out:
        out.append((local, None))
    return out


def _sweep(graph, plan: BlockPlan, pipeline: PassManager, ctx: PassContext, batches, sqnr: bool, scratch: str,
           progress, label: str, number: int, prepare, sqnr_values: dict) -> list:
    """One sweep of the parts: ``pipeline`` on each, then ``prepare.prepare_block`` (a model-wide pass)."""
    parts = plan.parts.parts
    runner = BlockwiseRunner(graph, plan.parts, [b[None] for b in batches]) if batches is not None else None
    spill_path = os.path.join(scratch, "llmq-compiled-blocks.data")
    records: list = []
    indices = range(len(parts))
    try:
        for i in (progress(indices, label) if progress else indices):
            part = parts[i]
            started = time.perf_counter()
            layer = _layer(part.name)
            ctx.scope = Scope(part.name, layer, frozenset(part.nodes))
            ctx.invalidate(activations=True)
            if runner is not None:
                _runner_providers(ctx, runner, i)
                if plan.propagate == "float":
                    _advance_with_prefetch(runner, i, pipeline.passes, ctx, graph)
            scoped = ctx.structure(graph)
            linears = len(scoped.linears)
            if (linears or scoped.attention) and pipeline.passes:
                before: dict = {}

                def snapshot(phase, g, before=before):
                    if phase == "quantize" and sqnr and runner is not None:
                        found = ctx.structure(g)
                        before["structure"] = found
                        before["sample"] = dict(ctx.activation_sample(g, sorted({lin.act.name for lin in found.linears})))

                pipeline.before_phase = snapshot
                records.append(pipeline.run(graph, ctx))
                if before:
                    sqnr_values.update(layer_sqnr(before["structure"], graph, before["sample"]))
                before.clear()
            if prepare is not None and linears:
                prepare.prepare_block(graph, ctx)
            if runner is not None and plan.propagate != "float":
                runner.advance(i)
            ctx.invalidate(activations=True)  # the structure held this part's old weights
            plan.spilled_bytes += spill(graph.gs, spill_path)
            release_memory()
            seconds = time.perf_counter() - started
            plan.blocks.append({"name": part.name, "sweep": number, "linears": linears, "seconds": round(seconds, 3)})
            logger.info("part %s (%d/%d, sweep %d): %d linears in %.1f s", part.name, i + 1, len(parts), number,
                        linears, seconds)
    finally:
        ctx.scope = None
        ctx.invalidate(activations=True)
        ctx.stats_provider = ctx.sample_provider = ctx.stream_provider = ctx.output_probe = None
        pipeline.before_phase = None
        if runner is not None:
            plan.activation_bytes += runner.bytes_written
            runner.close()
    return merge_records(records)


def _advance_with_prefetch(runner: BlockwiseRunner, index: int, passes: list, ctx: PassContext, graph) -> None:
    """Advance part ``index`` (float propagation: before its passes) and, in the same run, collect what the
    first pass to read calibration asks for (``prefetch_inputs``: AWQ's Gram sums) into
    ``ctx.prefetched_inputs``: the part's forward runs once for both, not twice. Nothing is prefetched when
    a pass before it changes activations (its numbers would be stale) or it asks for nothing."""
    fetch = None
    for p in passes:
        prefetch = getattr(p, "prefetch_inputs", None)
        if prefetch is not None:
            fetch = prefetch(ctx.structure(graph), ctx)
            break
        if p.changes_activations:
            break
    if fetch is None:
        runner.advance(index)
        return
    names, each, finish = fetch
    runner.advance(index, tuple(names), each)
    ctx.prefetched_inputs.update(finish())


def _runner_providers(ctx: PassContext, runner: BlockwiseRunner, index: int) -> None:
    """The context's calibration, answered by part ``index``'s session on its saved inputs."""

    def sample(graph, names):
        out: dict = {}
        runner.run(index, names, out.__setitem__, [0])
        return out

    ctx.stats_provider = lambda graph, names: runner.stats(index, names)
    ctx.sample_provider = sample
    ctx.stream_provider = lambda graph, names, each: runner.run(index, names, each)
    ctx.output_probe = lambda graph: runner.outputs(index, 0)


def merge_records(per_part: list) -> list:
    """One record per pass over all parts (a pass a recipe names twice, with different options: one each):
    seconds, counts and per-kind counts summed, ``modified`` or ``rolled_back`` if any part was, SQNRs the
    worst (lowest) part's, other numbers the largest (errors: the worst part's), and ``mean_``/``median_``
    values averaged over the parts that report them."""
    merged: dict = {}
    for records in per_part:
        for r in records:
            m = merged.setdefault((r["pass"], repr(r["options"])), {"pass": r["pass"], "options": r["options"], "modified": False,
                                       "seconds": 0.0, "stats": {}, "_means": {}})
            m["modified"] |= r["modified"]
            m["seconds"] = round(m["seconds"] + r["seconds"], 3)
            for key, value in r["stats"].items():
                old = m["stats"].get(key)
                if value is None:
                    m["stats"].setdefault(key, None)
                elif isinstance(value, bool):
                    m["stats"][key] = bool(old) or value
                elif isinstance(value, dict):
                    total = dict(old or {})
                    for k, v in value.items():
                        total[k] = total.get(k, 0) + v if isinstance(v, (int, float)) else v
                    m["stats"][key] = total
                elif not isinstance(value, (int, float)):
                    m["stats"][key] = value
                elif key.startswith(("mean_", "median_")):
                    m["_means"].setdefault(key, []).append(value)
                elif old is None:
                    m["stats"][key] = value
                elif "sqnr" in key:
                    m["stats"][key] = min(old, value)
                elif isinstance(value, int) and not key.endswith(("rank", "bits", "group_size", "keep_first")):
                    m["stats"][key] = old + value
                else:
                    m["stats"][key] = max(old, value)
    out = []
    for m in merged.values():
        for key, values in m.pop("_means").items():
            m["stats"][key] = round(float(np.mean(values)), 6)
        out.append(m)
    return out

"""The pass contract and the pass manager.

A pass is a small named object: ``run(graph, ctx) -> PassResult(modified, stats)``, with frozen typed
options, a ``phase`` (passes must run in non-decreasing phase order: transforms, then quantization, then
lowering; checked when the pipeline is built, not discovered at run time), the analyses it ``requires``
and whether it changes activation values (which invalidates calibration statistics). Passes keep no
state between runs.

A pass that claims ``exact = True`` (a rewrite that keeps the function: smoothing folds, reorders, splits)
proves it on the model being compiled: when the context has an ``output_probe`` (the driver gives one that
runs the graph on a calibration sample), the manager compares the graph's outputs after the pass with
those before it, and where the relative RMS error of any output exceeds ``EXACT_TOLERANCE`` it rolls the
graph and the pass's records back, and the pass is declined with the measured error as its reason.

The manager times each pass, optionally verifies the graph after each one that changed it (``onnx.checker``
+ strict shape inference), dumps the graph after each such pass, and on a failure leaves the graph as it
stood before the failing pass as a reproducer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import onnx

from .errors import LlmqError, PassError, UsageError
from .graph import Graph
from .storage import release_memory, session_inputs, weights_as_inputs, write_model
from .structure import Structure, discover

__all__ = ["Pass", "PassResult", "PassContext", "PassManager", "PHASES", "EXACT_TOLERANCE", "Scope", "exact_tolerance",
           "output_error", "save_model"]

logger = logging.getLogger(__name__)

PHASES = {"transform": 10, "quantize": 20, "lower": 30}
TWO_GB = 2**31 - 1
# An exact rewrite changes only the rounding of float sums: measured ≤ 2e-6 relative RMS on SmolLM2-135M's
# logits and the tiny test models; the folds this catches move them by 0.1–1.
EXACT_TOLERANCE = 1e-4


def exact_tolerance(dtype) -> float:
    """The exactness tolerance in a model of float type ``dtype``: a fold stores rescaled weights in that type,
    re-rounding each by up to its unit roundoff u (float16 4.9e-4, bfloat16 3.9e-3), which compounds over the
    layers (measured 4.8e-4 on a tiny float16 Llama); ten u, and never less than :data:`EXACT_TOLERANCE`."""
    import ml_dtypes

    u = float(ml_dtypes.finfo(dtype).eps) / 2
    return max(EXACT_TOLERANCE, 10 * u)


def save_model(model: onnx.ModelProto, path: str, external: bool | None = None) -> list:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when large. Returns the files."""
    if external is None:
        external = model.ByteSize() > TWO_GB - (64 << 20) if _fits_bytesize(model) else True
    if external:
        location = os.path.basename(path) + ".data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        return [path, os.path.join(os.path.dirname(path), location)]
    onnx.save_model(model, path)
    return [path]


def _fits_bytesize(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size a message over 2 GB
        return False


@dataclass(frozen=True)
class PassResult:
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Scope:
    """The part of the graph a block-by-block compile works on: decoder layer ``layer`` (its linears and
    attention block, found again after every change), or, for the parts around the blocks (``layer`` None),
    the linears among ``nodes`` that belong to no layer (the LM head)."""

    name: str
    layer: int | None = None
    nodes: frozenset = frozenset()

    def admits(self, lin) -> bool:
        if self.layer is not None:
            return lin.layer == self.layer
        return lin.layer is None and lin.node.name in self.nodes

    def restrict(self, structure: Structure) -> Structure:
        linears = [lin for lin in structure.linears if self.admits(lin)]
        names = {lin.name for lin in linears}
        return Structure(linears=linears,
                         attention=[a for a in structure.attention if self.layer is not None and a["layer"] == self.layer],
                         residual_adds=[r for r in structure.residual_adds if r["after"] in names],
                         embedding=structure.embedding, vocab_size=structure.vocab_size)


@dataclass
class PassContext:
    """What passes share within one compile: structure, calibration statistics, layer records.

    ``stats_provider(graph, tensor_names) -> {name: TensorStats}`` is given by the driver; statistics are
    cached until a pass that changes activations invalidates them, so no pass reads stale ones.
    """

    exclude: Callable[[str, str], bool] = lambda name, node: False
    stats_provider: Callable | None = None
    sample_provider: Callable | None = None  # (graph, names) -> {name: one calibration batch of that tensor}
    stream_provider: Callable | None = None  # (graph, names, each) -> calls each(name, array) per calibration batch
    layers: dict = field(default_factory=dict)  # layer name -> {key: value}
    declined: list = field(default_factory=list)  # {pass, where, reason}
    float_activations: dict = field(default_factory=dict)  # linear name -> why its input stays float
    per_token_activations: set = field(default_factory=set)  # linears the budget switched to per-token dynamic
    calibration_batch: object = None  # one int64 [1, seq] batch of the calibration data, for measurements
    output_probe: Callable | None = None  # graph -> {output name: array} on a fixed sample (exactness checks)
    progress: Callable | None = None  # (iterable, description) -> iterable that shows progress
    scope: Scope | None = None  # block by block: passes see (and change) this part's linears only
    partition: object = None  # block by block, for a by_parts pass's run: the graph's Partition
    prepared: dict = field(default_factory=dict)  # pass name -> what its prepare_block gathered, part by part
    # a scratch file where a pass that makes many large constants (a backend's repacking) may move them as it
    # goes (ir.storage.spill), so memory holds a slice of the model's new weights, not all of them
    spill_to: str | None = None
    # input statistics a pass streams (AWQ's Gram sums), made ahead by whoever ran the calibration anyway (the
    # block loop, in the run that advances a float-propagated block); taken once, cleared with the activations
    prefetched_inputs: dict = field(default_factory=dict)
    _structure: Structure | None = None
    _stats: dict = field(default_factory=dict)
    _sample: dict = field(default_factory=dict)
    stats_collections: int = 0

    def structure(self, graph: Graph) -> Structure:
        if self._structure is None:
            found = discover(graph)
            self._structure = found if self.scope is None else self.scope.restrict(found)
        return self._structure

    def activation_stats(self, graph: Graph, names: list) -> dict:
        """Streaming statistics of each tensor in ``names`` over all calibration batches."""
        before = len(self._stats)
        out = _fill(self._stats, self.stats_provider, graph, names)
        self.stats_collections += len(self._stats) > before
        return out

    def activation_sample(self, graph: Graph, names: list) -> dict:
        """One calibration batch of each tensor in ``names`` (float32 arrays), for searches and errors."""
        return _fill(self._sample, self.sample_provider, graph, names)

    def stream(self, graph: Graph, names: list, each: Callable) -> None:
        """``each(name, array)`` for each tensor in ``names`` and each calibration batch (arrays keep their
        batch axis); where the driver gives no stream, once per tensor on the one-batch sample."""
        if self.stream_provider is not None:
            self.stream_provider(graph, names, each)
            return
        for name, value in self.activation_sample(graph, names).items():
            each(name, value[None])  # the sample drops the batch axis: put it back

    def invalidate(self, activations: bool) -> None:
        self._structure = None
        if activations:
            self._stats.clear()
            self._sample.clear()
            self.prefetched_inputs.clear()

    def checkpoint(self) -> tuple:
        """What :meth:`rollback` needs to forget every record made after this point."""
        return ({k: dict(v) for k, v in self.layers.items()}, len(self.declined), dict(self.float_activations),
                set(self.per_token_activations))

    def rollback(self, point: tuple) -> None:
        layers, declined, float_activations, per_token = point
        self.layers, self.float_activations, self.per_token_activations = layers, float_activations, per_token
        del self.declined[declined:]
        self.invalidate(activations=True)

    def record(self, layer: str, **values) -> None:
        self.layers.setdefault(layer, {}).update(values)

    def decline(self, pass_name: str, where: str, reason: str) -> None:
        self.declined.append({"pass": pass_name, "where": where, "reason": reason})


def output_error(reference: dict, outputs: dict) -> float:
    """The largest relative RMS difference ``‖a − r‖ / ‖r‖`` over the outputs both dicts name."""
    worst = 0.0
    for name, ref in reference.items():
        ref = np.asarray(ref, np.float64)
        diff = np.asarray(outputs[name], np.float64) - ref
        scale = float(np.sqrt(np.mean(ref * ref))) or 1.0
        error = float(np.sqrt(np.mean(diff * diff))) / scale
        worst = max(worst, error if np.isfinite(error) else np.inf)
    return worst


def _fill(cache: dict, provider, graph: Graph, names: list) -> dict:
    """Serve ``names`` from ``cache``, asking ``provider`` once for the missing ones."""
    missing = [n for n in names if n not in cache]
    if missing:
        if provider is None:
            raise LlmqError("this recipe needs calibration data but none is available",
                            "pass --calib-data (and --tokenizer if none lies beside the model), or use a weight-only recipe")
        cache.update(provider(graph, missing))
    return {n: cache[n] for n in names}


class Pass:
    """Base class: subclasses set ``name``, ``phase``, ``Options`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "transform"
    changes_activations: ClassVar[bool] = True
    requires_stats: ClassVar[bool] = False
    exact: ClassVar[bool] = False  # the rewrite keeps the graph's function (checked on the model: see above)
    # its decisions for one block need nothing outside it, so a compile may run it block by block (a pass that
    # ranks or budgets across the whole model sets False, and the compile then runs whole, unless it is by_parts)
    block_local: ClassVar[bool] = True
    # a model-wide pass that still works in bounded memory on a partitioned graph: a block-by-block compile calls
    # prepare_block(graph, ctx) on each part (scoped, calibrated) in the sweep of the passes before it, then
    # run(graph, ctx) once with ctx.partition set, and runs the passes after it in a sweep of their own
    by_parts: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options=None, **kwargs):
        if options is None:
            fields = {f.name for f in dataclasses.fields(self.Options)}
            unknown = sorted(set(kwargs) - fields)
            if unknown:
                raise UsageError(f"pass '{self.name}' has no option(s) {', '.join(unknown)}",
                                 f"its options are: {', '.join(sorted(fields)) or 'none'}")
            try:
                options = self.Options(**kwargs)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"pass '{self.name}': bad options: {exc}") from exc
        self.options = options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_block(self, graph: Graph, ctx: PassContext) -> None:
        """A ``by_parts`` pass: gather what :meth:`run` will need of the part in ``ctx.scope`` (into
        ``ctx.prepared[self.name]``), while its calibration is at hand."""

    def describe(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{self.name}({opts})"


@dataclass
class PassManager:
    passes: list
    verify: bool = False
    dump_dir: str | None = None
    progress: Callable[[str], None] | None = None
    before_phase: Callable[[str, Graph], None] | None = None  # called once as each phase starts
    release: bool = True  # hand memory back after each pass (a block-by-block caller does it once per block)

    def __post_init__(self):
        last = None
        for p in self.passes:
            if p.phase not in PHASES:
                raise UsageError(f"pass '{p.name}' has unknown phase '{p.phase}'")
            if last is not None and PHASES[p.phase] < PHASES[last.phase]:
                raise UsageError(f"pipeline order: '{p.name}' ({p.phase}) cannot run after '{last.name}' ({last.phase})",
                                 "list transforms first, then quantization, then lowering")
            last = p

    def describe(self) -> str:
        return " -> ".join(p.describe() for p in self.passes)

    def run(self, graph: Graph, ctx: PassContext) -> list:
        records = []
        phase = None
        reference = None  # the outputs of the graph as it stands, when known (see exact passes)
        for index, p in enumerate(self.passes):
            if p.phase != phase:
                phase = p.phase
                if self.before_phase:
                    self.before_phase(phase, graph)
            if self.progress:
                self.progress(p.name)
            started = time.perf_counter()
            checked = p.exact and ctx.output_probe is not None
            if checked:
                reference = ctx.output_probe(graph) if reference is None else reference
                snapshot, point = graph.snapshot(), ctx.checkpoint()
            try:
                result = p.run(graph, ctx)
            except LlmqError:
                self._reproducer(graph, index, p)
                raise
            except Exception as exc:
                self._reproducer(graph, index, p)
                raise PassError(p.name, f"{type(exc).__name__}: {exc}") from exc
            if result.modified and checked:
                graph.touch()
                after = ctx.output_probe(graph)
                error = output_error(reference, after)
                tolerance = exact_tolerance(graph.float_dtype)
                if error > tolerance:
                    graph.restore(snapshot)
                    ctx.rollback(point)
                    ctx.decline(p.name, "(whole pass)", f"not exact on this model: it moved the outputs by {error:.3g} "
                                f"of their RMS on a calibration sample (tolerance {tolerance:g}); rolled back")
                    logger.warning("%s is not exact on this model (output error %.3g); rolled back", p.name, error)
                    result = PassResult(False, {**result.stats, "rolled_back": True, "exactness_error": float(error)})
                else:
                    result = PassResult(True, {**result.stats, "exactness_error": float(error)})
                    reference = after
            elif result.modified:
                reference = None  # a lossy (or unchecked) pass: the next exact pass measures afresh
            seconds = time.perf_counter() - started
            if result.modified:
                graph.touch()
                ctx.invalidate(activations=p.changes_activations)
                if self.verify:
                    self._verify(graph, p)
                if self.dump_dir:
                    self._dump(graph, f"{index + 1:02d}-{p.name}.onnx")
            if self.release:
                release_memory()  # what the pass replaced goes back to the system before the next one runs
            records.append({"pass": p.name, "options": p.describe(), "modified": result.modified,
                            "seconds": round(seconds, 3), "stats": result.stats})
            logger.info("%s: modified=%s in %.2fs %s", p.name, result.modified, seconds, result.stats)
        return records

    def _verify(self, graph: Graph, p: Pass) -> None:
        model = weights_as_inputs(session_inputs(graph.to_model, graph.gs)[0])  # weightless: any model size
        try:
            if _fits_bytesize(model) and model.ByteSize() < TWO_GB:
                onnx.checker.check_model(model)
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except Exception as exc:
            raise PassError(p.name, f"graph no longer valid after this pass: {exc}") from exc

    def _dump(self, graph: Graph, filename: str) -> None:
        os.makedirs(self.dump_dir, exist_ok=True)
        write_model(graph.to_model, graph.gs, os.path.join(self.dump_dir, filename))

    def _reproducer(self, graph: Graph, index: int, p: Pass) -> None:
        if self.dump_dir:
            try:
                self._dump(graph, f"failed-in-{index + 1:02d}-{p.name}.onnx")
            except Exception:  # the reproducer is best effort; the original error matters more
                logger.warning("could not write the reproducer for %s", p.name)

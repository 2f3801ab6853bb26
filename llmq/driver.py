"""The compile driver: load → discover → calibrate → run the recipe's pipeline → lower → write.

Output folder (written under a temporary name and renamed, so a failure leaves nothing half-written):
``model.onnx`` (+ ``model.onnx.data`` when its weights pass 1 GiB), ``report.json``, ``recipe.yaml``, and the
tokenizer as ``model.tokenizer/`` when one was found. The model records the recipe, pipeline and llmq
version in ``metadata_props``; the same input, recipe and calibration data give byte-identical output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import resource
import shutil
import socket
import tempfile
import time
import weakref
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .backends.ort_hybrid import HYBRID_LIMIT, combine_prefill_decode
from .backends.ort_lowering import UnsignedInt8WeightsPass
from .backends.qdq import check_tensorrt_rules
from .backends.registry import BACKENDS, backend_named
from .backends.trt_plugin import is_plugin
from .blocks import BlockPlan, plan_blocks, run_blocks
from .calib.blockwise import part_openers
from .calib.collect import collect_stats, run_with_outputs
from .calib.data import load_calibration, load_holdout
from .expand import expanded_copy
from .frontends.onnx_loader import load_graph
from .frontends.torch_export import calib_path_for, tokenizer_dir_for
from .ir.errors import LlmqError
from .ir.graph import dtype_name
from .ir.passes import PassContext, PassManager
from .ir.storage import (COLLECT_OVER, INLINE_LIMIT, bytes_read, collecting, constant_nbytes, release_memory,
                         write_model)
from .ir.structure import discover, lite_linears
from .recipes import Recipe, load_recipe
from .report import (attention_table, int8_act_mac_fraction, layer_sqnr, layer_table, range_split_extra_mac_fraction,
                     sensitivity_svg, summary_text)
from .tokenizer import check_tokenizer, resolve_tokenizer
from .verify import block_outputs, check_bound, compared_outputs, verify_by_parts, verify_model

__all__ = ["compile", "CompileOptions", "CompileResult", "BACKENDS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """How to compile, beside the model and the recipe (all optional).

    ``calib``: a .txt/.jsonl/.npz file (default: ``<model>.calib.npz`` beside the model if ``llmq-export
    --self-calib`` wrote one, else the built-in text); ``tokenizer``: a HF tokenizer folder (default:
    ``<model>.tokenizer`` beside the model); ``exclude``: glob patterns over layer or node names; ``max_loss``:
    the sensitivity budget as a KL in nats/token (≈ ln of the perplexity ratio), replacing the recipe's count;
    ``backend``: a name in :data:`BACKENDS`; ``accuracy_level``: ONNX Runtime's MatMulNBits compute for the
    weight-only linears, 4- and 8-bit (onnxruntime backend: 0 float activations, the Q/DQ arithmetic; 4 INT8
    activations per block, faster and approximate; None: 0, except ``int8_weight_only_level``'s default);
    ``int8_weight_only_level``: the level of the 8-bit weight-only linears alone (None: ``accuracy_level`` if
    given, else 4 when the recipe quantizes activations to INT8 — its linears that a budget keeps float then
    get INT8 activations per block of 32 at run time, ONNX Runtime having no fast float-activation 8-bit
    kernel on x86 — and 0 for weight-only recipes); ``asym``: zero-point (UINT4/UINT8)
    weights, on backends that take them; ``fuse_attention``: onnxruntime backend, write each attention block
    as GroupQueryAttention (probed); ``w4a8_kernel``: onnxruntime backend, how ``w4a8`` linears are lowered
    (``nbits``: MatMulNBits at accuracy level 4; ``int8``: MatMulIntegerToFloat, exact; ``hybrid``: both, int8
    for prompts and nbits for decode steps, see :mod:`llmq.backends.ort_hybrid`); ``int8_weights``: how
    the weights of integer MatMuls are stored (``signed``: int8, u8 × s8, ONNX Runtime's fast GEMM, which needs
    ``session.x64quantprecision=1`` on x86 CPUs without VNNI; ``unsigned``: + 128 as uint8, u8 × u8, exact
    everywhere without options); ``allow_loss``: write the model even when the end-to-end check finds it
    outside the recipe's bound (with a loud warning) instead of failing; ``verify``: check the graph after
    every pass; ``dump_dir``: write the graph after every pass that changed it; ``sqnr``: per-layer SQNR in
    the report; ``blocks``: run the passes block by block where the recipe and the graph allow (see
    :mod:`llmq.blocks`), else on the whole graph at once."""

    calib: str | None = None
    tokenizer: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    exclude: tuple = ()
    backend: str = "qdq"
    overwrite: bool = False
    dump_dir: str | None = None
    verify: bool = False
    quiet: bool = False
    sqnr: bool = True
    max_loss: float | None = None
    accuracy_level: int | None = None
    int8_weight_only_level: int | None = None
    asym: bool = False
    fuse_attention: bool = True
    w4a8_kernel: str = "nbits"
    int8_weights: str = "signed"
    allow_loss: bool = False
    blocks: bool = True


@dataclass
class CompileResult:
    output_dir: str
    paths: dict  # role -> path
    report: dict


@dataclass
class _Calibration:
    """The calibration data of one compile and the context the passes read it through."""

    batches: np.ndarray | None  # int64 [samples, seq]
    source: str | None
    tokenizer: object
    tokenizer_path: str | None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def compile(model: str, recipe: str | Recipe = "w8a8", output: str = "out", options: CompileOptions | None = None,
            **overrides) -> CompileResult:
    """Compile the ONNX model at ``model`` with ``recipe`` into the folder ``output``: load → discover →
    calibrate → transform and quantize → lower → write → verify against the input. ``options`` (or its
    fields as keyword arguments) say how; see :class:`CompileOptions`. Returns the written paths and the report
    (also written as ``report.json``)."""
    opts = replace(options or CompileOptions(), **overrides)
    t0, read0 = time.perf_counter(), bytes_read()
    times: dict = {}
    recipe, backend, opts = _plan(recipe, opts)
    output = os.path.abspath(output)
    if os.path.exists(output) and not opts.overwrite:
        raise LlmqError(f"output folder {output} already exists", "pass --overwrite to replace it, or choose another -o")
    _remove_stale(output)

    logger.info("phase load")
    graph, structure = _load(model, recipe)
    input_bytes = sum(constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    with collecting(input_bytes >= COLLECT_OVER):  # a small model: no full garbage collections
        times["load_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        logger.info("phase calibration data")
        calib = _calibration(model, recipe, opts, structure)
        times["calib_data_s"] = time.perf_counter() - t
        ctx = _context(recipe, opts, calib)
        pipeline = PassManager(recipe.build(), verify=opts.verify, dump_dir=opts.dump_dir,
                               progress=lambda name: logger.info("running %s", name))
        plan = plan_blocks(graph, structure, pipeline, recipe.calib_propagate) if opts.blocks else \
            BlockPlan(None, "block-by-block compile turned off (--no-blocks)")
        logger.info("phase passes (%s)", "block by block" if plan.parts is not None else f"whole: {plan.why_whole}")
        # what the rest needs of the input's structure; dropping it frees the original weights it references as
        # the passes replace them (the layer table needs names and shapes only)
        vocab_size, structure_summary, blocks = structure.vocab_size, structure.summary(), block_outputs(structure)
        linear_names = {lin.name for lin in structure.linears}
        linears = lite_linears(structure)
        del structure
        if plan.parts is not None:
            os.makedirs(os.path.dirname(output), exist_ok=True)  # the scratch file lives beside the output
            scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_owner()}-", dir=os.path.dirname(output))
            weakref.finalize(graph, shutil.rmtree, scratch, True)  # the graph reads its finished blocks from there
            t = time.perf_counter()
            records, sqnr_values = run_blocks(graph, plan, pipeline, ctx, calib.batches, opts.sqnr and calib.batches is not None,
                                              scratch, ctx.progress)
            times["passes_s"] = time.perf_counter() - t
            rows = layer_table(linears, ctx.layers, sqnr_values, ctx.declined)
        else:
            rows, sqnr_values, records = _transform_and_quantize(graph, linears, pipeline, ctx, calib, opts, times)
        ctx.invalidate(activations=True)
        ctx.output_probe = ctx.stats_provider = ctx.sample_provider = ctx.stream_provider = None
        release_memory()

        _stamp(graph, recipe, pipeline, backend, model, vocab_size)
        violations = check_tensorrt_rules(graph)
        t = time.perf_counter()
        logger.info("phase lowering")
        ctx.spill_to = os.path.join(scratch, "llmq-lowered.data") if plan.parts is not None else None
        unsigned = [UnsignedInt8WeightsPass()] if opts.int8_weights == "unsigned" else []
        prefill_passes = backend.prefill_lowering_passes(opts)
        prefill = graph.snapshot() if prefill_passes else None  # constants shared: a second lowering costs its new weights
        lowering = PassManager(backend.lowering_passes(opts) + unsigned, verify=opts.verify,
                               dump_dir=os.path.join(opts.dump_dir, "backend") if opts.dump_dir else None).run(graph, ctx)
        prefill_lowering = None
        if prefill is not None:
            prefill_lowering = PassManager(prefill_passes + unsigned, verify=opts.verify).run(prefill, ctx)
            prefill = _hybrid_worth_it(graph, prefill, prefill_lowering)
        times["lowering_s"] = time.perf_counter() - t

        with _staging(output) as tmp:
            t = time.perf_counter()
            model_path = os.path.join(tmp, "model.onnx")
            logger.info("phase write")
            files = write_model(graph.to_model, graph.gs, model_path, adopt=True)  # weights streamed, one at a time
            plugins = any(is_plugin(n.op, n.domain) for n in graph.gs.nodes)
            int8_weights = _int8_weights(graph, *([prefill] if prefill is not None else []))
            # the prefill lowering in memory now: its unchanged weights may read from the scratch file of the
            # finished blocks, which goes with the graph
            prefill_model = prefill.to_model() if prefill is not None else None
            del prefill
            origin = graph.origin  # the input's weights, moved out of its file at load: verification runs on them
            del graph
            release_memory()
            by_parts = plan.parts if plan.parts is not None and input_bytes > VERIFY_BY_PARTS_OVER else None
            backend_info = {"name": backend.name, "tensorrt_rule_violations": violations, "lowering": lowering, **int8_weights,
                            **_build(backend, model_path, tmp, opts, by_parts, recipe.opset)}
            decode_verification = None
            if prefill_model is not None:  # --w4a8-kernel hybrid: the decode lowering is checked alone, then joined
                logger.info("phase verify (decode kernel)")
                decode_verification = _verify_output(model, model_path, recipe, opts, calib, vocab_size, blocks,
                                                     backend.accuracy_level(opts), ctx.progress, by_parts,
                                                     getattr(origin, "reference", None))
                files = _write_hybrid(model_path, files, prefill_model)
                backend_info["hybrid"] = {"prefill_lowering": prefill_lowering, "branches": HYBRID_BRANCHES}
                del prefill_model
                release_memory()
            _write_side_files(tmp, rows, recipe, calib)
            times["write_s"] = time.perf_counter() - t
            t = time.perf_counter()
            logger.info("phase verify")
            # plugin nodes (TensorRT only) are checked through their ONNX definition, decoded from their own inputs
            checked, scratch_files = expanded_copy(model_path, tmp, recipe.opset, plugins)
            verification = _verify_output(model, checked, recipe, opts, calib, vocab_size, blocks,
                                          backend.accuracy_level(opts), ctx.progress, by_parts,
                                          getattr(origin, "reference", None))
            if decode_verification is not None:
                verification["decode_kernel"] = decode_verification
            for f in scratch_files:
                os.remove(f)
            if scratch_files:
                verification["plugins_checked_as"] = "their ONNX definition (llmq.expand), decoded from the nodes' inputs"
            del origin
            times["verify_s"] = time.perf_counter() - t
            times["total_s"] = time.perf_counter() - t0
            report = _report(model, recipe, backend_info, verification, pipeline, structure_summary, records, ctx, rows,
                             linear_names, calib, sqnr_values, times, files, plan, bytes_read() - read0)
            with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=1, default=_json_default)
            _publish(tmp, output)
        paths = {"model": os.path.join(output, "model.onnx"), "report": os.path.join(output, "report.json"),
                 "recipe": os.path.join(output, "recipe.yaml")}
        if len(files) > 1:
            paths["external_data"] = os.path.join(output, os.path.basename(files[1]))
        if calib.tokenizer_path:
            paths["tokenizer"] = os.path.join(output, "model.tokenizer")
        report["summary"] = summary_text(report)
        return CompileResult(output, paths, report)


# ---------------------------------------------------------------- the steps

def _plan(recipe, opts: CompileOptions) -> tuple:
    """(recipe with the options applied, backend, options with the accuracy levels resolved); refuses combinations
    the backend cannot take."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    backend = backend_named(opts.backend)
    for level in (opts.accuracy_level, opts.int8_weight_only_level):
        if level is not None and level not in (0, 1, 2, 3, 4):
            raise LlmqError(f"unknown accuracy level {level}", "choose 0 (float activations) to 4 (INT8 activations)")
    int8_level = opts.int8_weight_only_level
    if int8_level is None:  # INT8 activations per block where the recipe's are INT8 anyway (measured: see the docstring)
        int8_level = opts.accuracy_level if opts.accuracy_level is not None else (4 if recipe.int8_activations else 0)
    opts = replace(opts, accuracy_level=opts.accuracy_level or 0, int8_weight_only_level=int8_level)
    if opts.int8_weights not in ("signed", "unsigned"):
        raise LlmqError(f"unknown int8 weight storage '{opts.int8_weights}'", "choose signed or unsigned")
    if opts.max_loss is not None:
        recipe = recipe.with_loss_budget(opts.max_loss)
    if opts.asym:
        if backend.symmetric_weights_only:
            raise LlmqError(f"--asym (zero-point weights) cannot target the {backend.name} backend: TensorRT takes "
                            "symmetric weights only", "use --backend onnxruntime, or drop --asym")
        recipe = recipe.with_asymmetric_weights()
    if backend.name not in recipe.backends:
        raise LlmqError(f"recipe '{recipe.name}' cannot target the {backend.name} backend: {recipe.description}",
                        f"use --backend {' or '.join(recipe.backends)}")
    return recipe, backend, opts


def _load(model: str, recipe: Recipe) -> tuple:
    graph = load_graph(model, recipe.opset)
    structure = discover(graph)
    if not structure.linears:
        raise LlmqError(f"{model} has no quantizable linear layer (MatMul/Gemm with a constant weight)",
                        "nothing to compile: check that this is the model you meant")
    return graph, structure


def _calibration(model: str, recipe: Recipe, opts: CompileOptions, structure) -> _Calibration:
    calib = opts.calib
    if calib is None and os.path.isfile(calib_path_for(model)):
        calib = calib_path_for(model)
        logger.info("calibrating on %s (text the model sampled itself at export)", calib)
    tok_path = resolve_tokenizer(opts.tokenizer, tokenizer_dir_for(model))
    tok = check_tokenizer(tok_path, structure.vocab_size) if tok_path else None
    batches = None
    if recipe.needs_calibration or (opts.sqnr and (calib or tok)):
        try:
            batches = load_calibration(calib, tok, opts.calib_samples or recipe.calib_samples,
                                       opts.calib_seq_len or recipe.calib_seq_len, structure.vocab_size)
        except LlmqError:
            if recipe.needs_calibration:
                raise
            logger.warning("no usable calibration text: the report will have no per-layer SQNR")
    return _Calibration(batches, calib, tok, tok_path)


def _context(recipe: Recipe, opts: CompileOptions, calib: _Calibration) -> PassContext:
    patterns = tuple(recipe.exclude) + tuple(opts.exclude)
    ctx = PassContext(exclude=lambda name, node: any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(node, p)
                                                    for p in patterns))
    if not opts.quiet:
        from tqdm.auto import tqdm

        ctx.progress = lambda it, desc: tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
    batches = calib.batches
    if batches is not None:
        progress = (lambda it: ctx.progress(it, "calibrating")) if ctx.progress else None
        ctx.stats_provider = lambda g, names: collect_stats(g, names, [b[None] for b in batches], progress)
        ctx.sample_provider = lambda g, names: _one_batch(g, names, batches[:1])
        ctx.stream_provider = lambda g, names, each: run_with_outputs(g, names, [b[None] for b in batches], each, progress)
        ctx.calibration_batch = batches[:1]
        probe = batches[:1, :PROBE_TOKENS]
        ctx.output_probe = lambda g: _run_outputs(g, probe)
    return ctx


def _transform_and_quantize(graph, linears, pipeline, ctx, calib: _Calibration, opts: CompileOptions,
                            times: dict) -> tuple:
    """Run the recipe's passes; returns (layer rows, SQNR per linear, pass records)."""
    # SQNR reference: each linear's float input and weight as the quantize passes find them (after the
    # exact transforms), taken on one calibration batch when the quantize phase starts
    before_quantize: dict = {}

    def snapshot(phase: str, g) -> None:
        if phase == "quantize" and opts.sqnr and calib.batches is not None:
            t = time.perf_counter()
            found = ctx.structure(g)
            before_quantize["structure"] = found
            before_quantize["sample"] = dict(ctx.activation_sample(g, sorted({lin.act.name for lin in found.linears})))
            times["sqnr_sample_s"] = time.perf_counter() - t

    pipeline.before_phase = snapshot
    t = time.perf_counter()
    records = pipeline.run(graph, ctx)
    times["passes_s"] = time.perf_counter() - t - times.get("sqnr_sample_s", 0.0)
    t = time.perf_counter()
    sqnr_values = layer_sqnr(before_quantize["structure"], graph, before_quantize["sample"]) if before_quantize else {}
    before_quantize.clear()
    times["sqnr_s"] = time.perf_counter() - t
    return layer_table(linears, ctx.layers, sqnr_values, ctx.declined), sqnr_values, records


def _stamp(graph, recipe: Recipe, pipeline, backend, model: str, vocab_size) -> None:
    """Provenance: what built this file, so it can be rebuilt."""
    graph.model_metadata.update({"llmq.version": __version__, "llmq.recipe": recipe.name,
                                 "llmq.recipe_yaml": recipe.source_text, "llmq.pipeline": pipeline.describe(),
                                 "llmq.backend": backend.name, "llmq.source_model": os.path.basename(model)})
    if vocab_size:
        graph.model_metadata["llmq.vocab_size"] = str(vocab_size)


SCRATCH_PREFIX = ".llmq-scratch-"


def _host() -> str:
    """This host's name as the staging and scratch folders carry it (no ``-``: it separates the name's parts)."""
    return socket.gethostname().replace("-", "_")


def _owner() -> str:
    """``<host>.<pid>``, in the names of the staging and scratch folders a compile makes beside its output:
    those of a run that was killed (SIGKILL, out of memory, a lost machine) can be found and removed."""
    return f"{_host()}.{os.getpid()}"


def _remove_stale(output: str) -> None:
    """Remove the staging and scratch folders beside ``output`` left by killed compiles on this host (their
    process is gone): at 8B a staging folder holds gigabytes. Folders of live processes and of other hosts
    are left alone."""
    parent = os.path.dirname(output)
    host = _host()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        for prefix in (f".{os.path.basename(output)}.tmp-", SCRATCH_PREFIX):
            if not name.startswith(prefix):
                continue
            owner = name[len(prefix):].split("-", 1)[0]
            owner_host, _, pid = owner.rpartition(".")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            path = os.path.join(parent, name)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s (%.1f MB) left by a compile that was killed (process %s is gone)",
                           path, size / 1e6, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _staging(output: str):
    """A temporary folder beside ``output``, removed if anything fails: nothing is ever half-written."""
    out_parent = os.path.dirname(output)
    os.makedirs(out_parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-{_owner()}-", dir=out_parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: str, output: str) -> None:
    """Put the finished folder in place (replacing an old one only once the new one is complete)."""
    if os.path.exists(output):
        old = output + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def _write_side_files(tmp: str, rows: list, recipe: Recipe, calib: _Calibration) -> None:
    svg = sensitivity_svg(rows)
    if svg:
        with open(os.path.join(tmp, "sensitivity.svg"), "w", encoding="utf-8") as fh:
            fh.write(svg)
    with open(os.path.join(tmp, "recipe.yaml"), "w", encoding="utf-8") as fh:
        fh.write(recipe.source_text)
    if calib.tokenizer_path:
        shutil.copytree(calib.tokenizer_path, os.path.join(tmp, "model.tokenizer"))


def _verify_output(model: str, model_path: str, recipe: Recipe, opts: CompileOptions, calib: _Calibration,
                   vocab_size, blocks: dict, accuracy_level: int, progress, parts=None, reference=None) -> dict:
    """The end-to-end check; outside the recipe's bound it fails the compile unless ``allow_loss``.
    ``reference``: the input ``model`` as the loader left it (its inline weights in a file beside it, which
    ONNX Runtime maps instead of parsing), run in its place."""
    # windows as long as the calibration ran (the model took that); without calibration, short ones
    batches = calib.batches
    verify_len = int(batches.shape[1]) if batches is not None else min(opts.calib_seq_len or recipe.calib_seq_len, 128)
    source = reference or model
    verification = _verify(source, model_path, recipe, calib.source, calib.tokenizer, vocab_size, blocks,
                           opts.calib_samples or recipe.calib_samples, verify_len, accuracy_level, progress, parts)
    if verification["problems"]:
        where = _worst_block(verification)
        message = (f"the compiled model is outside recipe {recipe.name}'s bound against {os.path.basename(model)} "
                   f"on {verification['windows']} held-out windows: {verification['problems'][0]}{where}")
        if not opts.allow_loss:
            raise LlmqError(message + "; nothing was written",
                            "keep the damaged layers float (--exclude), choose a gentler recipe, or pass "
                            "--allow-loss to write it anyway")
        logger.warning("%s — written anyway because of --allow-loss", message)
    return verification


def _report(model, recipe, backend_info, verification, pipeline, structure_summary, records, ctx, rows, linear_names,
            calib: _Calibration, sqnr_values, times, files, plan, weights_read: int) -> dict:
    quantized_w = sum(1 for r in rows if r.get("weight_bits"))
    quantized_a = sum(1 for r in rows if r.get("act_bits"))
    batches = calib.batches
    return {
        "llmq_version": __version__, "model": os.path.basename(model), "recipe": recipe.to_dict(),
        "verification": verification,
        "pipeline": pipeline.describe(), "backend": backend_info, "structure": structure_summary,
        "passes": records, "declined": ctx.declined, "layers": rows,
        "attention": attention_table(ctx.layers, linear_names),
        "calibration": None if batches is None else {
            "source": calib.source or "built-in default text", "samples": int(batches.shape[0]),
            "seq_len": int(batches.shape[1]), "collections": ctx.stats_collections},
        "totals": {"linears": len(rows), "quantized_weights": quantized_w, "quantized_activations": quantized_a,
                   "int8_act_mac_fraction": round(int8_act_mac_fraction(rows), 4),
                   "int8_act_mac_fraction_decoder": round(int8_act_mac_fraction(rows, include_lm_head=False), 4),
                   "fp8_act_mac_fraction": round(int8_act_mac_fraction(rows, act_format="fp8e4m3"), 4),
                   "range_split_extra_int8_mac_fraction": round(range_split_extra_mac_fraction(rows), 4),
                   "worst_sqnr_db": min(sqnr_values.values()) if sqnr_values else None},
        "times": {k: round(v, 2) for k, v in times.items()},
        "compile_mode": plan.summary(),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "io": {"weight_bytes_read": weights_read, "weight_bytes_spilled": plan.spilled_bytes,
               "activation_bytes_written": plan.activation_bytes,
               "output_bytes": sum(os.path.getsize(f) for f in files)},
        "files": {os.path.basename(f): os.path.getsize(f) for f in files},
    }


# a model whose weights are larger is verified one part at a time when it compiled block by block (memory
# bounded by a block; ONNX Runtime's CPU holds float32 copies of a float16 model's weights). Below it, the
# whole-model check is faster (two sessions, not two per part). SmolLM2-135M in fp32 (540 MB) is over it:
# `w8a8` peaked at 1.66 GB checked whole (the input model's session on top of what the compile still held),
# 1.31 GB by parts, the same figures to the digit, 21 s instead of 16. Tests lower it.
VERIFY_BY_PARTS_OVER = 256 << 20
PROBE_TOKENS = 256  # tokens of the first calibration window an exact pass is checked on


HYBRID_BRANCHES = ("new tokens > 1 (a prompt, or a chunk of one): the prefill lowering (--w4a8-kernel int8); one new "
                   "token: the decode lowering (nbits); verification.decode_kernel checks the decode lowering alone")


def _hybrid_worth_it(graph, prefill, prefill_lowering: list):
    """The prefill graph if a hybrid model is worth writing and can be written, else None (a single lowering)."""
    lowered = sum(r["stats"].get("lowered", 0) for r in prefill_lowering if r["pass"] == "lower-w4a8")
    if not lowered:
        logger.warning("--w4a8-kernel hybrid: the recipe has no W4A8 linears, so one lowering is written")
        return None
    shared: dict = {}
    for g in (graph, prefill):
        for t in g.gs.tensors().values():
            if isinstance(t, gs.Constant):
                shared[id(t._values)] = constant_nbytes(t)
    total = sum(shared.values())
    if total > HYBRID_LIMIT:
        raise LlmqError(f"--w4a8-kernel hybrid: the two lowerings of this model hold {total / 2**30:.1f} GB of weights, "
                        "and llmq writes a hybrid model only under 2 GB for now",
                        "use --w4a8-kernel nbits (fast decode, 4-bit weights) or int8 (fast prompts, 8-bit weights)")
    return prefill


def _write_hybrid(model_path: str, files: list, prefill: onnx.ModelProto) -> list:
    """Replace the written decode lowering by the hybrid model (:mod:`llmq.backends.ort_hybrid`); returns its files."""
    decode = onnx.load(model_path)
    try:
        combined = combine_prefill_decode(prefill, decode)
    except ValueError as exc:
        raise LlmqError(f"--w4a8-kernel hybrid cannot join this model's two lowerings: {exc}",
                        "use --w4a8-kernel nbits (fast decode) or int8 (fast prompts)") from exc
    del decode
    for f in files:
        os.remove(f)
    location = os.path.basename(model_path) + ".data"
    external = sum(len(t.raw_data) for t in combined.graph.initializer) >= INLINE_LIMIT  # as write_model decides
    onnx.save_model(combined, model_path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return [model_path] + ([os.path.join(os.path.dirname(model_path), location)] if external else [])


def _int8_weights(*graphs) -> dict:
    """How the written model's integer MatMuls store their weights, and what a session needs for them (report)."""
    types = {dtype_name(n.inputs[1]) for g in graphs for n in g.gs.nodes
             if n.op in UnsignedInt8WeightsPass.SLOTS and len(n.inputs) > 1}
    if not types:
        return {}
    if types == {"uint8"}:
        return {"int8_weights": "uint8 (int8 + 128): u8 × u8, exact on every CPU"}
    return {"int8_weights": "int8: u8 × s8 (ONNX Runtime's fast integer GEMM); on x86 CPUs without VNNI run with the "
                            "session option session.x64quantprecision=1 (llmq's sessions set it there) or compile "
                            "with --int8-weights unsigned"}


def _build(backend, model_path: str, folder: str, opts, parts, opset: int) -> dict:
    """The backend's build step; for a model verified by parts (``parts``: the input's partition) it gets the
    written model as parts too, cut where the input was (whole if the cuts are gone)."""
    if parts is None:
        return backend.build(model_path, folder, opts)
    written = load_graph(model_path, opset)
    own = parts.within(written.tensors())
    try:
        return backend.build(model_path, folder, opts, part_openers(written, own) if own is not None else None)
    finally:
        del written
        release_memory()


def _run_outputs(graph, batch: np.ndarray) -> dict:
    """The graph's compared outputs (all but a KV cache) on ``batch``."""
    return _one_batch(graph, compared_outputs([t.name for t in graph.gs.outputs]), batch)


def _verify(model: str, model_path: str, recipe: Recipe, calib, tok, vocab_size: int | None, blocks: dict,
            samples: int, seq_len: int, accuracy_level: int, progress, parts=None) -> dict:
    """The compiled file against the input file on held-out windows (see :mod:`llmq.verify`)."""
    bound = recipe.bound
    windows, source, held_out = load_holdout(calib, tok, samples, seq_len, bound.windows, vocab_size)
    if windows is None:  # no text and no token file: the model's own vocabulary, uniformly at random
        rng = np.random.default_rng(0)
        windows = rng.integers(0, vocab_size or 2, (bound.windows, min(seq_len, 128)), dtype=np.int64)
        source, held_out = f"random token ids ({source})", True
    try:
        result = None
        if parts is not None:
            result = verify_by_parts(model, model_path, windows, vocab_size, blocks, parts, recipe.opset, accuracy_level,
                                     (lambda it: progress(it, "verifying by parts")) if progress else None)
            if result is None:
                logger.info("the compiled model does not keep the input's block boundaries: verified whole")
            else:
                result["by_parts"] = True
        if result is None:
            result = verify_model(model, model_path, windows, vocab_size, blocks, accuracy_level,
                                  (lambda it: progress(it, "verifying")) if progress else None)
    except LlmqError:
        raise
    except Exception as exc:  # ONNX Runtime refused to run a model on the windows
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmqError(f"the end-to-end check could not run the models on {windows.shape[0]} windows of "
                        f"{windows.shape[1]} tokens from {source}: {first}",
                        "give calibration the model can run (--calib-seq-len within its context length)") from exc
    problems = check_bound(result, bound)
    return {"bound": bound.describe(), "within_bound": not problems, "problems": problems, "source": source,
            "held_out": held_out, **result}


def _worst_block(verification: dict) -> str:
    blocks = verification.get("blocks") or []
    if not blocks:
        return ""
    first = next((b for b in blocks if b["rel_error"] > 0.1), None)
    worst = max(blocks, key=lambda b: b["rel_error"])
    text = f"; worst block {worst['block']} (relative error {worst['rel_error']:.3g})"
    return text + (f", first over 0.1: {first['block']}" if first is not None and first is not worst else "")


def _one_batch(graph, names: list, batch: np.ndarray) -> dict:
    out = {}
    run_with_outputs(graph, names, [batch], lambda n, v: out.__setitem__(n, v[0]))
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")

"""Command-line entry points: ``llmq-export``, ``llmq-compile``, ``llmq-eval``.

Every user-facing problem is one line on stderr (``<prog>: error: <what>; <what to do>``) and a
non-zero exit; ``--debug`` shows the traceback instead. Progress goes to stderr; ``--quiet`` silences it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback

from .backends.registry import BACKENDS

__all__ = ["compile_main", "export_main", "eval_main"]


class _Terminated(BaseException):
    """SIGTERM (a build system's timeout, ``kill``), raised where the work is, so that the way out removes the
    staging and scratch folders as an error would: nothing half-written and nothing left beside the output."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _run(prog: str, parser: argparse.ArgumentParser, body, argv=None) -> int:
    args = parser.parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application's worker): its own handling stands
        previous = None
    try:
        return _guarded(prog, args, body)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _guarded(prog: str, args, body) -> int:
    if getattr(args, "quiet", False):  # silence third-party progress bars too (tqdm, HF)
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    level = logging.ERROR if getattr(args, "quiet", False) else (logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    logging.basicConfig(level=level, format=f"{prog}: %(levelname)s: %(message)s")
    # torch's exporter warns that torchvision is missing (irrelevant to LLMs) on a logger of its own level
    for noisy in ("transformers", "torch", "torch.onnx._internal.exporter._registration", "onnxscript", "httpx",
                  "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    if not getattr(args, "debug", False):  # onnx-graphsurgeon prints its own [W] lines (a float8 type it keeps as is,
        from onnx_graphsurgeon.logger import G_LOGGER  # a missing 'colored' module): not the user's concern

        G_LOGGER.severity = G_LOGGER.ERROR
    from .ir.errors import LlmqError

    try:
        return body(args) or 0
    except LlmqError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{prog}: terminated (SIGTERM); no partial output was left", file=sys.stderr)
        return 143
    except Exception as exc:  # an llmq bug or an unforeseen environment problem
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _freeze_imports(tokenizer: bool) -> None:
    """Exempt what the libraries' imports made (about 400,000 objects with transformers and torch) from garbage
    collection for the rest of this process, so the compile's full collections (``release_memory``, after each
    block, to keep memory bounded) walk the model's objects only: 0.27 s each before, nothing after (measured).
    transformers is imported first only when the compile will load a ``tokenizer``: its import alone takes
    seconds. Called before any model is loaded, so nothing a compile frees is ever frozen; not again once
    anything is frozen (a second call in one process, or a host that froze its own). The CLI and the tests only:
    a library caller's process is not ours to freeze."""
    import gc

    if gc.get_freeze_count():
        return
    if tokenizer:
        import transformers  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401

    gc.collect()
    gc.freeze()


def _loss(text: str) -> float:
    """'2%' → ln(1.02) (a perplexity increase); a plain number is a KL in nats/token."""
    import math

    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a percentage like 2% nor a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}': the loss budget must be positive")
    return math.log1p(value) if text.endswith("%") else value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or warnings")
    parser.add_argument("--verbose", "-v", action="store_true", help="log each step")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


# ---------------------------------------------------------------- llmq-export
def export_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmq-export", description="Export a HF model folder or a .gguf file to ONNX (input_ids -> logits).")
    p.add_argument("source", help="local Hugging Face model folder or .gguf file")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (the tokenizer goes beside it as <name>.tokenizer/)")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--kv-cache", action="store_true",
                   help="export a KV-cache decoder (position_ids, past_key_values.* in, present.* out) for generation")
    p.add_argument("--self-calib", type=int, default=0, metavar="N",
                   help="also sample N windows of 512 tokens of calibration text from the model itself, written "
                        "beside the output as <name>.calib.npz; llmq-compile uses it when no --calib-data is given")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="float type of the exported weights and activations (default: the checkpoint's own; "
                        "float32 for .gguf)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the weights from the checkpoint into external data without loading them (a "
                        "safetensors folder; default: for checkpoints over 1 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _common(p)

    def body(args):
        from .frontends.torch_export import export_hf
        from .ir.errors import LlmqError

        if os.path.exists(args.output) and not args.overwrite:
            raise LlmqError(f"{args.output} already exists", "pass --overwrite to replace it")
        if args.self_calib < 0:
            raise LlmqError(f"--self-calib must be ≥ 0 (got {args.self_calib})")
        progress = None
        if not args.quiet:
            from tqdm.auto import tqdm

            progress = lambda it: tqdm(it, desc="sampling calibration text", leave=False)  # noqa: E731
        info = export_hf(args.source, args.output, opset=args.opset, kv_cache=args.kv_cache,
                         self_calib=args.self_calib, progress=progress, dtype=args.dtype,
                         stream=args.stream)
        if not args.quiet:
            data = info["model"] + ".data"
            size = os.path.getsize(info["model"]) + (os.path.getsize(data) if os.path.isfile(data) else 0)
            print(f"wrote {info['model']} ({_size(size)}{' with external data ' + os.path.basename(data) if os.path.isfile(data) else ''}, "
                  f"{info.get('dtype', '')}, vocab {info['vocab_size']})"
                  + (f" and {info['tokenizer']}" if info["tokenizer"] else "")
                  + (f" and {info['calib']} ({args.self_calib} self-sampled calibration windows)" if info["calib"] else ""))

    return _run("llmq-export", p, body, argv)


# ---------------------------------------------------------------- llmq-compile
def compile_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmq-compile", description="Quantize an ONNX LLM with a recipe.")
    p.add_argument("model", nargs="?", help="input .onnx model")
    p.add_argument("--recipe", default="w8a8", help="built-in recipe name or a .yaml path (default w8a8)")
    p.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")
    p.add_argument("-o", "--output", default="out", help="output folder (default out/)")
    p.add_argument("--calib-data", help="calibration text (.txt, .jsonl with 'text') or .npz of input_ids")
    p.add_argument("--calib-samples", type=int, help="calibration windows (default: the recipe's)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration window (default: the recipe's)")
    p.add_argument("--tokenizer", help="HF tokenizer folder (default: <model>.tokenizer beside the model)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching layers in float (glob over names like layers.0.mlp.down or node names; repeatable)")
    p.add_argument("--backend", default="qdq", choices=list(BACKENDS),
                   help="; ".join(f"{b.name}: {b.description}" for b in BACKENDS.values()))
    p.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="onnxruntime backend: MatMulNBits compute for weight-only linears (0: float activations, "
                        "the Q/DQ arithmetic; 4: int8 activations per block, faster and approximate). Default: 0, "
                        "except 4 for the 8-bit weight-only linears of recipes with INT8 activations")
    p.add_argument("--w4a8-kernel", default="nbits", choices=["nbits", "int8", "hybrid"],
                   help="onnxruntime backend, w4a8 recipes: nbits (MatMulNBits with int8 activation compute: 4-bit "
                        "weights, activations quantized per block of 128 channels; fastest decode), int8 "
                        "(MatMulIntegerToFloat on the exact INT8 weights and per-token codes: the Q/DQ arithmetic, "
                        "8-bit weights; fastest prompts) or hybrid (both in one model, int8 for prompts and nbits "
                        "for each decode step; both weight sets, models under 2 GB)")
    p.add_argument("--int8-weights", default="signed", choices=["signed", "unsigned"],
                   help="integer MatMuls (w8a8 and w8a8-dynamic on onnxruntime, --w4a8-kernel int8): signed (int8, "
                        "u8 × s8: ONNX Runtime's fast GEMM; on x86 CPUs without VNNI it saturates unless the session "
                        "sets session.x64quantprecision=1) or unsigned (+ 128 as uint8, u8 × u8: exact everywhere "
                        "without options, slower on VNNI CPUs)")
    p.add_argument("--max-loss", type=_loss, metavar="LOSS",
                   help="accuracy budget for the recipe's sensitivity pass: '2%%' (perplexity increase, as "
                        "ln 1.02) or a KL in nats/token; keeps the fewest activations float that meet it")
    p.add_argument("--asym", action="store_true",
                   help="zero-point (UINT4/UINT8) weights in the recipe's weight quantizers; ONNX Runtime only "
                        "(TensorRT takes symmetric weights)")
    p.add_argument("--no-fuse-attention", action="store_true",
                   help="onnxruntime backend: keep attention as exported instead of fusing each block into "
                        "GroupQueryAttention + RotaryEmbedding (the fusion is probed against the original on the spot)")
    p.add_argument("--no-blocks", action="store_true",
                   help="run the passes on the whole graph at once, not block by block (memory then grows with the model)")
    p.add_argument("--allow-loss", action="store_true",
                   help="write the model even if the end-to-end check against the input model finds it outside the "
                        "recipe's bound (a loud warning instead of an error)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dump-dir", help="write the graph after each pass that changed it here")
    p.add_argument("--verify", action="store_true", help="check the graph (onnx.checker + shape inference) after each pass")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _common(p)

    def body(args):
        from .recipes import list_recipes

        if args.list_recipes:
            for name, desc in list_recipes().items():
                print(f"{name:<12} {desc}")
            return 0
        if not args.model:
            p.error("the model argument is required")
        from .driver import CompileOptions
        from .driver import compile as run_compile

        from .frontends.torch_export import tokenizer_dir_for

        _freeze_imports(bool(args.tokenizer) or os.path.isdir(tokenizer_dir_for(args.model)))  # as compile() decides
        options = CompileOptions(calib=args.calib_data, tokenizer=args.tokenizer, calib_samples=args.calib_samples,
                                 calib_seq_len=args.calib_seq_len, exclude=tuple(args.exclude), backend=args.backend,
                                 overwrite=args.overwrite, dump_dir=args.dump_dir, verify=args.verify, quiet=args.quiet,
                                 max_loss=args.max_loss, accuracy_level=args.accuracy_level, asym=args.asym,
                                 fuse_attention=not args.no_fuse_attention, w4a8_kernel=args.w4a8_kernel,
                                 int8_weights=args.int8_weights,
                                 allow_loss=args.allow_loss, blocks=not args.no_blocks)
        result = run_compile(args.model, args.recipe, args.output, options)
        if args.json:
            json.dump(result.report, sys.stdout, indent=1, default=str)
            print()
        elif not args.quiet:
            print(result.report["summary"])
            t = result.report["times"]
            print(f"wrote {result.paths['model']} in {t['total_s']:.1f} s (peak RSS {result.report['peak_rss_mb']:.0f} MB); "
                  f"report: {result.paths['report']}")

    return _run("llmq-compile", p, body, argv)


# ---------------------------------------------------------------- llmq-eval
def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmq-eval", description="Perplexity and prefill throughput of an ONNX LLM in "
                                "ONNX Runtime, or greedy generation with prefill and decode throughput.")
    p.add_argument("model", help=".onnx model (input_ids -> logits, or a KV-cache decoder from llmq-export --kv-cache)")
    p.add_argument("--text", help="evaluation text file (e.g. wiki.test.raw) for perplexity")
    p.add_argument("--generate", metavar="PROMPT", help="greedy-decode from PROMPT and print the text and tokens/s")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tokenizer", help="HF tokenizer folder (default: <model>.tokenizer beside the model)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    p.add_argument("--accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="ONNX Runtime accuracy level for 4-bit MatMulNBits fusion (default 0: float activations)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(p)

    def body(args):
        from .evaluate import perplexity, read_eval_text, token_windows
        from .frontends.onnx_loader import load_onnx
        from .frontends.torch_export import tokenizer_dir_for
        from .ir.errors import LlmqError
        from .tokenizer import check_tokenizer, resolve_tokenizer

        model = load_onnx(args.model, external_data=False)  # metadata only: the session reads the weights
        vocab = _vocab_of(model)
        del model
        tok_path = resolve_tokenizer(args.tokenizer, tokenizer_dir_for(args.model))
        if tok_path is None:
            raise LlmqError("no tokenizer: none given and none beside the model", "pass --tokenizer <HF dir>")
        tok = check_tokenizer(tok_path, vocab)
        if args.generate is not None:
            import numpy as np

            from .evaluate import generate

            if args.max_new_tokens < 1:
                raise LlmqError(f"--max-new-tokens is {args.max_new_tokens}", "give at least 1")
            prompt = tok(args.generate, add_special_tokens=False)["input_ids"]
            if not prompt:
                raise LlmqError("the prompt is empty after tokenization", "give some text to --generate")
            result = generate(args.model, np.asarray([prompt]), args.max_new_tokens, tok.eos_token_id,
                              args.accuracy_level, args.threads)
            result.update(model=args.model, text=tok.decode(result["tokens"]))
            if args.json:
                print(json.dumps(result, indent=1))
            else:
                print(args.generate + result["text"])
                decode = result["decode_tokens_per_s"]
                print(f"\n{args.model}: prefill {result['prefill_tokens_per_s']:.0f} tokens/s ({result['prompt_tokens']} "
                      f"tokens), decode {decode if decode is not None else 0:.1f} tokens/s "
                      f"({'KV cache' if result['kv_cache'] else 'no KV cache: the whole sequence each step'})")
            return
        if not args.text:
            raise LlmqError("nothing to do: give --text for perplexity or --generate PROMPT", "see llmq-eval --help")
        windows = token_windows(tok, read_eval_text(args.text), args.seq_len, args.windows)
        progress = None
        if not args.quiet:
            from tqdm.auto import tqdm

            progress = lambda it: tqdm(it, desc="evaluating", leave=False, dynamic_ncols=True)  # noqa: E731
        result = perplexity(args.model, windows, args.accuracy_level, progress, args.threads)
        result["model"] = args.model
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(f"{args.model}: perplexity {result['perplexity']:.3f} over {result['windows']} × {result['seq_len']} tokens; "
                  f"prefill {result['prefill_tokens_per_s']:.0f} tokens/s")
            if result.get("upcast"):
                print(f"note: {result['upcast']}")

    return _run("llmq-eval", p, body, argv)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _vocab_of(model) -> int | None:
    for prop in model.metadata_props:
        if prop.key == "llmq.vocab_size":
            return int(prop.value)
    out = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    return out[-1].dim_value if out and out[-1].HasField("dim_value") else None

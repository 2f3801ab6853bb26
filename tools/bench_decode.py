"""Generation speed with the KV cache: fp32 against recipes compiled on the KV-cache decoder, ONNX Runtime CPU.

Exports SmolLM2-135M with ``--kv-cache`` (once, cached in --artifacts), compiles each recipe on that graph for
the onnxruntime backend (4-bit linears lowered to MatMulNBits, attention fused into GroupQueryAttention), then
greedy-decodes the same prompt with each (batch 1) in lockstep — a token from each model in turn — and prints
prefill and decode tokens/s against the export as written and against the ``fp32`` recipe (the float model
through the same lowering), size, and whether the generated tokens match the export's.
A benchmark, not a test: it asserts nothing.

    python tools/bench_decode.py --recipes fp32 w4a16 w4a16-lr --accuracy-level 4 --repeats 7
    python tools/bench_decode.py --recipes fp32 w4a16 w4a8 w4a8@int8   # QServe's W4A8: MatMulNBits / MatMulInteger
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_spine import compile_recipe, export_real_model, size_mb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--text", default=os.path.join(HERE, "..", "..", "shared", "data", "wikitext2", "wiki.test.raw"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="generations per model, in lockstep (medians reported)")
    ap.add_argument("--recipes", nargs="*", default=["fp32", "w4a16", "w4a16-lr"],
                    help="recipes compiled for the onnxruntime backend; 'fp32' is the export through the backend's "
                         "lowering alone (attention fused), the float baseline on equal terms; w4a8@int8 lowers "
                         "the w4a8 linears with --w4a8-kernel int8")
    ap.add_argument("--no-fuse-attention", action="store_true", help="compile without the attention fusion")
    ap.add_argument("--accuracy-level", type=int, default=None,
                    help="MatMulNBits accuracy level of the compiles and of the sessions' own QDQ fusion (default: "
                         "llmq-compile's default; sessions 0)")
    ap.add_argument("--calib-data", default=None)
    ap.add_argument("--self-calib", type=int, default=16, help="calibration windows sampled at export (0: llmq's built-in text)")
    ap.add_argument("--reuse", action="store_true", help="keep an already compiled model in --artifacts (no compile time reported)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from llmq.evaluate import Decoder, read_eval_text
    from llmq.frontends.torch_export import tokenizer_dir_for
    from llmq.tokenizer import load_tokenizer

    os.makedirs(args.artifacts, exist_ok=True)
    fp32 = os.path.join(args.artifacts, "smollm2-kv.onnx")
    export_real_model(fp32, "--kv-cache", self_calib=args.self_calib)
    models = [("export", fp32, None)]
    for spec in args.recipes:
        recipe, _, kernel = spec.partition("@")  # w4a8@int8: the w4a8 linears lowered with --w4a8-kernel int8
        label = os.path.splitext(os.path.basename(recipe))[0] + (f"-{kernel}" if kernel else "")  # a recipe name, or a file's stem
        out = os.path.join(args.artifacts, f"smollm2-kv-{label}")
        if args.reuse and os.path.exists(os.path.join(out, "model.onnx")):
            models.append((label, os.path.join(out, "model.onnx"), (None, None)))
            continue
        print(f"compiling {recipe} on the KV-cache decoder ...", flush=True)
        secs, rss = compile_recipe(fp32, recipe, "onnxruntime", out, args.calib_data,
                                   *(["--accuracy-level", str(args.accuracy_level)] if args.accuracy_level is not None else []),
                                   *(["--no-fuse-attention"] if args.no_fuse_attention else []),
                                   *(["--w4a8-kernel", kernel] if kernel else []))
        models.append((label, os.path.join(out, "model.onnx"), (secs, rss)))

    tok = load_tokenizer(tokenizer_dir_for(fp32))
    ids = tok(read_eval_text(args.text)[:20000], add_special_tokens=False)["input_ids"][:args.prompt_tokens]
    import numpy as np

    prompt = np.asarray([ids])
    # lockstep: every repeat prefills each model, then decodes one token with each model in turn, so a slow
    # spell of this shared 2-core machine falls on all models alike (whole generations one after another
    # swung 2× for the same model); the sessions live side by side, so their idle threads sleep instead of
    # spinning (a spinning idle session steals a core from the one running)
    runs = {name: [] for name, _, _ in models}
    for _ in range(args.repeats):
        decoders = {name: Decoder(path, args.accuracy_level or 0, spinning=False) for name, path, _ in models}
        prefill = {name: d.prefill(prompt) for name, d in decoders.items()}
        decode = dict.fromkeys(decoders, 0.0)
        for _ in range(args.new_tokens - 1):
            for name, d in decoders.items():
                decode[name] += d.step()
        for name, d in decoders.items():
            runs[name].append({"tokens": d.tokens, "prefill_tokens_per_s": prompt.shape[1] / prefill[name],
                               "decode_tokens_per_s": (args.new_tokens - 1) / decode[name] if decode[name] else None})
        del decoders
    rows, reference = [], None
    for name, path, compiled in models:
        results = runs[name]
        decode = [r["decode_tokens_per_s"] or 0.0 for r in results]
        reference = reference or results[0]["tokens"]
        same = sum(a == b for a, b in zip(results[0]["tokens"], reference))
        rows.append({"model": name, "prefill_tokens_per_s": float(np.median([r["prefill_tokens_per_s"] for r in results])),
                     "decode_tokens_per_s": float(np.median(decode)), "decode_tokens_per_s_best": max(decode),
                     "size_mb": round(size_mb(path if compiled is None else os.path.dirname(path)), 1),
                     "tokens_matching_fp32": f"{same}/{len(reference)}",
                     "compile_s": None if compiled is None or compiled[0] is None else round(compiled[0], 1),
                     "text": tok.decode(results[0]["tokens"])})
    base = rows[0]
    lowered = next((r for r in rows if r["model"] == "fp32"), base)  # fp32 through the same backend lowering
    for r in rows:
        r["x_export"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["x_fp32_lowered"] = r["decode_tokens_per_s"] / lowered["decode_tokens_per_s"]
    print(f"\nSmolLM2-135M KV-cache decoder, ONNX Runtime CPU, batch 1, prompt {prompt.shape[1]} tokens, "
          f"{args.new_tokens} new tokens (greedy), accuracy level {'default' if args.accuracy_level is None else args.accuracy_level}, lockstep, median of {args.repeats}")
    print("'export' is the fp32 export as written; 'fp32' the same through llmq's onnxruntime lowering")
    print(f"{'model':<14} {'prefill tok/s':>14} {'decode tok/s':>13} {'× export':>9} {'× fp32':>7} {'best':>6} "
          f"{'MB':>7} {'same tokens':>12}")
    for r in rows:
        print(f"{r['model']:<14} {r['prefill_tokens_per_s']:>14.0f} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['x_export']:>9.2f} {r['x_fp32_lowered']:>7.2f} {r['decode_tokens_per_s_best']:>6.1f} "
              f"{r['size_mb']:>7.1f} {r['tokens_matching_fp32']:>12}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

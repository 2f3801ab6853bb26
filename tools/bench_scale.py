"""Scale benchmark: random-weight checkpoints of real shapes, exported and compiled, with time and peak RSS.

Each step runs as its own process (``llmq-export``, ``llmq-compile``), so its peak resident set is its own;
the checkpoint is written tensor by tensor by ``tools/make_random_model.py`` (no model ever in memory).

    python tools/bench_scale.py --shape tinyllama --recipes w8a16 w4a16 w8a8
    python tools/bench_scale.py --shape llama3-8b --layers 4 8 --recipes w4a16 w8a8
    python tools/bench_scale.py --shape llama3-8b --layers 4 --recipes w4a16@onnxruntime

Shapes: ``tinyllama`` (hidden 2048, ffn 5632, 32/4 heads, vocab 32000, 22 layers) and ``llama3-8b`` (hidden
4096, ffn 14336, 32/8 heads, vocab 128256, 32 layers), float16. The random weights are meant for memory and
time, not accuracy: a compile is run with ``--allow-loss`` and its verification figures are reported as
measured (random weights have no structure for smoothing or clipping to exploit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "tinyllama": dict(hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=32000, layers=22),
    "llama3-8b": dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=32),
}


def run(cmd: list) -> tuple:
    """(seconds, peak RSS of the child in MB, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: only meaningful when it grew (a compile's
    # report carries its own peak: report_peak_rss_mb)
    return seconds, max(peak, before) / 1024.0 if peak > before else float("nan"), proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--layers", type=int, nargs="*", help="layer counts to build (default: the shape's)")
    ap.add_argument("--recipes", nargs="*", default=["w8a16", "w4a16", "w8a8"],
                    help="recipes to compile, each optionally @backend (default qdq): w4a16@onnxruntime")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--work", default="artifacts/scale")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    rows = []
    for layers in args.layers or [shape["layers"]]:
        shape["layers"] = layers
        tag = f"{args.shape}-{layers}L-{args.dtype}"
        folder = os.path.join(args.work, tag, "hf")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            cmd = [sys.executable, os.path.join(HERE, "make_random_model.py"), folder, "--dtype", args.dtype]
            for key, value in shape.items():
                cmd += [f"--{key.replace('_', '-')}", str(value)]
            secs, rss, _ = run(cmd)
            print(f"{tag}: checkpoint written in {secs:.0f} s")
        onnx_path = os.path.join(args.work, tag, "model.onnx")
        if not os.path.isfile(onnx_path):
            secs, rss, _ = run(["llmq-export", folder, "-o", onnx_path, "--dtype", args.dtype, "--stream", "-q"])
            size = os.path.getsize(onnx_path) + os.path.getsize(onnx_path + ".data")
            rows.append({"model": tag, "step": "export", "seconds": round(secs, 1), "peak_rss_mb": round(rss),
                         "bytes": size})
            print(rows[-1])
        calib = os.path.join(args.work, tag, f"calib-ids-{args.calib_samples}x{args.calib_seq_len}.npz")
        if not os.path.isfile(calib):
            # a random checkpoint has no tokenizer: seeded random token ids calibrate it as well as any text
            ids = np.random.default_rng(0).integers(0, shape["vocab"], (args.calib_samples, args.calib_seq_len))
            np.savez(calib, input_ids=ids.astype(np.int64))
        for entry in args.recipes:
            recipe, _, backend = entry.partition("@")
            out = os.path.join(args.work, tag, f"out-{recipe}" + (f"-{backend}" if backend else ""))
            secs, rss, stdout = run(["llmq-compile", onnx_path, "--recipe", recipe, "-o", out, "--overwrite", "-q",
                                     "--backend", backend or "qdq",
                                     "--allow-loss", "--calib-data", calib, "--calib-samples", str(args.calib_samples),
                                     "--calib-seq-len", str(args.calib_seq_len), "--json"])
            report = json.loads(stdout)
            rows.append({"model": tag, "step": entry, "seconds": round(secs, 1), "peak_rss_mb": round(rss),
                         "report_peak_rss_mb": report["peak_rss_mb"], "times": report["times"],
                         "bytes": sum(report["files"].values()),
                         "compile_mode": report["compile_mode"]["mode"], "sweeps": report["compile_mode"].get("sweeps"),
                         "per_block_s": report["compile_mode"].get("seconds_per_block"),
                         "verify_kl": (report["verification"].get("outputs", {}).get("logits") or {}).get("kl")})
            print(rows[-1])
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Side by side with the peers: llmq's recipes against ONNX Runtime's quantize_static (and NVIDIA ModelOpt's
ONNX INT8 when it is installed) on the same exported SmolLM2-135M, the same calibration text and the same
evaluation. A benchmark, not a test: it asserts nothing and reports every failure as a result.

Each peer runs on the opset-21 export first (what llmq-export writes) and, where that fails, on an opset-18
export of the same model (``llmq-export --opset 18``), with its documented defaults for LLM INT8:

* ORT ``quantize_static``: QDQ format, MinMax calibration, per-channel INT8 weights, default (UINT8) activations;
* ModelOpt ``modelopt.onnx.quantization.quantize``: ``quantize_mode='int8'``, ``calibration_method='max'``; its
  ``fp8`` mode (``modelopt-fp8``, against llmq's ``fp8``) and INT4 AWQ (``modelopt-int4``, about an hour here);
* ORT ``MatMulNBitsQuantizer`` (4-bit weight-only, block 128, asymmetric as it defaults): RTN, and its GPTQ on the
  same calibration windows — against ``w4a16@onnxruntime``. Perplexity is evaluated at ``--accuracy-level``
  (0: float activations, as llmq's W4A16; the reference figure +39.7 % was level 4).

    python tools/bench_peers.py --windows 40 --recipes w8a8@onnxruntime w8a8-kv8@onnxruntime
    python tools/bench_peers.py --recipes fp8 w4a8-fp8 --peers modelopt-fp8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_spine import compile_recipe, export_real_model, size_mb  # noqa: E402


def calibration_windows(model: str, calib_data: str | None, samples: int, seq_len: int):
    """The windows llmq-compile calibrates on by default (``--calib-data``, else the export's self-sampled
    ``<name>.calib.npz``, else the built-in text), so every tool sees the same tokens."""
    from llmq.calib.data import load_calibration
    from llmq.frontends.torch_export import calib_path_for, tokenizer_dir_for
    from llmq.tokenizer import load_tokenizer

    if calib_data is None and os.path.exists(calib_path_for(model)):
        calib_data = calib_path_for(model)
    return calib_data, load_calibration(calib_data, load_tokenizer(tokenizer_dir_for(model)), samples, seq_len)


def windows_reader(windows):
    """ONNX Runtime's calibration reader over our windows, one ``[1, seq]`` batch each (both ORT peers)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input_ids": w[None, :]} for w in windows])

        def get_next(self):
            return next(self.items, None)

    return Reader()


def ort_quantize_static(model: str, out: str, windows) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # (its CalibMaxIntermediateOutputs option drops the collected batches without reducing them in ORT 1.32:
    # "No data is collected"; the default keeps every batch's activations until the end)
    quantize_static(model, out, windows_reader(windows), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def modelopt_int8(model: str, out: str, windows) -> None:
    import numpy as np
    from modelopt.onnx.quantization import quantize  # optional peer

    quantize(model, quantize_mode="int8", calibration_data={"input_ids": np.asarray(windows)},
             calibration_method="max", output_path=out)


def modelopt_fp8(model: str, out: str, windows) -> None:
    """ModelOpt's ONNX FP8 (E4M3 per-channel weights, per-tensor activations, max calibration), kept in float32
    (``high_precision_dtype``: its default casts the rest of the model to float16) so it is compared at llmq's
    precision. ModelOpt's ONNX path has no INT4-weight + FP8-activation mode (its W4A8 is PyTorch-only)."""
    import numpy as np
    from modelopt.onnx.quantization import quantize  # optional peer

    quantize(model, quantize_mode="fp8", calibration_data={"input_ids": np.asarray(windows)},
             calibration_method="max", high_precision_dtype="fp32", output_path=out)


def modelopt_int4(model: str, out: str, windows) -> None:
    """ModelOpt's ONNX INT4 weight-only AWQ (``awq_clip``, block 128); about an hour for SmolLM2 on this CPU."""
    import numpy as np
    from modelopt.onnx.quantization import quantize  # optional peer

    quantize(model, quantize_mode="int4", calibration_data={"input_ids": np.asarray(windows)},
             calibration_method="awq_clip", block_size=128, high_precision_dtype="fp32", output_path=out)


def ort_matmulnbits(model: str, out: str, windows, algo: str) -> None:
    """ONNX Runtime's own 4-bit weight-only quantizer (``MatMulNBitsQuantizer``), block 128, asymmetric (its
    default): its default RTN, or its GPTQ (the Neural-Compressor path) on our calibration windows."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # "rtn": the quantizer's default algorithm (its own blockwise RTN, which pads a ragged last block);
    # RTNWeightOnlyQuantConfig and GPTQWeightOnlyQuantConfig take the Neural-Compressor path, which fails on
    # SmolLM2's 576-wide inputs (576 is not a multiple of 128)
    config = None if algo == "rtn" else GPTQWeightOnlyQuantConfig(calibration_data_reader=windows_reader(windows))
    quantizer = MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=128, is_symmetric=False, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(out, use_external_data_format=False)


def loads_in_ort(path: str) -> str | None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any refusal is the result
        return " ".join(str(exc).split())[:240]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--text", default=os.path.join(HERE, "..", "..", "shared", "data", "wikitext2", "wiki.test.raw"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-data", default=None,
                    help="calibration text (default: --self-calib windows the model samples itself at export)")
    ap.add_argument("--self-calib", type=int, default=16, help="calibration windows sampled at export (0: llmq's built-in text)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--recipes", nargs="*", default=["w8a8@onnxruntime"], help="llmq recipes (recipe@backend)")
    # (4-bit side by side: --recipes w4a16@onnxruntime w4a16-rtn@onnxruntime --peers ort-nbits-rtn ort-nbits-gptq)
    ap.add_argument("--peers", nargs="*", default=["ort-static", "modelopt"],
                    choices=["ort-static", "modelopt", "modelopt-fp8", "modelopt-int4", "ort-nbits-rtn", "ort-nbits-gptq"])
    ap.add_argument("--accuracy-level", type=int, default=0, help="ONNX Runtime MatMulNBits accuracy level for evaluation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    os.makedirs(args.artifacts, exist_ok=True)
    exports = {21: os.path.join(args.artifacts, "smollm2.onnx"), 18: os.path.join(args.artifacts, "smollm2-op18.onnx")}
    for opset, path in exports.items():
        export_real_model(path, "--opset", str(opset), self_calib=args.self_calib if opset == 21 else 0)
    calib_data, windows = calibration_windows(exports[21], args.calib_data, args.calib_samples, 512)
    print(f"calibration: {len(windows)} × {windows.shape[1]} tokens of {calib_data or 'the built-in text'}", flush=True)

    rows = [{"model": "fp32", "path": exports[21]}]
    for spec in args.recipes:
        recipe, _, backend = spec.partition("@")
        out = os.path.join(args.artifacts, f"peers-llmq-{recipe}" + (f"-{backend}" if backend else ""))
        print(f"llmq {spec} ...", flush=True)
        secs, rss = compile_recipe(exports[21], recipe, backend or "qdq", out, calib_data,
                                   "--calib-samples", str(args.calib_samples))
        rows.append({"model": f"llmq {spec}", "path": os.path.join(out, "model.onnx"), "compile_s": round(secs, 1),
                     "compile_peak_rss_mb": round(rss)})

    peers = {"ort-static": ("ORT quantize_static", ort_quantize_static), "modelopt": ("ModelOpt int8", modelopt_int8),
             "modelopt-fp8": ("ModelOpt fp8", modelopt_fp8), "modelopt-int4": ("ModelOpt int4 awq_clip", modelopt_int4),
             "ort-nbits-rtn": ("ORT MatMulNBits RTN", lambda m, o, w: ort_matmulnbits(m, o, w, "rtn")),
             "ort-nbits-gptq": ("ORT MatMulNBits GPTQ", lambda m, o, w: ort_matmulnbits(m, o, w, "gptq"))}
    for key in args.peers:
        label, fn = peers[key]
        for opset in (21, 18):
            out = os.path.join(args.artifacts, f"peers-{key}-op{opset}.onnx")
            row = {"model": f"{label} (opset {opset})", "path": out}
            started = time.perf_counter()
            print(f"{label} on the opset-{opset} export ...", flush=True)
            try:
                # a subprocess would hide the peer's Python errors; run it here and keep going on failure
                fn(exports[opset], out, windows)
            except ImportError as exc:
                row["error"] = f"not installed ({exc.name})"
                rows.append(row)
                break
            except Exception as exc:  # noqa: BLE001 - a peer failing is a result
                row["error"] = f"quantizer failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                traceback.print_exc()
            row["compile_s"] = round(time.perf_counter() - started, 1)
            if "error" not in row:
                refused = loads_in_ort(out)
                if refused:
                    row["error"] = f"ONNX Runtime refuses the output: {refused}"
            rows.append(row)
            if "error" not in row:
                break  # the opset-21 run worked: no need for the fallback

    from llmq.evaluate import perplexity, read_eval_text, token_windows
    from llmq.frontends.torch_export import tokenizer_dir_for
    from llmq.tokenizer import load_tokenizer

    eval_windows = token_windows(load_tokenizer(tokenizer_dir_for(exports[21])), read_eval_text(args.text),
                                 args.seq_len, args.windows)
    base = None
    for row in rows:
        if "error" in row:
            continue
        print(f"evaluating {row['model']} ...", flush=True)
        res = perplexity(row["path"], eval_windows, accuracy_level=args.accuracy_level)
        base = base or res["perplexity"]
        row.update(perplexity=round(res["perplexity"], 3), delta_pct=round(100 * (res["perplexity"] / base - 1), 2),
                   prefill_tokens_per_s=res["prefill_tokens_per_s"],
                   size_mb=round(size_mb(row["path"] if "llmq" not in row["model"] else os.path.dirname(row["path"])), 1))

    print(f"\nSmolLM2-135M, WikiText-2 test, {len(eval_windows)} × {args.seq_len} tokens, ONNX Runtime CPU; "
          f"calibration {len(windows)} × {windows.shape[1]} tokens, the same for every tool")
    print(f"{'model':<34} {'ppl':>9} {'Δ%':>8} {'tok/s':>7} {'MB':>7} {'compile s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<34} {r['error']}")
        else:
            print(f"{r['model']:<34} {r['perplexity']:>9.3f} {r['delta_pct']:>+8.2f} {r['prefill_tokens_per_s']:>7.0f} "
                  f"{r['size_mb']:>7.1f} {r.get('compile_s', '—'):>10}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

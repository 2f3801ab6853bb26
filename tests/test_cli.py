"""The three commands end to end on a tiny model: export → compile → eval, as a user types them."""

from __future__ import annotations

import json
import os

import pytest

from llmq.cli import compile_main, eval_main, export_main


def test_export_compile_eval(tmp_path, capsys, tiny_llama_dir, calib_text):
    onnx_path = str(tmp_path / "tiny.onnx")
    assert export_main([tiny_llama_dir, "-o", onnx_path, "--quiet"]) == 0
    assert os.path.isfile(onnx_path) and os.path.isdir(str(tmp_path / "tiny.tokenizer"))
    assert export_main([tiny_llama_dir, "-o", onnx_path, "--quiet"]) != 0  # refuses to overwrite
    capsys.readouterr()

    out = str(tmp_path / "out")
    assert compile_main([onnx_path, "--recipe", "w8a8", "--calib-data", calib_text, "--calib-samples", "2",
                         "--calib-seq-len", "64", "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "recipe w8a8" in printed and "worst" in printed and "wrote" in printed

    text = tmp_path / "eval.txt"
    text.write_text(open(calib_text, encoding="utf-8").read()[:20_000], encoding="utf-8")
    assert eval_main([os.path.join(out, "model.onnx"), "--text", str(text), "--seq-len", "64", "--windows", "3",
                      "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 3 and result["seq_len"] == 64 and result["perplexity"] > 1
    assert eval_main([onnx_path, "--text", str(text), "--seq-len", "64", "--windows", "3", "--json", "--quiet"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    # a random 2-layer model is near-uniform: quantization must not move its perplexity by more than 5 %
    assert abs(result["perplexity"] / fp32["perplexity"] - 1) < 0.05


def test_max_loss_sets_the_sensitivity_budget(tmp_path, capsys, tiny_llama_onnx, calib_text):
    import math

    import yaml

    out = str(tmp_path / "out")
    assert compile_main([tiny_llama_onnx, "--recipe", "w8a8", "--max-loss", "1%", "--calib-data", calib_text,
                         "--calib-samples", "2", "--calib-seq-len", "64", "-o", out, "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    sens = next(p for p in report["passes"] if p["pass"] == "sensitivity")["stats"]
    assert sens["max_kl"] == math.log1p(0.01) and sens["kl_joint_after_budget"] <= sens["max_kl"]
    written = yaml.safe_load(open(os.path.join(out, "recipe.yaml"), encoding="utf-8"))
    sens_opts = next(p["sensitivity"] for p in written["passes"] if isinstance(p, dict) and "sensitivity" in p)
    assert sens_opts["max_kl"] == math.log1p(0.01) and sens_opts["keep_float"] == 0


def test_self_calibration_is_written_and_used(tmp_path, capsys, tiny_llama_dir):
    import numpy as np

    onnx_path = str(tmp_path / "tiny.onnx")
    assert export_main([tiny_llama_dir, "-o", onnx_path, "--self-calib", "2", "--quiet"]) == 0
    calib = str(tmp_path / "tiny.calib.npz")
    ids = np.load(calib)["input_ids"]
    assert ids.shape == (2, 512) and ids.dtype == np.int64 and not any(n.endswith(".tmp.npz") for n in os.listdir(tmp_path))
    again = str(tmp_path / "again.onnx")
    assert export_main([tiny_llama_dir, "-o", again, "--self-calib", "2", "--quiet"]) == 0
    assert np.array_equal(np.load(str(tmp_path / "again.calib.npz"))["input_ids"], ids)  # deterministic
    assert len({tuple(r) for r in ids}) == 2 and len(np.unique(ids)) > 50  # sampled, not a repeated token

    out = str(tmp_path / "out")
    assert compile_main([onnx_path, "--recipe", "w4a16", "--calib-samples", "2", "-o", out, "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["source"] == calib and report["calibration"]["samples"] == 2
    assert export_main([tiny_llama_dir, "-o", str(tmp_path / "bad.onnx"), "--self-calib", "-1", "--quiet"]) != 0


def test_asym_is_onnxruntime_only(tmp_path, capsys, tiny_llama_onnx, calib_text):
    """--asym: UINT4 zero-point weights lowered to MatMulNBits with zero points; refused for TensorRT targets."""
    import onnx

    common = ["--recipe", "w4a16", "--calib-data", calib_text, "--calib-samples", "2", "--calib-seq-len", "64", "--quiet"]
    assert compile_main([tiny_llama_onnx, *common, "--asym", "-o", str(tmp_path / "qdq")]) != 0
    err = capsys.readouterr().err
    assert "--asym" in err and "symmetric" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "qdq")
    out = str(tmp_path / "ort")
    assert compile_main([tiny_llama_onnx, *common, "--asym", "--backend", "onnxruntime", "-o", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["name"] == "w4a16-asym" and report["recipe"]["backends"] == ["onnxruntime"]
    assert all(r.get("weight_symmetric") is False for r in report["layers"] if r.get("weight_bits") == 4)
    nbits = [n for n in onnx.load(os.path.join(out, "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) >= 4 and n.input[3] for n in nbits)  # zero points given


def test_int8_weights_unsigned(tmp_path, capsys, tiny_llama_onnx, calib_text):
    """--int8-weights unsigned: every integer GEMM's weight is written + 128 as uint8, and the report says so."""
    import onnx

    out = str(tmp_path / "ort")
    argv = [tiny_llama_onnx, "--recipe", "w8a8-plain", "--calib-data", calib_text, "--calib-samples", "2",
            "--calib-seq-len", "64", "--backend", "onnxruntime", "--int8-weights", "unsigned", "-o", out, "--json"]
    assert compile_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"]["int8_weights"].startswith("uint8")
    model = onnx.load(os.path.join(out, "model.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    # 14 linears, q/k/v and gate/up merged: 4 GEMMs a layer
    assert len(gemms) == 8 and all(types[n.input[1]] == onnx.TensorProto.UINT8 for n in gemms)


def test_sigterm_leaves_no_partial_output(tmp_path, capsys):
    """A build system's timeout (SIGTERM) unwinds like an error: the staging folder beside the output is removed,
    one line says so, the exit code is 143."""
    import argparse
    import signal
    import threading

    from llmq.cli import _run
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    from llmq.driver import _staging

    seen = []

    def body(args):
        with _staging(str(tmp_path / "out")) as tmp:
            seen.append(tmp)
            open(os.path.join(tmp, "model.onnx.data"), "wb").write(b"\0" * 1024)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")

    parser = argparse.ArgumentParser(prog="llmq-compile")
    parser.add_argument("--debug", action="store_true")
    before = signal.getsignal(signal.SIGTERM)
    assert _run("llmq-compile", parser, body, []) == 143
    assert seen and not os.path.exists(seen[0]) and os.listdir(tmp_path) == []
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_stale_folders_of_killed_compiles_are_removed(tmp_path):
    """Staging and scratch folders of a compile whose process is gone (SIGKILL, out of memory) are removed at the
    next compile beside them; those of a live process, of another host, or not llmq's own stay."""
    import subprocess
    import sys

    from llmq.driver import _owner, _remove_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _owner().rpartition(".")[0]
    names = {f".out.tmp-{host}.{dead.pid}-abc": False, f".llmq-scratch-{host}.{dead.pid}-def": False,
             f".out.tmp-{_owner()}-ghi": True, f".out.tmp-otherhost.{dead.pid}-jkl": True,
             ".out.tmp-x1y2z3": True, f".other.tmp-{host}.{dead.pid}-mno": True}
    for name in names:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "model.onnx.data").write_bytes(b"\0" * 64)
    _remove_stale(str(tmp_path / "out"))
    assert {n: os.path.exists(tmp_path / n) for n in names} == names

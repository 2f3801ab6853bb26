"""End-to-end compiles of tiny exported models: outputs, report, rules, determinism, ONNX Runtime numerics."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from conftest import TINY_VOCAB

import llmq
from llmq.driver import compile as llmq_compile


def _logits(path, ids):
    from llmq.backends.onnxruntime import make_session

    return make_session(path).run(None, {"input_ids": ids})[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_w8a8_end_to_end(family, request, tmp_path, calib_text):
    src = request.getfixturevalue(f"tiny_{family}_onnx")
    result = llmq_compile(src, "w8a8-plain", str(tmp_path / "out"), calib=calib_text, calib_samples=4, calib_seq_len=64,
                          backend="onnxruntime", quiet=True)
    files = sorted(os.listdir(result.output_dir))
    assert files == ["model.onnx", "model.tokenizer", "recipe.yaml", "report.json"]
    report = json.load(open(result.paths["report"]))
    expected = {"llama": 14, "gpt2": 8}[family]  # every linear but the LM head
    assert report["totals"]["quantized_weights"] == report["totals"]["quantized_activations"] == expected
    assert report["backend"]["tensorrt_rule_violations"] == []
    assert report["backend"]["int8_weights"].startswith("int8: u8 × s8")  # the default storage, and what it needs
    assert any("MatMulIntegerToFloat" in k or "QLinearMatMul" in k or "DynamicQuantize" in k or "MatMulInteger" in k
               for k in report["backend"]["fused_ops"]) or report["backend"]["fused_ops"]
    layers = {r["name"]: r for r in report["layers"]}
    assert "lm_head" in layers and "weight_bits" not in layers["lm_head"]  # LM head stays float by default
    for r in report["layers"]:
        if r["role"] != "lm_head":
            assert r["act_scale"] > 0 and r["weight_bits"] == 8 and np.isfinite(r["sqnr_db"])
    # random-weight tiny models quantize well: each layer's output keeps > 20 dB SQNR
    assert report["totals"]["worst_sqnr_db"] > 20
    model = onnx.load(result.paths["model"])
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["llmq.recipe"] == "w8a8-plain" and "quantize-activations" in meta["llmq.pipeline"]
    assert meta["llmq.version"] == llmq.__version__
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (2, 33), dtype=np.int64)
    ref, got = _logits(src, ids), _logits(result.paths["model"], ids)
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.1, rel  # W8A8 on a 2-layer random model: logits within 10 % relative RMS


def test_w8a16_is_close_and_deterministic(tiny_llama_onnx, tmp_path, calib_text):
    a = llmq_compile(tiny_llama_onnx, "w8a16", str(tmp_path / "a"), calib=calib_text, calib_samples=2,
                     calib_seq_len=64, quiet=True)
    b = llmq_compile(tiny_llama_onnx, "w8a16", str(tmp_path / "b"), calib=calib_text, calib_samples=2,
                     calib_seq_len=64, quiet=True)
    with open(a.paths["model"], "rb") as fa, open(b.paths["model"], "rb") as fb:
        assert fa.read() == fb.read()
    ids = np.arange(40, dtype=np.int64).reshape(1, 40) % TINY_VOCAB
    ref, got = _logits(tiny_llama_onnx, ids), _logits(a.paths["model"], ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02


def test_w8a8_is_deterministic(tiny_llama_onnx, tmp_path, calib_text):
    paths = [llmq_compile(tiny_llama_onnx, "w8a8-plain", str(tmp_path / n), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True).paths["model"] for n in ("a", "b")]
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()


def test_exclude_keeps_layers_float(tiny_llama_onnx, tmp_path, calib_text):
    result = llmq_compile(tiny_llama_onnx, "w8a8-plain", str(tmp_path / "o"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, exclude=("*.mlp.down",), quiet=True)
    layers = {r["name"]: r for r in result.report["layers"]}
    assert "weight_bits" not in layers["layers.0.mlp.down"] and "act_bits" not in layers["layers.1.mlp.down"]
    assert layers["layers.0.mlp.up"]["weight_bits"] == 8
    assert {d["where"] for d in result.report["declined"] if d["reason"] == "excluded by --exclude"} == \
           {"layers.0.mlp.down", "layers.1.mlp.down"}
    assert result.report["totals"]["int8_act_mac_fraction"] < 1.0


def test_external_data_round_trip(tiny_llama_onnx, tmp_path, calib_text):
    """A model stored with external data loads, compiles and writes external data when forced."""
    from llmq.ir.passes import save_model

    model = onnx.load(tiny_llama_onnx)
    folder = tmp_path / "ext"
    folder.mkdir()
    save_model(model, str(folder / "model.onnx"), external=True)
    assert (folder / "model.onnx.data").exists()
    import shutil

    shutil.copytree(tiny_llama_onnx[:-5] + ".tokenizer", folder / "model.tokenizer")
    result = llmq_compile(str(folder / "model.onnx"), "w8a16", str(tmp_path / "o"), calib=calib_text,
                          calib_samples=2, calib_seq_len=64, quiet=True)
    ids = np.arange(20, dtype=np.int64).reshape(1, 20)
    assert np.isfinite(_logits(result.paths["model"], ids)).all()


def test_dump_dir_and_verify(tiny_llama_onnx, tmp_path, calib_text):
    dump = tmp_path / "dump"
    llmq_compile(tiny_llama_onnx, "w8a8-plain", str(tmp_path / "o"), calib=calib_text, calib_samples=2, calib_seq_len=64,
                 dump_dir=str(dump), verify=True, quiet=True)
    assert sorted(os.listdir(dump)) == ["01-quantize-activations.onnx", "02-quantize-weights.onnx"]


def test_smoothed_recipe_reports_sane_sqnr(tiny_llama_onnx, tmp_path, calib_text):
    """SQNR is measured on the linear as quantized (after smoothing moved scale into its weight)."""
    recipe = tmp_path / "sq.yaml"
    recipe.write_text("name: sq\npasses:\n  - smooth-quant: {alpha: 0.8}\n  - quantize-activations\n  - quantize-weights\n")
    result = llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "o"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True)
    layers = {r["name"]: r for r in result.report["layers"]}
    assert layers["layers.0.attn.q"]["smooth_fold"] == "rmsnorm" and layers["layers.0.mlp.down"]["smooth_fold"] == "up"
    assert result.report["totals"]["worst_sqnr_db"] > 20

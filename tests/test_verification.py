"""The compile is judged against the model the user gave: the end-to-end check, exact passes proving
themselves on the model (or rolled back), and the bad inputs that must never compile silently."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import TINY_VOCAB

from llmq.driver import compile as llmq_compile
from llmq.ir.errors import LlmqError
from llmq.ir.passes import Pass, PassResult
from llmq.recipes import parse_recipe


def _logits(path, ids):
    from llmq.backends.onnxruntime import make_session

    return make_session(path).run(None, {"input_ids": ids})[0]


class _ScaleFinalNorm(Pass):
    """Test-only: multiply the LM head's norm weight by ``factor`` without compensating anywhere."""

    name = "test-scale-final-norm"
    phase = "transform"

    @dataclass(frozen=True)
    class Options:
        factor: float = -1.0

    def run(self, graph, ctx):
        head = next((lin for lin in ctx.structure(graph).linears if lin.role == "lm_head"), None)
        if head is None:  # block by block: a part without the LM head
            return PassResult(False, {})
        norm = head.norm
        gamma = gs.Constant(graph.unique_name("bad_gamma"), np.asarray(norm.weight.values, np.float32) * self.options.factor)
        for node in [norm.node] + [gs_p for t in norm.node.inputs if (gs_p := (t.inputs[0] if t.inputs else None))]:
            for i, t in enumerate(node.inputs):
                if t is norm.weight:
                    node.inputs[i] = gamma
        return PassResult(True, {})


class _ClaimsExact(_ScaleFinalNorm):
    name = "test-claims-exact"
    exact = True


@pytest.fixture()
def bad_passes(monkeypatch):
    from llmq.passes import REGISTRY

    monkeypatch.setitem(REGISTRY, _ScaleFinalNorm.name, _ScaleFinalNorm)
    monkeypatch.setitem(REGISTRY, _ClaimsExact.name, _ClaimsExact)


def _recipe(passes: str, verify: str = "{max_kl: 0.05}"):
    return parse_recipe(f"name: test\nopset: 21\nverify: {verify}\npasses:\n{passes}", "test recipe")


def test_report_headline_measures_against_the_input_model(tiny_llama_onnx, tmp_path, calib_text):
    result = llmq_compile(tiny_llama_onnx, "w8a8", str(tmp_path / "out"), calib=calib_text, calib_samples=4,
                          calib_seq_len=64, quiet=True)
    v = result.report["verification"]
    assert v["held_out"] and v["windows"] == 4 and "skipped" in v["source"]
    m = v["outputs"]["logits"]
    assert 0 <= m["kl"] < 0.01 and m["top1_agreement"] > 0.9 and v["within_bound"]
    assert [b["block"] for b in v["blocks"]] == ["layers.0", "layers.1"]
    assert all(0 < b["rel_error"] < 0.2 for b in v["blocks"])
    assert result.report["summary"].splitlines()[0].startswith("against the input model (logits, 4 held-out windows")
    assert "KL ≤" in v["bound"]
    # the exact smoothing proved itself on this model
    smooth = next(p for p in result.report["passes"] if p["pass"] == "smooth-quant")
    assert smooth["modified"] and smooth["stats"]["exactness_error"] < 1e-5


def test_a_pass_claiming_exactness_that_is_not_is_rolled_back(tiny_llama_onnx, tmp_path, calib_text, bad_passes):
    recipe = _recipe("  - test-claims-exact:\n      factor: 3.0\n  - quantize-weights\n", "{max_kl: 0.01}")
    result = llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "out"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True)
    record = next(p for p in result.report["passes"] if p["pass"] == "test-claims-exact")
    assert record["modified"] is False and record["stats"]["rolled_back"] and record["stats"]["exactness_error"] > 0.01
    declined = [d for d in result.report["declined"] if d["pass"] == "test-claims-exact"]
    assert len(declined) == 1 and "not exact on this model" in declined[0]["reason"]
    assert result.report["verification"]["within_bound"]  # the rollback left only the 8-bit weights' loss


def test_a_damaging_pass_fails_the_compile_and_writes_nothing(tiny_llama_onnx, tmp_path, calib_text, bad_passes):
    recipe = _recipe("  - test-scale-final-norm\n  - quantize-weights\n")
    with pytest.raises(LlmqError) as exc:
        llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "out"), calib=calib_text, calib_samples=2,
                     calib_seq_len=64, quiet=True)
    message = exc.value.one_line()
    assert "outside recipe test's bound" in message and "logits: KL" in message and "--allow-loss" in message
    assert "nothing was written" in message
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())
    # with --allow-loss it is written, and the report says it is outside the bound
    result = llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "out"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True, allow_loss=True)
    v = json.load(open(result.paths["report"]))["verification"]
    assert not v["within_bound"] and v["problems"] and v["outputs"]["logits"]["top1_agreement"] < 0.5
    assert "OUTSIDE" in result.report["summary"].splitlines()[0]


def test_the_cli_fails_in_one_line_and_allow_loss_writes(tiny_llama_onnx, tmp_path, calib_text, bad_passes, capsys):
    from llmq.cli import compile_main

    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nopset: 21\nverify: {max_kl: 0.05}\npasses:\n  - test-scale-final-norm\n")
    args = [tiny_llama_onnx, "--recipe", str(path), "--calib-data", calib_text, "--calib-samples", "2",
            "--calib-seq-len", "64", "-o", str(tmp_path / "out"), "-q"]
    assert compile_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ": error: " in ln]) == 1
    assert "outside recipe bad's bound" in err and not (tmp_path / "out").exists()
    assert compile_main(args[:-1] + ["--allow-loss"]) == 0
    assert (tmp_path / "out" / "model.onnx").exists()


def test_every_float_linear_says_why(tiny_llama_onnx, tmp_path, calib_text):
    result = llmq_compile(tiny_llama_onnx, "w8a16", str(tmp_path / "out"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True, exclude=("layers.1.mlp.*",))
    rows = {r["name"]: r for r in result.report["layers"]}
    assert "LM head stays float" in rows["lm_head"]["float_reason"]
    assert "excluded by --exclude" in rows["layers.1.mlp.down"]["float_reason"]
    assert all("float_reason" in r for r in rows.values() if "weight_bits" not in r)


def test_nan_weights_are_refused_naming_the_tensor(tiny_llama_onnx, tmp_path, capsys):
    from llmq.cli import compile_main

    model = onnx.load(tiny_llama_onnx)
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(big).copy()
    values.flat[7] = np.nan
    big.CopyFrom(onnx.numpy_helper.from_array(values, big.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    code = compile_main([str(path), "--recipe", "w8a16", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"weight '{big.name}'" in err and "NaN" in err
    assert not (tmp_path / "out").exists()


def test_stacked_expert_weights_are_refused(tmp_path):
    """A graph whose MatMul reads a 3-D constant (mixture-of-experts with batched experts) gets one line."""
    from onnx import TensorProto, helper, numpy_helper

    from llmq.frontends.onnx_loader import load_graph

    experts = numpy_helper.from_array(np.ones((4, 8, 8), np.float32), "experts")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "experts"], ["y"], name="moe")], "moe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "t", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "t", 8])], [experts])
    path = tmp_path / "moe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    with pytest.raises(LlmqError, match="mixture-of-experts"):
        load_graph(str(path))


def test_gemm_linears_are_quantized_like_matmul_ones(tiny_gpt2_onnx, tmp_path, calib_text):
    """GPT-2 exports its linears as Gemm: the canonical form makes every pass see them (w8a8-dynamic used to
    skip all of them without a word)."""
    src = onnx.load(tiny_gpt2_onnx)
    assert sum(n.op_type == "Gemm" for n in src.graph.node) >= 8
    result = llmq_compile(tiny_gpt2_onnx, "w8a8-dynamic", str(tmp_path / "out"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True, backend="onnxruntime")
    t = result.report["totals"]
    assert t["quantized_weights"] == t["quantized_activations"] == 8 and t["int8_act_mac_fraction_decoder"] == 1.0
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (1, 20), dtype=np.int64)
    ref, got = _logits(tiny_gpt2_onnx, ids), _logits(result.paths["model"], ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


def test_a_hf_folder_without_tokenizer(tiny_llama_dir, tmp_path, capsys):
    import shutil

    from llmq.cli import compile_main, export_main

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(tiny_llama_dir):
        if not name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(os.path.join(tiny_llama_dir, name), bare / name)
    assert export_main([str(bare), "-o", str(tmp_path / "m.onnx"), "-q"]) == 0
    assert not (tmp_path / "m.tokenizer").exists()  # no stand-in tokenizer is written
    capsys.readouterr()
    code = compile_main([str(tmp_path / "m.onnx"), "--recipe", "w8a8", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer" in err and "--calib-data" in err and ".npz" in err and "Traceback" not in err


def test_held_out_windows_are_never_calibration_windows(tmp_path, tiny_llama_onnx, calib_text):
    from llmq.calib.data import load_calibration, load_holdout
    from llmq.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_llama_onnx[:-5] + ".tokenizer")
    calib = load_calibration(calib_text, tok, 4, 64)
    held, source, held_out = load_holdout(calib_text, tok, 4, 64, 3)
    assert held_out and held.shape == (3, 64) and calib_text in source
    assert not {tuple(r) for r in held} & {tuple(r) for r in calib}
    # an .npz: the rows after the calibration ones; with none left, the built-in text (a tokenizer exists)
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (6, 32), dtype=np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    held, source, held_out = load_holdout(str(tmp_path / "ids.npz"), tok, 4, 32, 3)
    assert held_out and np.array_equal(held, ids[4:6])
    held, source, held_out = load_holdout(str(tmp_path / "ids.npz"), tok, 6, 32, 2)
    assert held_out and held.shape == (2, 32) and "built-in" in source
    # no spare rows and no tokenizer: the calibration rows themselves, and it says so
    held, source, held_out = load_holdout(str(tmp_path / "ids.npz"), None, 6, 32, 2)
    assert not held_out and np.array_equal(held, ids[-2:])

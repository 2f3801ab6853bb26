"""Every architecture end to end: a correct model or a clear refusal, never a silently wrong one.

Tiny random-weight models of each family (``family_models.py``: norm weights and biases moved off 1 and 0, so a
wrong fold shows) are exported and compiled: the exact rewrites must keep the function through ONNX Runtime
at fp32 tolerance (and prove it in the report), every built-in recipe must land within its stated bound of
the float model, every linear the structure found must be quantized or say why not, and the LM head stays
float.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from family_models import ENCODERS, build_family, export_family

from llmq.driver import compile as llmq_compile
from llmq.ir.errors import LlmqError
from llmq.recipes import parse_recipe

DENSE = ("llama", "qwen2", "gemma2", "phi3", "mistral", "opt", "opt-postln", "gpt-neox", "gpt2", "falcon", "bert")
RECIPES = ("w8a16", "w8a8", "w8a8-dynamic", "w4a16")
EXACT_ONLY = parse_recipe("""name: exact-only
opset: 21
verify: {max_kl: 1.0e-6, max_rel_error: 1.0e-5}
passes:
  - smooth-attention
  - smooth-quant: {alpha: 0.5}
  - reorder-channels
  - split-range: {min_ratio: 1.01, percentile: 90}
""", "the exact-only test recipe")


@pytest.fixture(scope="session")
def family_onnx(tmp_path_factory, tiny_tokenizer):
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            folder = build_family(name, str(root / "hf"), tiny_tokenizer)
            cache[name] = (export_family(name, folder, str(root / "model.onnx")), folder)
        return cache[name]

    return get


def _outputs(path, ids):
    from llmq.backends.onnxruntime import make_session

    sess = make_session(path, optimize=False)
    return sess.run(None, {"input_ids": ids})[0]


def _compile(path, recipe, out, calib_text, tokenizer):
    return llmq_compile(path, recipe, str(out), calib=calib_text, tokenizer=tokenizer, calib_samples=2,
                        calib_seq_len=64, quiet=True, overwrite=True)


@pytest.mark.parametrize("family", DENSE)
def test_family(family, family_onnx, tmp_path, calib_text, tiny_tokenizer):
    path, _ = family_onnx(family)
    ids = np.random.default_rng(1).integers(3, 384, (2, 24), dtype=np.int64)
    reference = _outputs(path, ids)

    # exact rewrites: the function is kept (ONNX Runtime, fp32) and each pass proved it on the model itself
    result = _compile(path, EXACT_ONLY, tmp_path / "exact", calib_text, tiny_tokenizer)
    got = _outputs(result.paths["model"], ids)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))
    records = {p["pass"]: p for p in result.report["passes"]}
    assert not any(p["stats"].get("rolled_back") for p in records.values()), records
    assert records["smooth-quant"]["modified"] and records["smooth-quant"]["stats"]["exactness_error"] < 1e-5
    assert result.report["verification"]["within_bound"]

    # structure: every linear placed in a layer, the LM head found (causal LMs), nothing quantized by guess
    rows = result.report["layers"]
    assert all(r["layer"] is not None for r in rows if r["role"] != "lm_head"), [r["name"] for r in rows]
    heads = [r for r in rows if r["role"] == "lm_head"]
    assert len(heads) == (0 if family in ENCODERS else 1)
    decoder = [r for r in rows if r["role"] != "lm_head"]

    for recipe in RECIPES:
        result = _compile(path, recipe, tmp_path / recipe, calib_text, tiny_tokenizer)
        report = result.report
        assert report["verification"]["within_bound"], (recipe, report["verification"])
        layers = {r["name"]: r for r in report["layers"]}
        assert all("weight_bits" in layers[r["name"]] for r in decoder), (recipe, [
            (n, r.get("float_reason")) for n, r in layers.items() if "weight_bits" not in r])
        if recipe in ("w8a8", "w8a8-dynamic"):
            assert report["totals"]["int8_act_mac_fraction_decoder"] == 1.0, recipe
        for head in heads:
            assert "weight_bits" not in layers["lm_head"] and "LM head" in layers["lm_head"]["float_reason"]
        assert all("float_reason" in r for r in layers.values() if "weight_bits" not in r)
        got = _outputs(result.paths["model"], ids)
        assert np.isfinite(got).all()
        # the in-compile check measured the same thing the user would: both models in ONNX Runtime
        assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.5, recipe


def test_gemma2_softcapped_head_stays_float_and_layers_are_placed(family_onnx):
    from llmq.frontends.onnx_loader import load_graph
    from llmq.ir import discover

    path, _ = family_onnx("gemma2")
    st = discover(load_graph(path))
    assert st.summary()["roles"] == {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2, "lm_head": 1}
    assert len(st.attention) == 2 and all(lin.layer is not None for lin in st.linears if lin.role != "lm_head")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "Tanh" in ops  # the softcapping is there, and the head was found through it


def test_post_ln_smoothing_does_not_rescale_the_residual(family_onnx):
    """OPT-350m's layout: the LayerNorm output is also the residual, so smooth-quant must not fold 1/s into it."""
    from llmq.frontends.onnx_loader import load_graph
    from llmq.ir.passes import PassContext
    from llmq.passes import FoldSmoothQuantScalesPass
    from llmq.calib.observers import TensorStats

    path, _ = family_onnx("opt-postln")
    graph = load_graph(path)
    rng = np.random.default_rng(0)

    def stats(_, names):
        out = {}
        for n in names:
            s = TensorStats()
            s.update(rng.uniform(0.5, 3.0, (1, 4, 64)).astype(np.float32))
            out[n] = s
        return out

    ctx = PassContext(stats_provider=stats)
    result = FoldSmoothQuantScalesPass(alpha=0.5, groups=("qkv", "gate_up")).run(graph, ctx)
    folds = result.stats["folded_into"]
    assert "layernorm" not in folds and folds.get("mul", 0) >= 4, folds  # q/k/v and fc1 of both layers


def test_mixture_of_experts_is_refused_at_export(tmp_path, tiny_tokenizer, capsys):
    from llmq.cli import export_main

    folder = build_family("mixtral", str(tmp_path / "hf"), tiny_tokenizer)
    code = export_main([folder, "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert code == 2 and len(lines) == 1 and "mixture-of-experts" in lines[0] and "\x1b[" not in err
    assert len(err) < 1000 and not (tmp_path / "m.onnx").exists()


def test_refusals_are_errors_not_crashes():
    with pytest.raises(LlmqError):
        parse_recipe("name: x\nopset: 21\nverify: {max_kl: fast}\npasses: []\n", "test")

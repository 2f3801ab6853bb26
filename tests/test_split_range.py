"""split-range: exact in float, structure intact, INT8 error far below one per-tensor scale on massive rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import mlp_model, run_ort
from test_smooth_attention import _assert_same
from test_smooth_quant import _ctx, _logits

from llmq.calib.observers import TensorStats
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.graph import Graph
from llmq.ir.passes import PassContext, PassManager
from llmq.passes import (FoldSmoothQuantScalesPass, QuantizeActivationsPass, QuantizeWeightsPass, ReorderChannelsPass,
                         SplitRangePass)
from llmq.passes.qdq_math import sqnr_db


@pytest.mark.parametrize("family,roles,stacks", [("llama", ("q", "k", "v", "o", "gate", "up", "down"), 8),
                                                 ("gpt2", ("fc2",), 2)])
def test_exact_in_float_and_roles_kept(family, roles, stacks, request):
    """Every role split (llama): q/k/v share one stacked input and gate/up another; names, roles, layers and
    producers are what discovery found before."""
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph = load_graph(path)
    ctx = _ctx()
    before = ctx.structure(graph)
    roles_before = [(lin.name, lin.role, lin.layer, lin.producer) for lin in before.linears]
    adds_before = len(before.residual_adds)
    # the tiny random models have no massive activations: a low percentile and ratio make every layer split
    records = PassManager([SplitRangePass(percentile=90.0, min_ratio=1.5, roles=roles)], verify=True).run(graph, ctx)
    assert records[0]["stats"]["split_linears"] == 2 * len(roles)
    assert sum(1 for n in graph.gs.nodes if n.op == "Clip" and n.name.startswith("split-range")) == stacks
    _assert_same(path, graph)
    after = ctx.structure(graph)
    assert [(lin.name, lin.role, lin.layer, lin.producer) for lin in after.linears] == roles_before
    assert len(after.residual_adds) == adds_before
    for lin in after.linears:
        assert lin.range_split == (lin.role in roles)
        if lin.role in roles:
            row = ctx.layers[lin.name]
            assert row["range_split_ratio"] >= 1.5 and row["range_split_int8_macs_per_token"] == lin.macs_per_token
            assert 0 < row["range_split_threshold"] < row["range_split_absmax"]


def test_quantized_halves_share_one_scale_and_lower_to_ort(tiny_llama_onnx):
    """After split-range the activation quantizer's minmax range is the clip value T (both halves span ±T),
    and the INT8 linears still run through ONNX Runtime's integer MatMul lowering."""
    from llmq.backends.ort_lowering import LowerToIntegerMatMulPass

    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    PassManager([SplitRangePass(percentile=90.0, min_ratio=1.5), QuantizeActivationsPass(), QuantizeWeightsPass()]).run(graph, ctx)
    for name in ("layers.0.mlp.down", "layers.1.mlp.down"):
        row = ctx.layers[name]
        assert row["act_amax"] == pytest.approx(row["range_split_threshold"], rel=1e-5)
    ids = np.random.default_rng(1).integers(0, 384, (2, 40))
    quantized = _logits(graph.to_model(), ids)
    result = LowerToIntegerMatMulPass().run(graph, ctx)
    assert result.modified and result.stats["lowered"] == 14
    lowered = _logits(graph.to_model(), ids)
    np.testing.assert_allclose(lowered, quantized, atol=0.05 * np.abs(quantized).max())


def test_decode_step_is_exact(tiny_llama_kv_onnx, tmp_path):
    """One-token decode steps (a single row per split half) give the export's logits."""
    from conftest import decode_logits

    graph = load_graph(tiny_llama_kv_onnx)
    ids = np.random.default_rng(0).integers(0, 384, (3, 1, 24), dtype=np.int64)
    from llmq.calib.collect import collect_stats

    ctx = PassContext(stats_provider=lambda g, names: collect_stats(g, names, list(ids)))
    PassManager([SplitRangePass(percentile=90.0, min_ratio=1.5)]).run(graph, ctx)
    path = str(tmp_path / "split.onnx")
    onnx.save(graph.to_model(), path)
    prompt = np.random.default_rng(2).integers(0, 384, (1, 7), dtype=np.int64)
    for ref, got in zip(decode_logits(tiny_llama_kv_onnx, prompt, [5, 9, 11]), decode_logits(path, prompt, [5, 9, 11])):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rescaling_passes_refuse_a_split_linear(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    PassManager([SplitRangePass(percentile=90.0, min_ratio=1.5), FoldSmoothQuantScalesPass(alpha=0.5),
                 ReorderChannelsPass()], verify=True).run(graph, ctx)
    reasons = [d for d in ctx.declined if d["where"].endswith("mlp.down")]
    assert {d["pass"] for d in reasons} >= {"smooth-quant", "reorder-channels"}
    assert all("split by range" in d["reason"] for d in reasons if d["pass"] in ("smooth-quant", "reorder-channels"))
    _assert_same(tiny_llama_onnx, graph)  # what did fold (q/k/v, gate/up, v→o) is still exact


def test_small_range_is_declined(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    result = SplitRangePass(min_ratio=1000.0).run(graph, ctx)
    assert not result.modified and len([d for d in ctx.declined if d["pass"] == "split-range"]) == 2


def _float_stats(xs: list):
    """A stats provider feeding float ``x`` batches to a bare MLP graph."""
    def provider(graph: Graph, names: list) -> dict:
        model = graph.to_model()
        for name in names:
            if name not in {o.name for o in model.graph.output}:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        stats = {name: TensorStats() for name in names}
        for x in xs:
            for name, value in zip(names, run_ort(model, {"x": x})[1:1 + len(names)]):
                stats[name].update(value)
        return stats
    return provider


def _massive_rows(rng, rows: int, k: int) -> tuple:
    """Gaussian rows, a few of them (as an LLM's first and delimiter tokens) 100-300× larger; and which."""
    x = rng.standard_normal((rows, k)).astype(np.float32)
    big = rng.choice(rows, rows // 256, replace=False)
    x[big] *= rng.uniform(100, 300, (len(big), 1)).astype(np.float32)
    return x, big


def test_int8_error_far_below_one_scale_on_massive_rows():
    """The stated bound: with 1/256 of the rows 100–300× larger, the output SQNR of the ordinary rows improves
    by ≥ 20 dB over plain per-tensor INT8 on held-out rows (plain INT8 leaves them about 0 dB: noise), the
    massive rows lose at most 1 dB, and every linear is still INT8."""
    rng = np.random.default_rng(0)
    calib = [_massive_rows(rng, 512, 16)[0] for _ in range(4)]
    test, big = _massive_rows(rng, 1024, 16)
    bulk = np.setdiff1d(np.arange(len(test)), big)
    ref = run_ort(mlp_model(16, 64, 8), {"x": test})[0]

    def sqnr(pre: list) -> tuple:
        graph = Graph.from_model(mlp_model(16, 64, 8))
        ctx = PassContext(stats_provider=_float_stats(calib))
        roles = {"roles": ("unknown", "lm_head")}
        PassManager([*pre, QuantizeActivationsPass(**roles), QuantizeWeightsPass(**roles)]).run(graph, ctx)
        quantized = sum(1 for n in graph.gs.nodes if n.op == "QuantizeLinear")
        y = run_ort(graph.to_model(), {"x": test})[0]
        return (sqnr_db(ref[bulk], y[bulk]), sqnr_db(ref[big], y[big])), quantized

    plain, q_plain = sqnr([])
    split, q_split = sqnr([SplitRangePass(roles=("unknown", "lm_head"), percentile=99.0)])
    assert q_plain == q_split == 2  # both linears' inputs INT8 either way
    assert split[0] >= plain[0] + 20.0 and split[1] >= plain[1] - 1.0, (plain, split)


@pytest.mark.parametrize("backend", ["qdq", "onnxruntime"])
def test_compile_reports_the_split_and_keeps_tensorrt_rules(tiny_llama_onnx, tmp_path, calib_text, backend):
    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import perplexity

    recipe = tmp_path / "sr.yaml"
    recipe.write_text("name: sr\npasses:\n  - smooth-quant: {alpha: 0.5}\n  - split-range: {percentile: 90, min_ratio: 1.5}\n"
                      "  - quantize-activations\n  - quantize-weights\n")
    result = llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "o"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, backend=backend, quiet=True)
    report = result.report
    assert report["backend"]["tensorrt_rule_violations"] == []
    rows = {r["name"]: r for r in report["layers"]}
    downs = [rows[f"layers.{i}.mlp.down"] for i in (0, 1)]
    decoder = sum(r["macs_per_token"] for r in report["layers"] if r["role"] != "lm_head")
    assert report["totals"]["range_split_extra_int8_mac_fraction"] == round(sum(r["macs_per_token"] for r in downs) / decoder, 4)
    assert report["totals"]["int8_act_mac_fraction_decoder"] == 1.0
    assert all(r["sqnr_db"] > 20 and r["range_split_ratio"] >= 1.5 for r in downs)
    assert "split-range on 2 linears" in result.report["summary"]
    windows = np.random.default_rng(3).integers(0, 384, (2, 32), dtype=np.int64)
    assert np.isfinite(perplexity(result.paths["model"], windows)["perplexity"])

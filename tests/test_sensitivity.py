"""sensitivity: per-group output KL, ranking, and the float budget honoured by quantize-activations."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_VOCAB

from llmq.calib.collect import collect_stats
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassContext, PassManager
from llmq.passes import AnalyzeSensitivityPass, QuantizeActivationsPass
from llmq.passes.sensitivity import mean_kl


def _ctx():
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (3, 1, 48), dtype=np.int64)
    ctx = PassContext(stats_provider=lambda g, names: collect_stats(g, names, list(ids)))
    ctx.calibration_batch = ids[0]
    return ctx


def test_mean_kl():
    a = np.random.default_rng(0).standard_normal((5, 7))
    assert mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    assert mean_kl(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # a shift does not change softmax
    assert mean_kl(a, a * 2) > 0


@pytest.mark.parametrize("budget", [{"keep_float": 2}, {"max_kl": 0.0}])
def test_ranking_and_budget(tiny_llama_onnx, budget):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    records = PassManager([AnalyzeSensitivityPass(**budget), QuantizeActivationsPass()]).run(graph, ctx)
    stats = records[0]["stats"]
    assert not records[0]["modified"] and stats["groups"] == 8  # 2 layers × (qkv, o, gate/up, down)
    ranks = {name: r["sensitivity_rank"] for name, r in ctx.layers.items() if "sensitivity_rank" in r}
    kls = {name: r["sensitivity_kl"] for name, r in ctx.layers.items() if "sensitivity_kl" in r}
    assert all(v >= 0 for v in kls.values()) and max(kls.values()) > 0
    # rank 1 is the largest KL
    top = min(ranks, key=ranks.get)
    assert kls[top] == max(kls.values())
    float_inputs = {name for name, r in ctx.layers.items() if "act_bits" not in r}
    if "keep_float" in budget:
        assert len(stats["kept_float"]) == 2 and top in float_inputs
        assert stats["kl_joint_after_budget"] < stats["kl_joint_all"]
    else:  # a zero budget keeps every group float
        assert len(stats["kept_float"]) == 8 and records[1]["stats"]["quantized_tensors"] == 0
    assert any("kept float by the sensitivity budget" in d["reason"] for d in ctx.declined)


def test_loss_budget_is_met_by_the_joint_measurement(tiny_llama_onnx):
    """max_kl: the fewest groups kept float so that all the others quantized *together* fit the budget; the
    joint KL the pass reports is what the quantized graph really does on the calibration batch."""
    import onnxruntime as ort

    from test_smooth_quant import _logits

    graph = load_graph(tiny_llama_onnx)
    probe = AnalyzeSensitivityPass().run(graph, _ctx())
    budget = probe.stats["kl_joint_all"] / 4
    ctx = _ctx()
    records = PassManager([AnalyzeSensitivityPass(max_kl=budget), QuantizeActivationsPass()]).run(graph, ctx)
    stats = records[0]["stats"]
    assert 0 < len(stats["kept_float"]) < 8
    assert stats["kl_joint_after_budget"] <= budget < stats["kl_joint_all"]
    batch = ctx.calibration_batch[..., :256]
    got = ort.InferenceSession(graph.to_model().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": batch})[0][0]
    assert mean_kl(_logits(tiny_llama_onnx, batch)[0], got) == pytest.approx(stats["kl_joint_after_budget"], rel=1e-3)


def test_compile_with_sensitivity_writes_ranking_and_plot(tiny_llama_onnx, tmp_path, calib_text):
    from llmq.driver import compile as llmq_compile

    recipe = tmp_path / "s.yaml"
    recipe.write_text("name: s\npasses:\n  - sensitivity: {keep_float: 1}\n  - quantize-activations\n  - quantize-weights\n")
    result = llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "o"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True)
    svg = (tmp_path / "o" / "sensitivity.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") == 8 and "#c0392b" in svg
    assert "most sensitive activation groups" in result.report["summary"]
    assert result.report["totals"]["int8_act_mac_fraction_decoder"] < 1.0


def test_budget_can_switch_groups_to_per_token(tiny_llama_onnx, tmp_path, calib_text):
    from llmq.driver import compile as llmq_compile
    from llmq.ir.errors import LlmqError

    recipe = tmp_path / "pt.yaml"
    recipe.write_text("name: pt\nbackends: [onnxruntime, qdq]\npasses:\n"
                      "  - sensitivity: {keep_float: 2, action: per-token}\n  - quantize-activations\n"
                      "  - quantize-activations-dynamic: {only_switched: true}\n  - quantize-weights\n")
    result = llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "o"), calib=calib_text, calib_samples=2,
                          calib_seq_len=64, quiet=True)
    rows = {r["name"]: r for r in result.report["layers"]}
    switched = [n for n, r in rows.items() if r.get("act_granularity") == "per-token dynamic"]
    static = [n for n, r in rows.items() if r.get("act_bits") and r.get("act_granularity") != "per-token dynamic"]
    assert 2 <= len(switched) <= 4 and len(static) == 14 - len(switched)  # a group is 1-3 linears
    assert result.report["totals"]["int8_act_mac_fraction_decoder"] == 1.0
    recipe.write_text("name: pt\npasses:\n  - sensitivity: {keep_float: 2, action: per-token}\n  - quantize-activations\n")
    with pytest.raises(LlmqError, match="only_switched"):
        llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "o2"), calib=calib_text, quiet=True)


@pytest.mark.parametrize("split", [False, True])
def test_min_int8_macs_caps_the_float_budget(tiny_llama_onnx, split):
    """The floor holds as the report counts it, also when split-off outlier channels already run in float
    (their MACs are in the total and count as float: a recipe once reported 89.99 % against a 90 % floor)."""
    from llmq.passes import SplitOutlierChannelsPass
    from llmq.report import int8_act_mac_fraction, layer_table

    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    first = [SplitOutlierChannelsPass(ratio=2.0, max_fraction=0.25)] if split else []
    records = PassManager(first + [AnalyzeSensitivityPass(max_kl=0.0, min_int8_macs=0.75), QuantizeActivationsPass()]).run(graph, ctx)
    stats = records[len(first)]["stats"]
    assert 0 < len(stats["kept_float"]) < 8 and stats["limited_by_min_int8_macs"]
    assert any("split_float_macs_per_token" in row for row in ctx.layers.values()) == split
    rows = layer_table(ctx.structure(graph).linears, ctx.layers, {})
    assert int8_act_mac_fraction(rows, include_lm_head=False) >= 0.75


def test_marginal_ranking_meets_the_same_budget_with_no_more_groups(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    budget = AnalyzeSensitivityPass().run(graph, _ctx()).stats["kl_joint_all"] / 4
    kept = {}
    for ranking in ("isolated", "marginal", "marginal-per-mac"):
        ctx = _ctx()
        stats = AnalyzeSensitivityPass(max_kl=budget, ranking=ranking).run(graph, ctx).stats
        assert stats["kl_joint_after_budget"] <= budget
        kept[ranking] = len(stats["kept_float"])
    assert 0 < kept["marginal"] <= kept["isolated"]


def test_a_budget_met_with_every_group_quantized_skips_the_marginal_runs(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    labels = []
    ctx.progress = lambda items, label: labels.append(label) or items
    joint_all = AnalyzeSensitivityPass().run(graph, _ctx()).stats["kl_joint_all"]
    stats = AnalyzeSensitivityPass(max_kl=2 * joint_all, ranking="marginal").run(graph, ctx).stats
    assert stats["kept_float"] == [] and stats["ranking"] == "isolated" and labels == ["sensitivity"]
    assert stats["kl_joint_after_budget"] == stats["kl_joint_all"] <= 2 * joint_all
    tight = AnalyzeSensitivityPass(max_kl=joint_all / 4, ranking="marginal").run(graph, _ctx()).stats
    assert tight["ranking"] == "marginal" and tight["kept_float"]


def test_mac_floor_counts_split_channels_as_the_report_does():
    """Four groups of 100 MACs, 40 more MACs of split-off outlier channels already float, a 75 % floor: the
    report counts (400 − kept) / 440, so not even one group may go float (one would leave 68 %)."""
    from types import SimpleNamespace

    from llmq.report import int8_act_mac_fraction

    lins = [SimpleNamespace(name=f"l{i}", role="down", macs_per_token=100) for i in range(4)]
    ctx = _ctx()
    ctx.layers["l0"] = {"split_float_macs_per_token": 40}
    groups = {f"g{i}": [lin] for i, lin in enumerate(lins)}
    cap = AnalyzeSensitivityPass(min_int8_macs=0.75)._mac_cap(ctx, SimpleNamespace(linears=lins), list(groups), groups)
    assert cap == 0
    rows = [{"role": "down", "macs_per_token": 100, "act_bits": 8, **ctx.layers.get(lin.name, {})} for lin in lins]
    assert int8_act_mac_fraction(rows) >= 0.75
    rows[1].pop("act_bits")  # one group more in float breaks the floor
    assert int8_act_mac_fraction(rows) < 0.75

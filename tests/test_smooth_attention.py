"""smooth-attention: scores unchanged (ORT, fp32 tolerance) on both families, λ tied across RoPE pairs and GQA
groups (and the tying is what makes it exact), declines, key statistics transformed as the math says."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import TINY_VOCAB
from test_smooth_quant import _ctx, _logits

from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassManager
from llmq.passes import FoldSmoothAttentionScalesPass, FoldSmoothQuantScalesPass
from llmq.passes import smooth_attention


def _ids():
    return np.random.default_rng(1).integers(0, TINY_VOCAB, (2, 40), dtype=np.int64)


def _assert_same(path, graph):
    ref, got = _logits(path, _ids()), _logits(graph.to_model(), _ids())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("family,pairing", [("llama", "half"), ("gpt2", "none")])
@pytest.mark.parametrize("with_smooth_quant", [False, True])
def test_exact_in_float(family, pairing, with_smooth_quant, request):
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph = load_graph(path)
    ctx = _ctx()
    passes = ([FoldSmoothQuantScalesPass(alpha=0.5)] if with_smooth_quant else []) + [FoldSmoothAttentionScalesPass()]
    records = PassManager(passes, verify=True).run(graph, ctx)
    assert records[-1]["modified"] and records[-1]["stats"]["smoothed_blocks"] == 2
    _assert_same(path, graph)
    blocks = {k: v for k, v in ctx.layers.items() if "rotary_pairing" in v}
    assert set(blocks) == {"layers.0.attn", "layers.1.attn"}
    assert {v["rotary_pairing"] for v in blocks.values()} == {pairing}
    assert all(v["key_outlier_ratio_after"] < v["key_outlier_ratio_before"] for v in blocks.values())


def test_untied_scales_would_break_rope(tiny_llama_onnx, monkeypatch):
    """The check above can fail: without tying λ across each RoPE pair the scores change."""
    monkeypatch.setattr(smooth_attention, "_tie_pairs", lambda lam, d, pairing: lam)
    graph = load_graph(tiny_llama_onnx)
    PassManager([FoldSmoothAttentionScalesPass()]).run(graph, _ctx())
    with pytest.raises(AssertionError):
        _assert_same(tiny_llama_onnx, graph)


def test_lambda_tied_across_rope_pairs_and_gqa_groups(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    st = ctx.structure(graph)
    q, k = (next(lin for lin in st.linears if lin.name == f"layers.0.attn.{r}") for r in ("q", "k"))
    wq, wk = np.asarray(q.weight.tensor.values).copy(), np.asarray(k.weight.tensor.values).copy()
    PassManager([FoldSmoothAttentionScalesPass(alpha=0.5)]).run(graph, ctx)
    lam_q = (np.asarray(q.node.inputs[1].values) / wq)[0]  # column scales, [4 heads × 16]
    lam_k = (wk / np.asarray(k.node.inputs[1].values))[0]  # [2 kv heads × 16]
    lam_q, lam_k = lam_q.reshape(2, 2, 16), lam_k.reshape(2, 16)
    np.testing.assert_allclose(lam_q[:, 0], lam_k, rtol=1e-5)  # each query head takes its kv head's λ
    np.testing.assert_allclose(lam_q[:, 1], lam_k, rtol=1e-5)
    np.testing.assert_allclose(lam_k[:, :8], lam_k[:, 8:], rtol=1e-6)  # tied across (i, i + D/2)
    assert np.ptp(lam_k) > 0  # and not trivially 1


def test_key_statistics_follow_the_scale(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    k = next(lin for lin in ctx.structure(graph).linears if lin.name == "layers.1.attn.k")
    name = k.node.outputs[0].name
    before = ctx.activation_stats(graph, [name])[name].channel_absmax.copy()
    wk = np.asarray(k.weight.tensor.values).copy()
    PassManager([FoldSmoothAttentionScalesPass()]).run(graph, ctx)
    lam = (wk / np.asarray(k.node.inputs[1].values))[0]
    after = ctx.activation_stats(graph, [k.node.outputs[0].name])[k.node.outputs[0].name].channel_absmax
    np.testing.assert_allclose(after, before / lam, rtol=1e-4)


def test_shared_key_weight_is_refused(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    k = next(lin for lin in ctx.structure(graph).linears if lin.name == "layers.0.attn.k")
    extra = gs.Variable("k_weight_copy", dtype=np.float32)
    graph.gs.nodes.append(gs.Node("Identity", inputs=[k.node.inputs[1]], outputs=[extra]))
    graph.gs.outputs.append(extra)
    result = FoldSmoothAttentionScalesPass().run(graph, ctx)
    assert result.stats["smoothed_blocks"] == 1
    assert {(d["where"], d["reason"]) for d in ctx.declined} == \
           {("layers.0.attn", "initializer of layers.0.attn.k shared outside the block")}


def test_a_key_norm_is_declined(tiny_llama_onnx):
    """A q/k norm (as in Qwen3 / OLMo-2) between the projection and RoPE does not commute with λ."""
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    k = next(lin for lin in ctx.structure(graph).linears if lin.name == "layers.0.attn.k")
    out = k.node.outputs[0]
    normed = gs.Variable("k_normed", dtype=np.float32)
    consumers = list(out.outputs)
    graph.gs.nodes.append(gs.Node("LpNormalization", attrs={"axis": -1, "p": 2}, inputs=[out], outputs=[normed]))
    for c in consumers:
        c.inputs[[i for i, t in enumerate(c.inputs) if t is out][0]] = normed
    result = FoldSmoothAttentionScalesPass().run(graph, ctx)
    assert result.stats["smoothed_blocks"] == 1
    (d,) = ctx.declined
    assert d["where"] == "layers.0.attn" and "LpNormalization" in d["reason"] and "does not commute" in d["reason"]

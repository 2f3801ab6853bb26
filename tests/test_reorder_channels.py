"""reorder-channels: exact in float (ORT, fp32 tolerance) on both families, alone and after the smoothing
passes; outlier channels cluster; a split-outliers side branch makes it decline rather than break."""

from __future__ import annotations

import numpy as np
import pytest
from test_smooth_attention import _assert_same
from test_smooth_quant import _ctx

from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassManager
from llmq.passes import (FoldSmoothAttentionScalesPass, FoldSmoothQuantScalesPass, ReorderChannelsPass,
                         SplitOutlierChannelsPass)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("before", [[], ["smooth"]])
def test_exact_in_float(family, before, request):
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph = load_graph(path)
    ctx = _ctx()
    passes = [FoldSmoothQuantScalesPass(alpha=0.5), FoldSmoothAttentionScalesPass()] if before else []
    records = PassManager(passes + [ReorderChannelsPass(group_size=8)], verify=True).run(graph, ctx)
    assert records[-1]["stats"]["reordered"] == 4 and not ctx.declined  # o and down/fc2 of 2 layers
    _assert_same(path, graph)
    rows = {k: v for k, v in ctx.layers.items() if "reorder_kind" in v}
    assert {v["reorder_kind"] for v in rows.values()} == {"o", "mlp"}
    assert all(v["outlier_groups_after"] <= v["outlier_groups_before"] for v in rows.values())
    mlp = [v for v in rows.values() if v["reorder_kind"] == "mlp"]
    assert all(v["outlier_groups_after"] == 1 for v in mlp)  # the top 1 % now share one group


def test_input_channels_come_sorted(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    PassManager([ReorderChannelsPass(roles=("down",))]).run(graph, ctx)
    down = next(lin for lin in ctx.structure(graph).linears if lin.name == "layers.0.mlp.down")
    absmax = ctx.activation_stats(graph, [down.act.name])[down.act.name].channel_absmax
    assert np.all(np.diff(absmax) <= 1e-6 * absmax.max())  # recollected statistics: descending


def test_split_branch_is_declined_not_broken(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    PassManager([SplitOutlierChannelsPass(ratio=2.0), ReorderChannelsPass()], verify=True).run(graph, ctx)
    reasons = {d["where"]: d["reason"] for d in ctx.declined if d["pass"] == "reorder-channels"}
    assert set(reasons) == {"layers.0.mlp.down", "layers.1.mlp.down"}
    assert all("outside the path" in r for r in reasons.values())
    _assert_same(tiny_llama_onnx, graph)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_layout_is_kept(family, request):
    """On a KV-cache decoder the values are a graph output: o is declined (reordering its input would permute
    the cache's channels), down / fc2 are still reordered, and every output, the cache included, is unchanged."""
    path = request.getfixturevalue(f"tiny_{family}_kv_onnx")
    graph = load_graph(path)
    ctx = _ctx()
    records = PassManager([ReorderChannelsPass(group_size=8)], verify=True).run(graph, ctx)
    assert records[-1]["stats"]["reordered"] == 2
    reasons = {d["where"]: d["reason"] for d in ctx.declined if d["pass"] == "reorder-channels"}
    assert len(reasons) == 2 and all("KV cache" in r for r in reasons.values())
    assert {v["reorder_kind"] for v in ctx.layers.values() if "reorder_kind" in v} == {"mlp"}
    _assert_same_with_cache(path, graph)


def _assert_same_with_cache(path, graph):
    """Every output of the KV-cache decoder ``graph`` (logits and present keys and values) equals the original's
    on a prompt with a non-empty past (ONNX Runtime, fp32 tolerance)."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    model = onnx.load(path)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 50, (1, 4), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(5, 9, dtype=np.int64)[None]
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, 9), dtype=np.int64)
        else:  # past keys / values: batch 1, heads and head size from the model, 5 past tokens
            feeds[i.name] = rng.standard_normal((1, dims[1], 5, dims[3])).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(run(model), run(graph.to_model())):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())

"""split-outliers: exact in float, a float side branch structure discovery leaves alone, MAC accounting."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from conftest import TINY_VOCAB

from llmq.calib.collect import collect_stats
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassContext, PassManager
from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass, SplitOutlierChannelsPass


def _ctx():
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (3, 1, 32), dtype=np.int64)
    return PassContext(stats_provider=lambda g, names: collect_stats(g, names, list(ids)))


def _logits(src, ids):
    src = src if isinstance(src, str) else src.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]


def test_split_is_exact_and_the_branch_stays_float(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    threshold = 0.05  # the tiny random model has small activations: pick a threshold some channels pass
    records = PassManager([SplitOutlierChannelsPass(threshold=threshold, max_fraction=0.1)], verify=True).run(graph, ctx)
    assert records[0]["stats"]["split_linears"] == 2
    ids = np.random.default_rng(1).integers(0, TINY_VOCAB, (2, 40), dtype=np.int64)
    ref = _logits(tiny_llama_onnx, ids)
    np.testing.assert_allclose(_logits(graph.to_model(), ids), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    for name in ("layers.0.mlp.down", "layers.1.mlp.down"):
        rec = ctx.layers[name]
        assert 1 <= len(rec["split_channels"]) <= 16 and rec["split_float_macs_per_token"] == len(rec["split_channels"]) * 64
    # quantizing afterwards leaves the side branch in float and quantizes the masked input
    PassManager([QuantizeActivationsPass(), QuantizeWeightsPass()]).run(graph, ctx)
    st = ctx.structure(graph)
    assert len(st.linears) == 15 and {lin.role for lin in st.linears} >= {"down"}
    model = graph.to_model()
    float_branch = [n for n in model.graph.node if {p.key: p.value for p in n.metadata_props}.get("llmq.role") == "float-branch"]
    assert len(float_branch) == 2 and all(n.op_type == "MatMul" for n in float_branch)
    assert np.isfinite(_logits(model, ids)).all()


def test_no_channel_over_threshold_is_declined(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    result = SplitOutlierChannelsPass(threshold=1e6).run(graph, ctx)
    assert not result.modified and len(ctx.declined) == 2


def test_relative_threshold_then_smoothing_stays_exact(tiny_llama_onnx):
    """Split first (outliers picked on the raw activations, ratio × the median channel), then smooth-quant
    folds into up/down around the mask: the split channels' scale must stay 1 for the side branch."""
    from test_smooth_attention import _assert_same
    from test_smooth_quant import _ctx

    from llmq.passes import FoldSmoothQuantScalesPass

    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    records = PassManager([SplitOutlierChannelsPass(ratio=2.0, max_fraction=0.02),
                           FoldSmoothQuantScalesPass(alpha=0.5)], verify=True).run(graph, ctx)
    assert records[0]["stats"]["split_linears"] == 2
    assert records[1]["stats"]["folded_into"]["up"] == 2
    _assert_same(tiny_llama_onnx, graph)
    for name in ("layers.0.mlp.down", "layers.1.mlp.down"):
        row = ctx.layers[name]
        assert 1 <= len(row["split_channels"]) <= 3  # max_fraction 2 % of 160 channels

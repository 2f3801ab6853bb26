"""quantize-kv-cache: Q/DQ on the keys and values entering attention, per tensor (TensorRT-deployable) or per
head (INT8/INT4), with GQA heads sharing a scale; bounded error through ONNX Runtime on both families."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_smooth_quant import _ctx, _logits

from llmq.backends.qdq import check_tensorrt_rules
from llmq.frontends.onnx_loader import load_graph
from llmq.ir import Graph
from llmq.ir.errors import UsageError
from llmq.ir.passes import PassManager
from llmq.passes import FoldSmoothAttentionScalesPass, QuantizeKVCachePass
from test_smooth_attention import _ids


def _run(path, *passes):
    graph = load_graph(path)
    ctx = _ctx()
    records = PassManager(list(passes), verify=True).run(graph, ctx)
    return graph, ctx, records[-1]


def _rel_err(path, graph):
    ref, got = _logits(path, _ids()), _logits(graph.to_model(), _ids())
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_per_tensor(family, request):
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph, ctx, record = _run(path, FoldSmoothAttentionScalesPass(), QuantizeKVCachePass())
    assert record["stats"]["quantized_tensors"] == 4  # k and v of 2 layers
    st = ctx.structure(graph)
    nodes = graph.node_by_name()
    for block in st.attention:
        for key in ("scores", "context"):
            dq = Graph.producer(nodes[block[key]].inputs[1])
            assert dq.op == "DequantizeLinear" and np.asarray(dq.inputs[1].values).ndim == 0
            assert Graph.producer(dq.inputs[0]).op == "QuantizeLinear"
    assert check_tensorrt_rules(graph) == []
    assert 0.0 < _rel_err(path, graph) < 0.02  # INT8 cache: a small, non-zero change


def test_int4_per_head_shares_scales_across_a_gqa_group(tiny_llama_onnx):
    graph, ctx, record = _run(tiny_llama_onnx, QuantizeKVCachePass(bits=4, granularity="per-head"))
    assert record["stats"]["quantized_tensors"] == 4
    model = graph.to_model()
    zero_points = [i for i in model.graph.initializer if "cache_zero_point" in i.name]
    assert zero_points and {i.data_type for i in zero_points} == {onnx.TensorProto.INT4}
    nodes = graph.node_by_name()
    for block in ctx.structure(graph).attention:
        dq = Graph.producer(nodes[block["scores"]].inputs[1])
        scale = np.asarray(dq.inputs[1].values)
        assert scale.shape == (4,) and dq.attrs["axis"] == 1  # 4 query heads over 2 kv heads
        np.testing.assert_array_equal(scale[0], scale[1])
        np.testing.assert_array_equal(scale[2], scale[3])
        assert scale[0] != scale[2]
    # per-axis activation scales are not TensorRT's: the rule check says so
    assert any("per-channel" in p["rule"] for p in check_tensorrt_rules(graph))
    err = _rel_err(tiny_llama_onnx, graph)
    assert 0.0 < err < 0.15
    # and 4 bits lose more than 8
    graph8, _, _ = _run(tiny_llama_onnx, QuantizeKVCachePass(granularity="per-head"))
    assert _rel_err(tiny_llama_onnx, graph8) < err


def test_already_quantized_is_declined(tiny_llama_onnx):
    graph, ctx, _ = _run(tiny_llama_onnx, QuantizeKVCachePass())
    result = QuantizeKVCachePass().run(graph, ctx)
    assert not result.modified
    assert {d["reason"] for d in ctx.declined} == {"already quantized"}


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 6}, {"granularity": "per-token"}, {"tensors": ["q"]}])
def test_bad_options(options):
    with pytest.raises(UsageError, match="quantize-kv-cache"):
        QuantizeKVCachePass(**options)

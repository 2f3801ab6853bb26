"""The TensorRT side of the new formats: llmq's W4A8Gemm plugin (packing, arithmetic, lowering, the node's
attributes, verification through its ONNX definition), optimization profiles and the trtexec line, and the
rule check's new rules, each with a graph it must catch."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import mlp_model, run_ort
from onnx import TensorProto, helper, numpy_helper

from llmq.backends.qdq import check_tensorrt_rules
from llmq.backends.trt_plugin import OP, LowerW4A8ToPluginPass, pack, plugin_available, reference, unpack, w4a8_gemm_torch
from llmq.ir import Graph
from llmq.ir.passes import PassContext, PassManager
from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass, QuantizeWeightsProgressivePass
from llmq.passes.qdq_math import progressive_quantize

ALL = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "unknown")


@pytest.mark.parametrize("k,n,group", [(256, 40, 128), (96, 7, 32), (192, 5, 64)])
def test_packing_round_trips(k, n, group):
    pw = progressive_quantize(np.random.default_rng(k).standard_normal((k, n)).astype(np.float32), group)
    codes, scales, zeros = pack(pw.q, pw.group_scale, pw.zero_point)
    assert {a.dtype for a in (codes, scales, zeros)} == {np.dtype(np.int8)}  # TensorRT widens UINT8 constants
    assert codes.shape == (n, k // 2) and scales.shape == (n, k // group) and zeros.shape == (n, -(-k // group // 2))
    q, s2, z = unpack(codes, scales, zeros, k, group)
    np.testing.assert_array_equal(q, pw.q.astype(np.uint8))
    np.testing.assert_array_equal(s2, pw.group_scale)
    np.testing.assert_array_equal(z, pw.zero_point.astype(np.uint8))
    # the first code of each byte is its low nibble
    assert (codes.view(np.uint8)[0, 0] & 0x0F) == int(pw.q[0, 0]) and (codes.view(np.uint8)[0, 0] >> 4) == int(pw.q[1, 0])


def _w4a8_mlp():
    model = mlp_model(k=256, n=128, m=64)
    graph = Graph.from_model(model)
    ctx = PassContext()
    PassManager([QuantizeWeightsProgressivePass(roles=ALL), QuantizeActivationsPass(roles=ALL, granularity="per-token")]).run(graph, ctx)
    return graph, ctx


def test_plugin_arithmetic_matches_the_qdq_model():
    """The plugin's computation — numpy reference and the torch code its TensorRT implementation runs (here on the
    CPU) — equals ONNX Runtime running the Q/DQ graph it replaces."""
    import torch

    graph, ctx = _w4a8_mlp()
    qdq = graph.to_model()
    w1 = numpy_helper.to_array(mlp_model(k=256, n=128, m=64).graph.initializer[0])
    pw = progressive_quantize(w1, 128)
    codes, scales, zeros = pack(pw.q, pw.group_scale, pw.zero_point)
    x = np.random.default_rng(3).standard_normal((2, 5, 256)).astype(np.float32)
    x[0, 1] *= 40
    ref = reference(x, codes, scales, zeros, pw.channel_scale, 128)
    got = w4a8_gemm_torch(*(torch.from_numpy(a) for a in (x, codes, scales, zeros, pw.channel_scale)), group=128).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # the first linear of the Q/DQ model, run by ONNX Runtime
    h = onnx.ModelProto()
    h.CopyFrom(qdq)
    h.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    (_, hidden) = run_ort(h, {"x": x.reshape(-1, 256)})
    np.testing.assert_allclose(ref.reshape(-1, 128), hidden, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_lowering_writes_plugin_nodes_that_round_trip_and_verify(tmp_path):
    """Each W4A8 linear becomes one llmq.W4A8Gemm node that TensorRT's registry lookup takes (the rule check
    finds nothing); its attributes survive saving; expanded back to ONNX from its own inputs it gives the Q/DQ
    model's outputs."""
    from llmq.expand import expand_plugins, expanded_copy

    graph, ctx = _w4a8_mlp()
    qdq = graph.to_model()
    result = LowerW4A8ToPluginPass().run(graph, ctx)
    assert result.stats["lowered"] == 2
    assert check_tensorrt_rules(graph) == []
    path = str(tmp_path / "plugin.onnx")
    onnx.save(graph.to_model(), path)
    loaded = onnx.load(path)
    nodes = [n for n in loaded.graph.node if n.op_type == OP]
    assert len(nodes) == 2 and not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMul") for n in loaded.graph.node)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"group_size": 128, "plugin_namespace": b"llmq", "plugin_version": b"1"}
    assert nodes[0].domain == "llmq" and any(o.domain == "llmq" for o in loaded.opset_import)
    inits = {i.name: i for i in loaded.graph.initializer}
    assert [inits[i].data_type for i in nodes[0].input[1:4]] == [TensorProto.INT8] * 3
    x = np.random.default_rng(4).standard_normal((6, 256)).astype(np.float32)
    checked, files = expanded_copy(path, str(tmp_path), 21)
    assert files and checked != path
    np.testing.assert_allclose(run_ort(onnx.load(checked), {"x": x})[0], run_ort(qdq, {"x": x})[0], rtol=1e-5, atol=1e-5)
    again = Graph.from_model(loaded)
    assert expand_plugins(again) == 2 and not any(n.op == OP for n in again.gs.nodes)


def test_profiles_follow_the_inputs(tiny_llama_kv_onnx, tmp_path):
    """A KV-cache decoder gets rank-4 cache profiles with its own heads and head size, past 0 … 4095, and an opt
    point that is one decode step; the trtexec line carries the same shapes."""
    from llmq.backends.tensorrt import input_profiles, write_trtexec

    facts = write_trtexec(tiny_llama_kv_onnx, str(tmp_path))
    model = onnx.load(tiny_llama_kv_onnx, load_external_data=False)
    key = next(i for i in model.graph.input if i.name.endswith(".key"))
    heads, head_dim = (d.dim_value for d in key.type.tensor_type.shape.dim[1::2])
    low, opt, high = facts["profiles"][key.name]
    assert low == [1, heads, 0, head_dim] and opt == [1, heads, 511, head_dim] and high == [8, heads, 4095, head_dim]
    assert facts["profiles"]["input_ids"] == [[1, 1], [1, 1], [8, 4096]]
    text = open(tmp_path / "trtexec.txt").read()
    assert "--stronglyTyped" in text and f"'{key.name}':1x{heads}x0x{head_dim}" in text
    assert f"'{key.name}':8x{heads}x4095x{head_dim}" in text and "'input_ids':1x1," in text
    assert "--int8" not in text and "--fp16" not in text  # strongly typed: the Q/DQ scales decide
    # without a cache: a 512-token prompt is the opt point; a mask spans past + new tokens
    plain = input_profiles([("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "total"])])
    assert plain["input_ids"] == ((1, 1), (1, 512), (8, 4096)) and plain["attention_mask"] == ((1, 1), (1, 512), (8, 4096))


def _dq_graph(weight: np.ndarray, scale: np.ndarray, zp, attrs: dict, activation: str | None = None) -> Graph:
    """x → MatMul with DQ(weight) (or a Q/DQ pair of ``activation`` type on x)."""
    k, n = weight.shape
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], **attrs), helper.make_node("MatMul", ["x", "wd"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    return Graph.from_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _rules(graph) -> str:
    return " | ".join(p["rule"] for p in check_tensorrt_rules(graph))


def test_rule_check_catches_each_new_rule():
    """A bad graph for every rule the new formats touch: FP8 E5M2, INT4 activations, INT4 without blocks, blocks
    of 32 or not dividing K, an odd INT4 element count, UINT4, and plugin nodes with a wrong namespace, a missing
    attribute or a UINT8 weight input."""
    rng = np.random.default_rng(0)
    ok = _dq_graph(rng.integers(-8, 8, (128, 4)).astype(ml_dtypes.int4), np.ones((1, 4), np.float32),
                   np.zeros((1, 4), ml_dtypes.int4), {"axis": 0, "block_size": 128})
    assert check_tensorrt_rules(ok) == []
    e5m2 = _dq_graph(rng.standard_normal((8, 4)).astype(ml_dtypes.float8_e5m2), np.ones(4, np.float32),
                     np.zeros(4, ml_dtypes.float8_e5m2), {"axis": 1})
    assert "FP8 must be E4M3" in _rules(e5m2)
    assert "FP8 must be E4M3" not in _rules(_dq_graph(rng.standard_normal((8, 4)).astype(ml_dtypes.float8_e4m3fn),
                                                      np.ones(4, np.float32), np.zeros(4, ml_dtypes.float8_e4m3fn), {"axis": 1}))
    per_channel = _dq_graph(rng.integers(-8, 8, (64, 4)).astype(ml_dtypes.int4), np.ones(4, np.float32),
                            np.zeros(4, ml_dtypes.int4), {"axis": 1})
    assert "need block (per-group) scales" in _rules(per_channel)
    small = _dq_graph(rng.integers(-8, 8, (64, 4)).astype(ml_dtypes.int4), np.ones((2, 4), np.float32),
                      np.zeros((2, 4), ml_dtypes.int4), {"axis": 0, "block_size": 32})
    assert "blocks must be 64 or 128" in _rules(small)
    ragged = _dq_graph(rng.integers(-8, 8, (192, 4)).astype(ml_dtypes.int4), np.ones((2, 4), np.float32),
                       np.zeros((2, 4), ml_dtypes.int4), {"axis": 0, "block_size": 128})
    assert "divide K = 192" in _rules(ragged)
    odd = _dq_graph(rng.integers(-8, 8, (3, 1)).astype(ml_dtypes.int4), np.ones((1, 1), np.float32),
                    np.zeros((1, 1), ml_dtypes.int4), {"axis": 0, "block_size": 3})
    assert "even element count" in _rules(odd)
    unsigned = _dq_graph(rng.integers(0, 16, (128, 4)).astype(ml_dtypes.uint4), np.ones((1, 4), np.float32),
                         np.zeros((1, 4), ml_dtypes.uint4), {"axis": 0, "block_size": 128})
    assert "UINT4 is not a TensorRT type" in _rules(unsigned)
    # INT4 activations: a 4-bit Q/DQ on x
    graph = Graph.from_model(mlp_model())
    QuantizeWeightsPass(roles=ALL).run(graph, PassContext())
    lin1 = next(n for n in graph.gs.nodes if n.name == "lin1")
    s = graph.make_constant("s4", np.asarray(0.1, np.float32), "test")
    z = graph.make_constant("z4", np.zeros((), ml_dtypes.int4), "test")
    q = graph.make_node("QuantizeLinear", [lin1.inputs[0], s, z], "x_q4", "test")
    lin1.inputs[0] = graph.make_node("DequantizeLinear", [q, s, z], "x_dq4", "test", out_dtype=np.float32)
    assert "INT4 is weight-only" in _rules(graph)
    # plugin nodes
    plugin_graph, ctx = _w4a8_mlp()
    LowerW4A8ToPluginPass().run(plugin_graph, ctx)
    node = next(n for n in plugin_graph.gs.nodes if n.op == OP)
    node.attrs["plugin_namespace"] = "other"
    assert "plugin_namespace='llmq'" in _rules(plugin_graph)
    node.attrs["plugin_namespace"] = "llmq"
    del node.attrs["group_size"]
    assert "integer attribute group_size" in _rules(plugin_graph)
    node.attrs["group_size"] = 128
    node.inputs[1] = plugin_graph.make_constant("codes_u8", np.asarray(node.inputs[1].values).view(np.uint8), "test")
    assert "input 1 must be INT8" in _rules(plugin_graph)


@pytest.mark.tensorrt
@pytest.mark.skipif(plugin_available() is not None, reason=str(plugin_available()))
def test_plugin_builds_with_tensorrt(tmp_path):
    """Where TensorRT and a GPU are: the plugin registers and an engine builds from a lowered model."""
    from llmq.backends.tensorrt import build_engine

    graph, ctx = _w4a8_mlp()
    LowerW4A8ToPluginPass().run(graph, ctx)
    path = str(tmp_path / "plugin.onnx")
    onnx.save(graph.to_model(), path)
    assert build_engine(path, str(tmp_path / "model.engine"))["bytes"] > 0

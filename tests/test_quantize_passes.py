"""quantize-weights and quantize-activations on tiny hand-built graphs: structure and ORT numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import mlp_model, run_ort

from llmq.backends.qdq import check_tensorrt_rules
from llmq.calib.observers import TensorStats
from llmq.ir import Graph
from llmq.ir.passes import PassContext
from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass

ALL = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "unknown")


def _ops(model: onnx.ModelProto) -> list:
    return [n.op_type for n in model.graph.node]


def _fq(x, scale, lo, hi):
    return np.clip(np.rint(x / scale), lo, hi) * scale


@pytest.mark.parametrize("gemm", [False, True])
def test_weights_structure_and_numerics(gemm):
    model = mlp_model(gemm=gemm)
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0])
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[1])
    graph = Graph.from_model(model)
    ctx = PassContext()
    result = QuantizeWeightsPass(roles=ALL).run(graph, ctx)
    assert result.modified and result.stats["quantized"] == 2
    out = graph.to_model()
    assert _ops(out).count("DequantizeLinear") == 2 and "QuantizeLinear" not in _ops(out)
    int8 = [i for i in out.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == 2
    axes = {n.input[0]: {a.name: a.i for a in n.attribute}.get("axis") for n in out.graph.node if n.op_type == "DequantizeLinear"}
    assert sorted(axes.values()) == ([0, 1] if gemm else [1, 1])
    assert check_tensorrt_rules(graph) == []
    onnx.checker.check_model(out)

    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    (y,) = run_ort(out, {"x": x})
    s1 = np.abs(w1).max(axis=0) / 127
    axis2 = 1 if gemm else 0  # reduce over K
    s2 = np.abs(w2).max(axis=axis2, keepdims=True) / 127
    w1q, w2q = _fq(w1, s1, -127, 127), _fq(w2, s2, -127, 127)
    ref = np.maximum(x @ w1q, 0) @ (w2q.T if gemm else w2q)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the rounding bound: each weight moves by at most half a step
    assert np.all(np.abs(w1q - w1) <= s1 / 2 + 1e-7)

    again = QuantizeWeightsPass(roles=ALL).run(graph, PassContext())
    assert not again.modified


def test_weights_leave_graph_without_linears_alone():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 21)])
    graph = Graph.from_model(model)
    assert not QuantizeWeightsPass(roles=ALL).run(graph, PassContext()).modified


def _provider(batches):
    def provide(graph, names):
        from llmq.calib.collect import collect_stats

        return collect_stats(graph, names, batches)
    return provide


def test_activations_per_tensor_static_numerics():
    model = mlp_model()
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0])
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[1])
    rng = np.random.default_rng(2)
    calib = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(3)]
    graph = Graph.from_model(model)
    graph.gs.inputs[0].dtype = np.float32
    ctx = PassContext(stats_provider=_provider(calib))
    result = QuantizeActivationsPass(roles=ALL).run(graph, ctx)
    assert result.modified and result.stats["quantized_tensors"] == 2
    out = graph.to_model()
    assert _ops(out).count("QuantizeLinear") == 2 and _ops(out).count("DequantizeLinear") == 2
    assert check_tensorrt_rules(graph) == []
    # expected scales: calibrated |x| max and |relu(x W1)| max over all batches, / 127
    xs = np.concatenate(calib)
    s_x = np.abs(xs).max() / 127
    s_r = np.abs(np.maximum(xs @ w1, 0)).max() / 127
    x = rng.standard_normal((6, 16)).astype(np.float32) * 1.5  # also exercises saturation
    (y,) = run_ort(out, {"x": x})
    ref = _fq(np.maximum(_fq(x, s_x, -128, 127) @ w1, 0), s_r, -128, 127) @ w2
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert ctx.layers and all("act_scale" in r for r in ctx.layers.values())


def _two_linears_sharing_input(rng, k: int, n: int) -> Graph:
    """y = x·Wa + x·Wb: two linears reading one tensor (like q/k/v or gate/up)."""
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), w) for w in ("wa", "wb")]
    nodes = [onnx.helper.make_node("MatMul", ["x", "wa"], ["a"], name="la"),
             onnx.helper.make_node("MatMul", ["x", "wb"], ["b"], name="lb"),
             onnx.helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", k])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", n])], inits)
    return Graph.from_model(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]))


def test_activations_share_one_quantize_per_tensor():
    """Two linears reading the same tensor share one Q; each gets its own DQ (ORT fuses only single-consumer DQs)."""
    rng = np.random.default_rng(3)
    graph = _two_linears_sharing_input(rng, 8, 4)
    ctx = PassContext(stats_provider=_provider([rng.standard_normal((3, 8)).astype(np.float32)]))
    QuantizeActivationsPass(roles=ALL).run(graph, ctx)
    ops = _ops(graph.to_model())
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2


def test_exclusion_and_zero_range_are_declined():
    model = mlp_model()
    graph = Graph.from_model(model)
    ctx = PassContext(exclude=lambda name, node: node == "lin2")
    QuantizeWeightsPass(roles=ALL).run(graph, ctx)
    assert [d["reason"] for d in ctx.declined] == ["excluded by --exclude"]
    assert _ops(graph.to_model()).count("DequantizeLinear") == 1

    graph = Graph.from_model(mlp_model())
    zero = TensorStats()
    zero.update(np.zeros((2, 16), np.float32))

    def provide(g, names):
        out = {}
        for n in names:
            s = TensorStats()
            s.update(np.zeros((2, 24), np.float32) if n != "x" else np.ones((2, 16), np.float32))
            out[n] = s
        return out
    ctx = PassContext(stats_provider=provide)
    QuantizeActivationsPass(roles=ALL).run(graph, ctx)
    assert any(d["reason"] == "calibrated activation range is zero" for d in ctx.declined)


def test_options_are_checked():
    from llmq.ir.errors import UsageError

    with pytest.raises(UsageError, match="no option"):
        QuantizeWeightsPass(bitz=8)
    with pytest.raises(UsageError, match="granularity"):
        QuantizeWeightsPass(granularity="per-row")
    with pytest.raises(UsageError, match="observer"):
        QuantizeActivationsPass(observer="magic")


def test_ort_lowering_is_exact_and_fuses_every_linear():
    """lower-int8-matmul gives the same outputs as the Q/DQ graph, with one kernel per linear."""
    from llmq.backends.ort_lowering import LowerToIntegerMatMulPass

    rng = np.random.default_rng(4)
    graph = _two_linears_sharing_input(rng, 16, 8)
    ctx = PassContext(stats_provider=_provider([rng.standard_normal((32, 16)).astype(np.float32)]))
    QuantizeActivationsPass(roles=ALL).run(graph, ctx)
    QuantizeWeightsPass(roles=ALL).run(graph, ctx)
    qdq = graph.to_model()
    result = LowerToIntegerMatMulPass().run(graph, ctx)
    assert result.modified and result.stats["lowered"] == 2
    lowered = graph.to_model()
    ops = _ops(lowered)
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops and ops.count("QuantizeLinear") == 1
    x = rng.standard_normal((64, 16)).astype(np.float32) * 2  # includes saturating values
    from llmq.backends.onnxruntime import make_session

    ref = run_ort(qdq, {"x": x})[0]
    got = make_session(lowered.SerializeToString()).run(None, {"x": x})[0]  # exact without VNNI too (see test_int8_weights)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not LowerToIntegerMatMulPass().run(graph, PassContext()).modified


def test_tensorrt_rules_flag_what_tensorrt_refuses():
    from llmq.passes.qdq_math import add_qdq_pair

    graph = Graph.from_model(mlp_model())
    QuantizeWeightsPass(roles=ALL).run(graph, PassContext())
    assert check_tensorrt_rules(graph) == []
    lin1 = next(n for n in graph.gs.nodes if n.name == "lin1")
    out = lin1.outputs[0]
    consumers = list(out.outputs)
    (dq,) = add_qdq_pair(graph, out, 0.1, "test", "after_lin1")  # a Q/DQ on a weighted op's output
    for c in consumers:
        c.inputs[0] = dq
    rules = [p["rule"] for p in check_tensorrt_rules(graph)]
    assert any("output of weighted op lin1" in r for r in rules), rules
    q = next(n for n in graph.gs.nodes if n.op == "QuantizeLinear")
    q.inputs[2].values = np.asarray(3, np.int8)  # a non-zero zero point
    assert any("zero point must be 0" in p["rule"] for p in check_tensorrt_rules(graph))

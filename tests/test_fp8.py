"""FP8 E4M3 Q/DQ: the numpy reference against ONNX Runtime, and the fp8 weight and activation passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import mlp_model, run_ort
from onnx import TensorProto, helper, numpy_helper

from llmq.backends.qdq import check_tensorrt_rules
from llmq.ir import Graph
from llmq.ir.passes import PassContext
from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass
from llmq.passes.qdq_math import FP8, FP8_MAX, fp8_quantize, quantize_weight_fp8

ALL = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "unknown")


def _e4m3_reference(v: float) -> float:
    """Round ``v`` to E4M3FN by enumerating every finite value of the format (no ml_dtypes): nearest, ties to the
    even mantissa, saturating at ±448."""
    values = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            values.append((m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    grid = np.array(sorted(set(values) | {-x for x in values}))
    v = float(np.clip(v, -FP8_MAX, FP8_MAX))
    d = np.abs(grid - v)
    best = np.flatnonzero(d == d.min())
    if len(best) == 1:
        return float(grid[best[0]])
    # a tie: the candidate whose mantissa code is even
    return float([grid[i] for i in best if round(abs(grid[i]) / _ulp(abs(grid[i]))) % 2 == 0][0])


def _ulp(a: float) -> float:
    return 2.0 ** -9 if a < 2.0 ** -6 else 2.0 ** (np.floor(np.log2(a)) - 3)


def _qdq_model(scale: float, shape=(64,)) -> onnx.ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_fp8_quantize_matches_onnxruntime_and_an_independent_reference():
    """Saturation at ±448, subnormals, and ties to even: numpy (ml_dtypes), ONNX Runtime's QuantizeLinear and a
    reference enumerating the format's values agree."""
    scale = 0.5
    ties = np.array([2.0 * (1 + 1 / 16), 2.0 * (1 + 3 / 16), 2 ** -9 * 1.5, 300.0 + 16.0])  # halfway points
    x = np.concatenate([np.linspace(-600, 600, 41), [1e-4, -3e-3, 1000.0, -1e6], ties * scale,
                        np.random.default_rng(0).standard_normal(15) * 20]).astype(np.float32)
    (y,) = run_ort(_qdq_model(scale, x.shape), {"x": x})
    ours = fp8_quantize(x, scale).astype(np.float32) * scale
    ref = np.array([_e4m3_reference(v / scale) for v in x], np.float32) * scale
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(y, ref)
    assert ours.max() == FP8_MAX * scale and ours.min() == -FP8_MAX * scale  # saturated, not NaN


def test_fp8_weight_quantizer_per_channel():
    w = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)
    qw = quantize_weight_fp8(w, out_axis=1)
    assert qw.q.dtype == FP8 and qw.axis == 1 and qw.scale.shape == (6,)
    np.testing.assert_allclose(qw.scale, np.abs(w).max(axis=0) / FP8_MAX, rtol=1e-7)
    dq = qw.dequantize()
    assert np.abs(dq).max(axis=0) == pytest.approx(np.abs(w).max(axis=0), rel=1e-6)  # the channel max is a code
    # E4M3 keeps 3 mantissa bits: every weight within half an ulp (relative 2^-4) or the subnormal step
    assert np.all(np.abs(dq - w) <= np.maximum(np.abs(w) * 2.0 ** -4, 2.0 ** -10 * qw.scale) + 1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fp8_passes_match_numpy_in_onnxruntime(dtype):
    """FP8 per-channel weights and FP8 per-tensor static activations on a two-linear MLP: ONNX Runtime's output
    equals the numpy formulas; the graph passes the TensorRT rule check."""
    from test_quantize_passes import _provider

    model = mlp_model()
    w1, w2 = (numpy_helper.to_array(i) for i in model.graph.initializer[:2])
    if dtype == np.float16:
        from onnx import numpy_helper as nh
        model = mlp_model()
        for i, init in enumerate(list(model.graph.initializer)):
            model.graph.initializer[i].CopyFrom(nh.from_array(nh.to_array(init).astype(np.float16), init.name))
        for vi in list(model.graph.input) + list(model.graph.output):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        w1, w2 = w1.astype(np.float16).astype(np.float32), w2.astype(np.float16).astype(np.float32)
    rng = np.random.default_rng(2)
    calib = [rng.standard_normal((4, 16)).astype(dtype) for _ in range(3)]
    graph = Graph.from_model(model)
    ctx = PassContext(stats_provider=_provider(calib))
    assert QuantizeActivationsPass(roles=ALL, format="fp8").run(graph, ctx).modified
    assert QuantizeWeightsPass(roles=ALL, format="fp8").run(graph, ctx).modified
    out = graph.to_model()
    onnx.checker.check_model(out)
    fp8 = [i for i in out.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN and len(i.dims) == 2]
    assert len(fp8) == 2
    assert check_tensorrt_rules(graph) == []
    assert {r["act_format"] for r in ctx.layers.values()} == {"fp8e4m3"}

    xs = np.concatenate(calib).astype(np.float32)
    s_x = np.float32(np.abs(xs).max() / FP8_MAX)
    x = rng.standard_normal((6, 16)).astype(np.float32) * 300  # saturates
    (y,) = run_ort(out, {"x": x.astype(dtype)})

    def fq(v, s):
        s = np.float32(np.asarray(s).astype(dtype))
        return fp8_quantize(v.astype(dtype).astype(np.float32), s).astype(np.float32) * s

    q1, q2 = quantize_weight_fp8(w1, 1, scale_dtype=dtype), quantize_weight_fp8(w2, 1, scale_dtype=dtype)
    h = np.maximum(fq(x, s_x) @ q1.dequantize(), 0)
    s_r = np.abs(np.maximum(xs.astype(dtype).astype(np.float32) @ w1, 0)).max() / FP8_MAX
    ref = fq(h, s_r) @ q2.dequantize()
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=tol, atol=tol * np.abs(ref).max())

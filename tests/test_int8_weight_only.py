"""INT8 weight-only linears (``w8a16``, and the linears of ``w8a8`` whose activations the budget keeps float) on the
onnxruntime backend: written as 8-bit ``MatMulNBits`` with the compile's accuracy level, so the artifact's
arithmetic is fixed in the file instead of following the session option with which ONNX Runtime would fuse
``DequantizeLinear → MatMul`` itself (default: INT8 activations)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmq.ir.passes import PassContext


def _session(model: onnx.ModelProto, qdq_level: int):
    from llmq.backends.onnxruntime import make_session

    return make_session(model.SerializeToString(), accuracy_level=qdq_level)


@pytest.mark.parametrize("k,n,dtype,with_zero_point,block", [
    (576, 192, np.int8, False, 32),    # symmetric: no zero-point input (the kernel's default 128)
    (100, 24, np.int8, False, 32),     # K not a whole number of blocks: the last one padded
    (96, 40, np.uint8, True, 16),      # asymmetric uint8
    (130, 8, np.int8, True, 128),      # int8 with zero points, one ragged block of 128
])
def test_packing_is_exact(k, n, dtype, with_zero_point, block):
    """pack_int8_matmulnbits + MatMulNBits (level 0) = x · ((w − z) · s) to fp32 rounding."""
    from llmq.backends.ort_lowering import pack_int8_matmulnbits

    rng = np.random.default_rng(k + n)
    info = np.iinfo(dtype)
    w = rng.integers(info.min, info.max + 1, size=(k, n)).astype(dtype)
    s = rng.uniform(0.001, 0.02, n).astype(np.float32)
    z = rng.integers(-5, 6, n).astype(dtype) if dtype == np.int8 else rng.integers(100, 156, n).astype(dtype)
    z = z if with_zero_point else None
    x = rng.standard_normal((3, k)).astype(np.float32)
    want = x.astype(np.float64) @ ((w.astype(np.float64) - (0 if z is None else z.astype(np.float64))) * s)
    packed, scales, zp = pack_int8_matmulnbits(w, z, s, block)
    assert packed.shape == (n, -(-k // block), block) and scales.shape == (n * -(-k // block),)
    assert (zp is None) == (not with_zero_point and dtype == np.int8)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inits += [numpy_helper.from_array(zp, "Z")] if zp is not None else []
    node = helper.make_node("MatMulNBits", ["x", "B", "S"] + (["Z"] if zp is not None else []), ["y"],
                            domain="com.microsoft", K=k, N=n, bits=8, block_size=block, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    got = _session(model, 0).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_only_linears_are_written_out(family, request):
    """Every INT8 weight-only linear becomes an 8-bit MatMulNBits (q/k/v and gate/up merged on Llama); at level 0
    the logits are the Q/DQ model's (fp32 tolerance), and a deployment session whose QDQ fusion level is 4 (ONNX
    Runtime's default) computes the same: the arithmetic is the file's, not the session's (the Q/DQ file's is the
    session's: it differs between the two). At level 4 the
    activations are quantized per block of 32 by the kernel: close to the Q/DQ logits, not equal."""
    from test_smooth_attention import _ids

    from llmq.backends.ort_lowering import LowerInt8WeightOnlyPass, MergeMatMulNBitsPass
    from llmq.frontends.onnx_loader import load_graph
    from llmq.passes import QuantizeWeightsPass

    ids = _ids()
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    outs = {}
    for level in (0, 4):
        graph = load_graph(path)
        ctx = PassContext()
        QuantizeWeightsPass().run(graph, ctx)
        qdq = graph.to_model()
        dequantized = {p.output[0] for p in qdq.graph.node if p.op_type == "DequantizeLinear"}
        linears = sum(n.op_type == "MatMul" and n.input[1] in dequantized for n in qdq.graph.node)
        lowered = LowerInt8WeightOnlyPass(accuracy_level=level).run(graph, ctx)
        assert lowered.stats["lowered"] == linears > 0
        merged = MergeMatMulNBitsPass().run(graph, ctx).stats
        model = graph.to_model()
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == linears - merged["merged"] + merged["into"]
        assert merged["merged"] == {"llama": 10, "gpt2": 0}[family]
        assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"] == 8 for n in nbits)
        assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
        outs[level] = [_session(model, s).run(None, {"input_ids": ids})[0] for s in (0, 4)]
        np.testing.assert_array_equal(outs[level][0], outs[level][1])  # the session option changes nothing
    want, fused_by_session = (_session(qdq, s).run(None, {"input_ids": ids})[0] for s in (0, 4))
    assert not np.array_equal(want, fused_by_session)  # the Q/DQ file itself: its numbers follow the session's option
    scale = np.abs(want).max()
    np.testing.assert_allclose(outs[0][0], want, rtol=1e-5, atol=1e-5 * scale)
    err = np.abs(outs[4][0] - want).max() / scale
    assert 0 < err < 0.02, err  # measured 0.0035 on both families


def test_quantized_activations_are_left_to_the_integer_lowering():
    """Linears whose activations are Q/DQ are not this pass's: it lowers none of them, and lower-int8-matmul
    makes them integer GEMMs."""
    from test_quantize_passes import ALL, _provider, _two_linears_sharing_input

    from llmq.backends.ort_lowering import LowerInt8WeightOnlyPass, LowerToIntegerMatMulPass
    from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass

    rng = np.random.default_rng(5)
    graph = _two_linears_sharing_input(rng, 64, 32)
    ctx = PassContext(stats_provider=_provider([rng.standard_normal((8, 64)).astype(np.float32)]))
    QuantizeActivationsPass(roles=ALL).run(graph, ctx)
    QuantizeWeightsPass(roles=ALL).run(graph, ctx)
    assert not LowerInt8WeightOnlyPass().run(graph, ctx).modified
    assert LowerToIntegerMatMulPass().run(graph, ctx).stats["lowered"] == 2
    ops = [n.op_type for n in graph.to_model().graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMulNBits" not in ops


@pytest.mark.parametrize("recipe,given,want", [
    ("w8a8", {}, (0, 4)),                                 # INT8 activations: the budget's float linears at level 4
    ("w8a8-dynamic", {}, (0, 4)),
    ("w8a16", {}, (0, 0)),                                # weight-only recipe: float activations
    ("fp8", {}, (0, 0)),                                  # FP8 activations are not INT8
    ("w8a8", {"accuracy_level": 0}, (0, 0)),              # an explicit level applies to every weight-only linear
    ("w8a16", {"accuracy_level": 4}, (4, 4)),
    ("w8a8", {"int8_weight_only_level": 0}, (0, 0)),
])
def test_accuracy_levels_resolved_from_the_recipe(recipe, given, want):
    from llmq.driver import CompileOptions, _plan

    _, _, opts = _plan(recipe, CompileOptions(backend="onnxruntime", **given))
    assert (opts.accuracy_level, opts.int8_weight_only_level) == want


def test_unknown_accuracy_level_is_refused():
    from llmq.driver import CompileOptions, _plan
    from llmq.ir.errors import LlmqError

    with pytest.raises(LlmqError, match="accuracy level 7"):
        _plan("w8a8", CompileOptions(backend="onnxruntime", int8_weight_only_level=7))

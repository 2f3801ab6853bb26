"""The basic quantizers selectable in a recipe: absmax / zero-point, per-tensor / per-channel / per-group
weights (8 and 4 bits), asymmetric activations; ONNX Runtime computes exactly what the numpy reference says."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import mlp_model, run_ort
from test_smooth_quant import _ctx, _logits

from llmq.backends.qdq import check_tensorrt_rules
from llmq.frontends.onnx_loader import load_graph
from llmq.ir import Graph
from llmq.ir.passes import PassContext, PassManager
from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass
from llmq.passes.qdq_math import block_size_for, quantize_weight
from llmq.passes.select import ALL_ROLES
from test_smooth_attention import _ids


def test_block_size_divides_k():
    assert block_size_for(576, 128) == 64  # SmolLM2's hidden size: 4.5 × 128
    assert block_size_for(1536, 128) == 128
    assert block_size_for(576, 32) == 32 and block_size_for(100, 128) == 4 and block_size_for(7, 64) == 1


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_grid_values_round_trip_exactly(symmetric, bits):
    """Values already on a quantizer's grid come back bit-exact (and the format is what it says)."""
    rng = np.random.default_rng(0)
    levels = 2 ** bits - 1
    q = rng.integers(0, levels + 1, (64, 12)) if not symmetric else rng.integers(-(levels // 2), levels // 2 + 1, (64, 12))
    q[0], q[1] = (0, levels) if not symmetric else (-(levels // 2), levels // 2)  # every column spans its range
    zp = 0 if symmetric else 3
    scale = rng.uniform(0.01, 0.1, 12).astype(np.float32)
    w = ((q - zp) * scale).astype(np.float32)
    qw = quantize_weight(w, 1, bits, "per-channel", symmetric=symmetric)
    np.testing.assert_allclose(qw.dequantize(), w, rtol=1e-6, atol=1e-7)
    assert qw.q.dtype.name == ("int" if symmetric else "uint") + str(bits)


@pytest.mark.parametrize("granularity,bits,symmetric", [("per-tensor", 8, True), ("per-channel", 8, False),
                                                        ("per-group", 8, True), ("per-group", 4, True),
                                                        ("per-group", 4, False), ("per-channel", 4, True)])
@pytest.mark.parametrize("gemm", [False, True])
def test_onnxruntime_computes_the_reference(granularity, bits, symmetric, gemm):
    model = mlp_model(k=96, n=48, m=40, gemm=gemm)
    graph = Graph.from_model(model)
    ctx = PassContext()
    lin2_w = onnx.numpy_helper.to_array(model.graph.initializer[1])
    records = PassManager([QuantizeWeightsPass(bits=bits, granularity=granularity, group_size=32,
                                               symmetric=symmetric, roles=ALL_ROLES)], verify=True).run(graph, ctx)
    assert records[0]["stats"]["quantized"] == 2
    out = graph.to_model()
    kinds = {i.data_type for i in out.graph.initializer if "weight_" in i.name and "scale" not in i.name}
    want = {(8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
            (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4}[(bits, symmetric)]
    assert want in kinds
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    qw1 = quantize_weight(onnx.numpy_helper.to_array(model.graph.initializer[0]), 1, bits, granularity, 32, symmetric)
    qw2 = quantize_weight(lin2_w, 0 if gemm else 1, bits, granularity, 32, symmetric)
    h = np.maximum(x @ qw1.dequantize(), 0)
    ref = h @ (qw2.dequantize().T if gemm else qw2.dequantize())
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    rules = {p["rule"].split(";")[0].split(",")[0] for p in check_tensorrt_rules(graph)}
    # zero points are ONNX Runtime only; TensorRT's INT4 takes blocks of 64 or 128 (here 32) and none per channel
    want = set()
    if not symmetric:
        want |= {"zero point must be 0 (symmetric only)"} | ({"UINT4 is not a TensorRT type (INT4 weights are signed"}
                                                            if bits == 4 else {"UINT8 quantization is only allowed at network inputs/outputs"})
    if bits == 4:
        want |= {"INT4 blocks must be 64 or 128 and divide K" if granularity == "per-group"
                 else "INT4 weights need block (per-group) scales in TensorRT"}
    assert {r.split(" = ")[0] for r in rules} == want


def test_per_group_reports_a_reduced_block(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)  # hidden 64, intermediate 160 = 5 × 32
    ctx = _ctx()
    records = PassManager([QuantizeWeightsPass(bits=4, granularity="per-group", group_size=64)]).run(graph, ctx)
    down = ctx.layers["layers.0.mlp.down"]
    assert down["weight_block_size"] == 32 and "does not divide K = 160" in down["weight_block_note"]
    assert ctx.layers["layers.0.attn.q"]["weight_block_size"] == 64
    assert records[0]["stats"]["blocks_reduced"] == 2
    ref, got = _logits(tiny_llama_onnx, _ids()), _logits(graph.to_model(), _ids())
    assert 0 < np.abs(got - ref).max() < 0.2 * np.abs(ref).max()  # 4-bit g64 on random weights: close, not equal


def test_asymmetric_activations(tiny_llama_onnx):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    PassManager([QuantizeActivationsPass(symmetric=False)], verify=True).run(graph, ctx)
    zps = [n.inputs[2] for n in graph.gs.nodes if n.op == "QuantizeLinear"]
    assert zps and all(np.asarray(z.values).dtype == np.uint8 for z in zps)
    assert any(int(np.asarray(z.values)) != 128 for z in zps)  # the RMSNorm outputs are not centred
    assert any("UINT8" in p["rule"] for p in check_tensorrt_rules(graph))
    ref, got = _logits(tiny_llama_onnx, _ids()), _logits(graph.to_model(), _ids())
    assert 0 < np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(Exception, match="minmax"):
        QuantizeActivationsPass(symmetric=False, observer="percentile")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_search_fake_quant_is_the_quantizer(symmetric, bits):
    """The float-only fake quant the AWQ searches use gives exactly what quantize-weights will store."""
    from llmq.passes.qdq_math import fake_quant_blocks

    w = np.random.default_rng(bits).standard_normal((192, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel
    np.testing.assert_array_equal(fake_quant_blocks(w, bits, 64, symmetric),
                                  quantize_weight(w, 1, bits, "per-group", 64, symmetric).dequantize())

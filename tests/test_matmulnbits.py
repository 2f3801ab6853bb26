"""MatMulNBits lowering: the packing round-trips exactly, and ONNX Runtime (optimizations on and off) gives the
portable INT4 Q/DQ model's logits."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from test_smooth_attention import _ids
from test_smooth_quant import _ctx

from llmq.backends.ort_lowering import LowerBlockInt4ToMatMulNBitsPass, MergeMatMulNBitsPass, pack_matmulnbits, unpack_matmulnbits
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassManager
from llmq.passes import QuantizeWeightsPass


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("k,n,block", [(64, 24, 16), (576, 8, 64), (160, 5, 32), (96, 3, 32)])
def test_packing_round_trips(signed, k, n, block):
    rng = np.random.default_rng(k + n)
    q = rng.integers(-8, 8, (k, n)) if signed else rng.integers(0, 16, (k, n))
    zp = None if signed else rng.integers(0, 16, (k // block, n)).astype(np.uint8)
    packed, zp_packed = pack_matmulnbits(q.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4),
                                         None if signed else zp.astype(ml_dtypes.uint4), block, signed)
    assert packed.shape == (n, k // block, block // 2) and packed.dtype == np.uint8
    u, z = unpack_matmulnbits(packed, zp_packed, k, n, block)
    np.testing.assert_array_equal(u.astype(np.int16) - (8 if signed else 0), q)
    np.testing.assert_array_equal(z, np.full((k // block, n), 8) if signed else zp)
    if not signed:
        assert zp_packed.shape == (n * ((k // block + 1) // 2),)


def _session(model, optimize):
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("symmetric", [True, False])
def test_lowered_model_matches_the_qdq_model(tiny_llama_onnx, symmetric):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    PassManager([QuantizeWeightsPass(bits=4, granularity="per-group", group_size=32, symmetric=symmetric)]).run(graph, ctx)
    qdq = graph.to_model()
    records = PassManager([LowerBlockInt4ToMatMulNBitsPass()], verify=True).run(graph, ctx)
    assert records[0]["stats"]["lowered"] == 14  # every decoder linear (the LM head stays float)
    lowered = graph.to_model()
    assert sum(n.op_type == "MatMulNBits" for n in lowered.graph.node) == 14
    assert not any(n.op_type == "DequantizeLinear" for n in lowered.graph.node)
    # q/k/v and gate/up read one tensor each: merged into one wider MatMulNBits and a Split per layer
    records = PassManager([MergeMatMulNBitsPass()], verify=True).run(graph, ctx)
    assert records[0]["stats"] == {"merged": 10, "into": 4}
    merged = graph.to_model()
    assert sum(n.op_type == "MatMulNBits" for n in merged.graph.node) == 8
    assert sum(n.op_type == "Split" for n in merged.graph.node) == 4
    ids = _ids()
    ref = _session(qdq, optimize=False).run(None, {"input_ids": ids})[0]
    for model in (lowered, merged):
        for optimize in (False, True):
            got = _session(model, optimize).run(None, {"input_ids": ids})[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

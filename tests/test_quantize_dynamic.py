"""quantize-activations-dynamic: per-token INT8 × per-channel INT8 through MatMulInteger, checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import mlp_model

from llmq.backends.qdq import check_tensorrt_rules
from llmq.ir import Graph
from llmq.ir.passes import PassContext
from llmq.passes import QuantizeActivationsPerTokenPass

ALL = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "unknown")


def _fq_w(w):
    s = np.abs(w).max(axis=0) / 127
    return np.clip(np.rint(w / s), -127, 127) * s


def _fq_tok(x):
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-8) / 127
    return np.clip(np.rint(x / s), -127, 127) * s


def test_per_token_numerics_and_structure():
    from llmq.backends.onnxruntime import make_session

    model = mlp_model()
    w1, w2 = (onnx.numpy_helper.to_array(i) for i in model.graph.initializer)
    graph = Graph.from_model(model)
    ctx = PassContext()
    result = QuantizeActivationsPerTokenPass(roles=ALL).run(graph, ctx)
    assert result.modified and result.stats == {"quantized": 2, "token_quantizers": 2}
    out = graph.to_model()
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    assert any("MatMulInteger" in p["rule"] for p in check_tensorrt_rules(graph))  # ONNX Runtime only
    x = np.random.default_rng(5).standard_normal((7, 16)).astype(np.float32)
    x[3] *= 50  # one loud token must not spoil the others' scales
    # llmq's session options: exact u8 × s8 GEMMs on x86 CPUs without VNNI too (see test_int8_weights)
    (y,) = make_session(out.SerializeToString()).run(None, {"x": x})
    ref = _fq_tok(np.maximum(_fq_tok(x) @ _fq_w(w1), 0)) @ _fq_w(w2)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert all(r["act_granularity"] == "per-token dynamic" for r in ctx.layers.values())

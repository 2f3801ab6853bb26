"""GPTQ: lower layer-output error than RTN (on a layer with planted outlier channels and across the tiny
model), static groups under act-order stay contiguous blocks, and ONNX Runtime runs the result."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_VOCAB
from test_smooth_attention import _ids

from llmq.calib.collect import collect_stats, run_with_outputs
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassContext, PassManager
from llmq.passes import GPTQPass, QuantizeWeightsPass
from llmq.passes.gptq import gptq_quantize
from llmq.passes.qdq_math import quantize_weight


def _ctx(batches: int = 4, seq: int = 64):
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (batches, 1, seq), dtype=np.int64)

    def sample(graph, names):
        out = {}
        run_with_outputs(graph, names, [ids[0]], lambda n, v: out.__setitem__(n, v[0]))
        return out
    return PassContext(stats_provider=lambda g, names: collect_stats(g, names, list(ids)), sample_provider=sample,
                       stream_provider=lambda g, names, each: run_with_outputs(g, names, list(ids), each))


def _layer_problem(seed=0, k=128, n=32, t=2048):
    """Correlated inputs with a few large channels: where error feedback through H⁻¹ pays."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((t, k // 4))
    x = base @ rng.standard_normal((k // 4, k)) + 0.1 * rng.standard_normal((t, k))
    x[:, [3, 50]] *= 20.0
    w = rng.standard_normal((k, n)) * 0.1
    return x.astype(np.float32), w.astype(np.float32)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_one_layer(act_order, symmetric):
    x, w = _layer_problem()
    h = 2.0 / len(x) * (x.astype(np.float64).T @ x)
    qw = gptq_quantize(w, h, 4, 32, symmetric, act_order=act_order)
    rtn = quantize_weight(w, 1, 4, "per-group", 32, symmetric).dequantize()
    ref = x @ w
    err_gptq = np.sum((ref - x @ qw.dequantize()) ** 2)
    err_rtn = np.sum((ref - x @ rtn) ** 2)
    assert err_gptq < 0.7 * err_rtn
    # groups are contiguous blocks along K: one scale per (block, output channel)
    assert qw.block_size == 32 and qw.scale.shape == (4, 32) and qw.axis == 0
    assert qw.q.dtype.name == ("int4" if symmetric else "uint4")


def test_gptq_pass_on_the_model(planted):
    graph = load_graph(planted)
    ctx = _ctx(16, 128)  # 2048 tokens: a Hessian of 64-160 channels from fewer overfits the calibration set
    records = PassManager([GPTQPass(group_size=32)], verify=True).run(graph, ctx)
    assert records[0]["stats"]["quantized"] == 14 and records[0]["stats"]["median_err_ratio_vs_rtn"] < 1.0
    rows = {k: v for k, v in ctx.layers.items() if "weight_out_err_gptq" in v}
    assert len(rows) == 14
    assert sum(r["weight_out_err_gptq"] < r["weight_out_err_rtn"] for r in rows.values()) >= 12
    # out of sample (other token ids than the calibration's), every layer's output error is below RTN's
    rtn = load_graph(planted)
    PassManager([QuantizeWeightsPass(bits=4, granularity="per-group", group_size=32)]).run(rtn, _ctx())
    for name, e_gptq, e_rtn in _heldout_errors(planted, graph, rtn):
        assert e_gptq < e_rtn, name


def _heldout_errors(path, *quantized):
    """(linear, relative output error per quantized graph) on held-out ids, weights read through their DQ."""
    from llmq.ir import Graph, discover
    from llmq.ir.structure import weight_matrix

    float_graph = load_graph(path)
    linears = [lin for lin in discover(float_graph).linears if lin.role != "lm_head"]
    acts = {}
    run_with_outputs(float_graph, sorted({lin.act.name for lin in linears}), [_ids()], acts.__setitem__)
    out = []
    for lin in linears:
        x = acts[lin.act.name].reshape(-1, lin.in_features)
        ref = x @ weight_matrix(lin)
        errs = []
        for g in quantized:
            node = g.node_by_name()[lin.node.name]
            w = Graph.materialize(g.constant_through(node.inputs[1]))
            errs.append(float(np.sum((ref - x @ w) ** 2) / np.sum(ref ** 2)))
        out.append((lin.name, *errs))
    return out


def test_heldout_error_is_the_output_error():
    """The held-out measure the two-fold check uses is the output error on the held-out inputs (times 2), and
    on inputs the fitting half describes well it ranks GPTQ before RTN."""
    from llmq.passes.qdq_math import output_error

    def heldout_error(w_kn, q_kn, h):  # what the held-out check computes: tr(ΔᵀHΔ)
        return output_error(h, w_kn - q_kn)

    x, w = _layer_problem(t=512)
    h = lambda a: 2.0 / len(a) * (a.astype(np.float64).T @ a)  # noqa: E731
    good_even, good_odd = h(x[::2]), h(x[1::2])
    q = gptq_quantize(w, good_even, 4, 32)
    rtn = quantize_weight(w, 1, 4, "per-group", 32, True).dequantize()
    assert heldout_error(w, q.dequantize(), good_odd) < heldout_error(w, rtn, good_odd)
    # exact identity: tr(ΔᵀHΔ) is the mean squared output error times 2
    d = w - rtn
    assert heldout_error(w, rtn, good_odd) == pytest.approx(2.0 * np.sum((x[1::2] @ d) ** 2) / len(x[1::2]), rel=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_fp8_beats_rtn_and_stays_on_the_fp8_grid(act_order):
    """format fp8: E4M3 codes with the per-channel scale RTN-FP8 uses (max|W| / 448), lower output error."""
    from llmq.passes.qdq_math import FP8, quantize_weight_fp8

    x, w = _layer_problem(1)
    h = 2.0 / len(x) * (x.astype(np.float64).T @ x)
    qw = gptq_quantize(w, h, 8, act_order=act_order, fmt="fp8")
    rtn = quantize_weight_fp8(w, 1)
    assert qw.q.dtype == FP8 and qw.q.shape == w.shape and qw.axis == 1 and qw.block_size == 0
    np.testing.assert_array_equal(qw.scale, rtn.scale)
    assert np.all(np.abs(qw.q.astype(np.float32)) <= 448)
    ref = x @ w
    err_gptq = np.sum((ref - x @ qw.dequantize()) ** 2)
    err_rtn = np.sum((ref - x @ rtn.dequantize()) ** 2)
    assert err_gptq < 0.7 * err_rtn


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gptq_fp8_pass_runs_in_onnxruntime(family, request):
    """The pass writes FP8 E4M3 DequantizeLinear weights per output channel that ONNX Runtime reads as numpy
    dequantizes them (q · s, exactly), on Llama's and GPT-2's layouts; the logits stay near the float model's."""
    import onnx
    from conftest import run_ort
    from onnx import numpy_helper
    from test_smooth_quant import _logits

    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph = load_graph(path)
    ctx = _ctx()
    records = PassManager([GPTQPass(bits=8, format="fp8")], verify=True).run(graph, ctx)
    assert records[0]["stats"]["format"] == "fp8e4m3" and records[0]["stats"]["quantized"] > 0
    rows = [r for r in ctx.layers.values() if r.get("weight_format") == "fp8e4m3"]
    assert len(rows) == records[0]["stats"]["quantized"]
    assert all(r["weight_granularity"] == "per-channel" for r in rows)
    model = graph.to_model()
    inits = {i.name: i for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
           and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(dqs) == len(rows)
    for dq in dqs[:3]:
        probe = onnx.helper.make_model(onnx.helper.make_graph(
            [dq], "g", [], [onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)],
            [inits[n] for n in dq.input]), opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
        (got,) = run_ort(probe, {})
        q, s = (numpy_helper.to_array(inits[n]) for n in dq.input[:2])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        np.testing.assert_array_equal(got, q.astype(np.float32) * np.expand_dims(s, 1 - axis))
    ref, out = _logits(path, _ids()), _logits(model, _ids())
    assert np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2)) < 0.05

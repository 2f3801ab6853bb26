"""INT8 weight storage of the integer MatMuls: int8 (u8 × s8, ONNX Runtime's fast GEMM) by default, uint8 + 128
(u8 × u8) with ``--int8-weights unsigned``; exact either way through llmq's sessions, which ask ONNX Runtime for
exact GEMMs only on the CPUs that need it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_quantize_passes import ALL, _provider, _two_linears_sharing_input

from llmq.ir.passes import PassContext
from llmq.ir.precision import int8_dot_saturates


@pytest.mark.parametrize("machine,flags,saturates", [
    ("x86_64", "fpu sse2 avx avx2 fma", True),                          # AVX2 only
    ("x86_64", "fpu avx2 avx512f avx512bw", True),                      # AVX-512 without VNNI
    ("x86_64", "fpu avx2 avx512f avx512bw avx512_vnni", False),
    ("x86_64", "fpu avx2 avx_vnni", False),                             # VEX VNNI (Alder Lake and later)
    ("x86_64", None, True),                                             # flags unreadable: the exact choice
    ("aarch64", "fp asimd asimddp", False),                             # ARM's dot products are exact
])
def test_int8_dot_saturates_reads_the_cpu(tmp_path, monkeypatch, machine, flags, saturates):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    assert int8_dot_saturates.__wrapped__(str(cpuinfo)) is saturates


def _full_range_layer():
    """Two 576 → 256 linears with INT8 weights at full range and activations that saturate at +127: pairs of
    u8 × s8 products reach 2 · 255 · 127, past the 16-bit sums ONNX Runtime's u8 × s8 kernel keeps without VNNI."""
    from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass

    rng = np.random.default_rng(11)
    graph = _two_linears_sharing_input(rng, 576, 256)
    for name in ("wa", "wb"):  # mostly large positive weights: every column's codes near +127
        w = graph.gs.tensors()[name]
        w.values = (np.abs(w.values) + 3).astype(np.float32)
    ctx = PassContext(stats_provider=_provider([rng.standard_normal((32, 576)).astype(np.float32)]))
    QuantizeActivationsPass(roles=ALL).run(graph, ctx)
    QuantizeWeightsPass(roles=ALL).run(graph, ctx)
    return graph, ctx


def _integer_reference(qdq: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The Q/DQ model's arithmetic in integers: (Σ q_a · q_w) · s_a · s_w per linear, summed."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear")
    s_a = float(inits[q.input[1]])
    codes = np.clip(np.rint(x / s_a), -128, 127).astype(np.int64)
    y = 0
    for dq in (n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits):
        w, s_w = inits[dq.input[0]].astype(np.int64), inits[dq.input[1]].astype(np.float64)
        assert np.abs(w).max() == 127
        y = y + (codes @ w) * s_a * s_w
    return y


@pytest.mark.parametrize("storage", ["signed", "unsigned"])
def test_full_range_int8_weights_are_exact(storage):
    """Both storages give the Q/DQ model's integer arithmetic through llmq's sessions on this CPU, VNNI or not
    (without VNNI the signed one needs the session option llmq sets there); the unsigned one also through a
    session with ONNX Runtime's default options, on any CPU."""
    import onnxruntime as ort

    from llmq.backends.onnxruntime import make_session
    from llmq.backends.ort_lowering import LowerToIntegerMatMulPass, UnsignedInt8WeightsPass

    graph, ctx = _full_range_layer()
    qdq = graph.to_model()
    assert LowerToIntegerMatMulPass().run(graph, ctx).stats["lowered"] == 2
    if storage == "unsigned":
        assert UnsignedInt8WeightsPass().run(graph, ctx).stats["weights"] == 2
    model = graph.to_model()
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(gemms) == 2
    for n in gemms:
        w = inits[n.input[1]]
        if storage == "signed":
            assert w.dtype == np.int8 and (len(n.input) < 6 or not n.input[5])  # no weight zero point
        else:
            assert w.dtype == np.uint8 and np.all(inits[n.input[5]] == 128)
    x = np.random.default_rng(12).standard_normal((64, 576)).astype(np.float32) + 4  # codes pinned at +127
    want = _integer_reference(qdq, x)
    got = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if storage == "unsigned":
        plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(plain.run(None, {"x": x})[0], want, rtol=1e-5)
    if storage == "unsigned":  # uint8 weights are left alone: the pass is idempotent
        assert not UnsignedInt8WeightsPass().run(graph, PassContext()).modified


def test_unsigned_storage_of_the_exact_w4a8_and_dynamic_kernels(tiny_llama_onnx):
    """``--int8-weights unsigned`` on the exact W4A8 kernel and on per-token dynamic INT8: every integer GEMM's
    weight becomes uint8 + 128 with zero point 128 and the logits stay the same integers' (fp32 tolerance)."""
    from test_smooth_attention import _ids

    from llmq.backends.onnxruntime import make_session
    from llmq.backends.ort_lowering import LowerProgressiveW4A8Pass, UnsignedInt8WeightsPass
    from llmq.frontends.onnx_loader import load_graph
    from llmq.ir.passes import PassManager
    from llmq.passes import QuantizeActivationsPass, QuantizeActivationsPerTokenPass, QuantizeWeightsProgressivePass

    ids = _ids()
    for recipe in ([QuantizeWeightsProgressivePass(group_size=32), QuantizeActivationsPass(granularity="per-token"),
                    LowerProgressiveW4A8Pass(kernel="int8")], [QuantizeActivationsPerTokenPass()]):
        graph = load_graph(tiny_llama_onnx)
        ctx = PassContext()
        PassManager(recipe).run(graph, ctx)
        signed = graph.to_model()
        assert UnsignedInt8WeightsPass().run(graph, ctx).stats["weights"] >= 8, ctx.declined[-3:]
        unsigned = graph.to_model()
        inits = {t.name: t for t in unsigned.graph.initializer}
        gemms = [n for n in unsigned.graph.node if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")]
        assert gemms and all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in gemms)
        a, b = (make_session(m.SerializeToString()).run(None, {"input_ids": ids})[0] for m in (signed, unsigned))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("kernel", ["w4a8-int8", "w8a8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_integer_gemms_give_the_same_logits(kernel, family, request):
    """merge-integer-matmul: q/k/v and gate/up that read the same codes become one MatMulIntegerToFloat and a
    Split (the W4A8 kernel's per-token Mul applied once, before the split); the logits are the unmerged ones
    (fp32 tolerance), on Llama (separate q/k/v) and GPT-2 (one fused qkv: nothing to merge in attention)."""
    from test_smooth_attention import _ids

    from llmq.backends.onnxruntime import make_session
    from llmq.backends.ort_lowering import LowerProgressiveW4A8Pass, LowerToIntegerMatMulPass, MergeIntegerMatMulPass
    from llmq.frontends.onnx_loader import load_graph
    from llmq.ir.passes import PassManager
    from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass, QuantizeWeightsProgressivePass

    graph = load_graph(request.getfixturevalue(f"tiny_{family}_onnx"))
    if kernel == "w8a8":
        ctx = PassContext(stats_provider=_provider([_ids(), _ids()[:, ::-1].copy()]))
        PassManager([QuantizeActivationsPass(), QuantizeWeightsPass(), LowerToIntegerMatMulPass()]).run(graph, ctx)
    else:
        ctx = PassContext()
        PassManager([QuantizeWeightsProgressivePass(group_size=32), QuantizeActivationsPass(granularity="per-token"),
                     LowerProgressiveW4A8Pass(kernel="int8")]).run(graph, ctx)
    before = graph.to_model()
    result = MergeIntegerMatMulPass().run(graph, ctx)
    after = graph.to_model()
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    layers = 2
    merged = {"llama": 5 * layers, "gpt2": 0}[family]  # q/k/v and gate/up: 5 linears into 2 per layer
    assert result.stats["merged"] == merged and result.stats["into"] == (2 * layers if merged else 0)
    assert count(after, "MatMulIntegerToFloat") == count(before, "MatMulIntegerToFloat") - merged + result.stats["into"]
    if kernel == "w4a8-int8" and merged:  # one per-token Mul per merged GEMM
        assert count(after, "Mul") == count(before, "Mul") - merged + result.stats["into"]
    ids = _ids()
    a, b = (make_session(m.SerializeToString()).run(None, {"input_ids": ids})[0] for m in (before, after))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())

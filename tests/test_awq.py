"""AWQ: exact rewrite before quantization, and a lower layer-output error than RTN where outlier input
channels are planted (the function of the model unchanged, its activations not)."""

from __future__ import annotations

import numpy as np
from test_smooth_attention import _assert_same, _ids
from test_smooth_quant import _ctx, _logits

from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassManager
from llmq.passes import ActivationAwareScalesPass, QuantizeWeightsPass
from llmq.passes.awq import clip_search, weight_fake_quant

def test_scales_alone_are_exact(planted):
    graph = load_graph(planted)
    PassManager([ActivationAwareScalesPass(group_size=32, clip=False)], verify=True).run(graph, _ctx())
    _assert_same(planted, graph)


def test_awq_beats_rtn_on_planted_outliers(planted):
    graph = load_graph(planted)
    ctx = _ctx()
    PassManager([ActivationAwareScalesPass(group_size=32), QuantizeWeightsPass(bits=4, granularity="per-group",
                                                                               group_size=32)], verify=True).run(graph, ctx)
    qkv = {r: ctx.layers[f"layers.0.attn.{r}"] for r in ("q", "k", "v")}
    for r, row in qkv.items():
        assert row["weight_out_err_awq"] < 0.5 * row["weight_out_err_rtn"], (r, row)
        assert row["awq_ratio"] > 0  # it did scale
    rows = [v for v in ctx.layers.values() if "weight_out_err_awq" in v]
    assert np.mean([r["weight_out_err_awq"] for r in rows]) < np.mean([r["weight_out_err_rtn"] for r in rows])
    # and the model's logits move less than with RTN alone
    rtn = load_graph(planted)
    PassManager([QuantizeWeightsPass(bits=4, granularity="per-group", group_size=32)]).run(rtn, _ctx())
    ref = _logits(planted, _ids())
    err_awq = np.abs(_logits(graph.to_model(), _ids()) - ref).mean()
    err_rtn = np.abs(_logits(rtn.to_model(), _ids()) - ref).mean()
    assert err_awq < err_rtn


def test_clip_search_never_increases_a_group_error():
    """Per (input group, output channel) the chosen clip is at least as good as no clip (ratio 1.0 is a
    candidate), and the planted large weight gets clipped."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    w[5, 3] = 12.0  # one large weight stretches its group's range
    clipped = clip_search(x.T.astype(np.float64) @ x / len(x), w, 4, 32, True)
    assert np.abs(clipped).max() < 12.0
    for g in range(2):
        xs, rows = x[:, 32 * g:32 * (g + 1)], slice(32 * g, 32 * (g + 1))
        ref = xs @ w[rows]
        err_rtn = np.mean((xs @ weight_fake_quant(w[rows], 4, 32, True) - ref) ** 2, axis=0)
        err_clip = np.mean((xs @ weight_fake_quant(clipped[rows], 4, 32, True) - ref) ** 2, axis=0)
        assert np.all(err_clip <= err_rtn * (1 + 1e-6))
        assert np.any(err_clip < err_rtn)


def test_gram_error_is_the_output_error():
    """AWQ scores candidates from the streamed Gram matrix: it must equal the token-by-token output error."""
    from llmq.passes.qdq_math import output_error

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 48)) * np.where(np.arange(48) == 7, 40.0, 1.0)  # one massive channel
    delta = rng.standard_normal((48, 10)) * 1e-2
    gram = x.T @ x / len(x)
    direct = np.sum((x @ delta) ** 2, axis=0) / len(x)
    assert np.allclose(output_error(gram, delta, axis=0), direct, rtol=1e-10)
    assert np.isclose(output_error(gram, delta), direct.sum(), rtol=1e-10)


def test_sampled_search_scores_estimate_the_whole_error():
    """Above the cost budget the scale search scores a seeded sample of output channels, scaled up: the
    estimate is close to the whole group's error, the whole group is used below the budget, and the sampled
    search picks a scale whose whole error is close to the best's."""
    from llmq.passes.awq import SEARCH_BUDGET, _column_sample, search_columns
    from llmq.passes.qdq_math import output_error

    assert search_columns(576, -1) >= 3072 and search_columns(14336, -1) == 512  # SmolLM2 whole; 8B sampled
    assert search_columns(4096, 0) == 0 and search_columns(4096, 64) == 64
    assert 576 * 576 * 3072 <= SEARCH_BUDGET

    rng = np.random.default_rng(3)
    k = 256
    x = rng.standard_normal((2048, k)) * np.where(np.arange(k) % 37 == 0, 20.0, 1.0)  # outlier channels
    gram = (x.T @ x / len(x)).astype(np.float32)
    weights = [rng.standard_normal((k, n)).astype(np.float32) for n in (1024, 256, 256)]  # q, k, v
    mean_abs = np.abs(x).mean(axis=0)
    whole = _column_sample(weights, 0)
    assert all(f == 1.0 and w is orig and c is None for (w, f, c), orig in zip(whole, weights))
    scored = _column_sample(weights, 256)
    assert abs(sum(w.shape[1] for w, _, _ in scored) - 256) <= len(weights)  # proportional, rounded
    assert all(np.array_equal(w, orig[:, c]) for (w, _, c), orig in zip(scored, weights))
    assert _column_sample(weights, 256)[0][0].tobytes() == scored[0][0].tobytes()  # seeded

    def errors(pairs):
        out = []
        for r in np.arange(20) / 20:
            s = np.power(mean_abs, r)
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            out.append(sum(f * output_error(gram, w - weight_fake_quant(w * s[:, None], 4, 128, True) / s[:, None])
                           for w, f, _ in pairs))
        return np.array(out)

    from llmq.passes.awq import _error_by_columns, _ScaledGram

    quant = lambda w: weight_fake_quant(w, 4, 128, True)  # noqa: E731
    w = weights[0]
    whole_error = float(output_error(gram, w - quant(w)))
    by_chunks = _error_by_columns(gram, w.shape[1], lambda c: w[:, c] - quant(w[:, c]), chunk=100)
    assert np.isclose(by_chunks, whole_error, rtol=1e-9)  # chunks: exact
    s = np.linspace(0.5, 2.0, k).astype(np.float32)
    assert np.array_equal(_ScaledGram(gram, s)[10:20, 10:20], (gram / np.outer(s, s))[10:20, 10:20])

    full, sampled = errors(whole), errors(scored)
    np.testing.assert_allclose(sampled, full, rtol=0.05)  # a 256-of-1536 sample estimates each candidate
    assert full[np.argmin(sampled)] <= full.min() * 1.02  # and picks a candidate as good within 2 %
    assert full.min() < full[0] * 0.9  # the outliers make the choice matter


def test_wide_gram_streams_in_float32_to_the_same_matrix():
    """Above 4096 channels the streamed Gram matrix sums in float32 (half the memory, finished in place) and
    only its upper blocks (half the work): it is the float64 sum's matrix to float32 precision, symmetric."""
    from llmq.passes.awq import _Inputs

    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((64, 4100)).astype(np.float32) * (1 + 10 * (np.arange(4100) == 3)) for _ in range(6)]
    acc = _Inputs(4100)
    assert acc.gram.dtype == np.float32
    for b in batches:
        acc.update(b)
    acc.finish()
    x = np.concatenate(batches).astype(np.float64)
    exact = x.T @ x / len(x)
    assert acc.gram.dtype == np.float32 and acc.n == 384
    np.testing.assert_allclose(acc.gram, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
    assert np.array_equal(acc.gram, acc.gram.T)  # summed on and above the diagonal, mirrored below
    assert np.allclose(acc.abs_max, np.abs(x).max(axis=0))


def test_sampled_search_runs_through_the_pass(planted):
    """Forced to sample (``search_columns``), the pass still folds exactly, records how many channels its
    reported errors were taken on, and still beats RTN on the planted outliers."""
    graph = load_graph(planted)
    ctx = _ctx()
    PassManager([ActivationAwareScalesPass(group_size=32, clip=False, search_columns=16)], verify=True).run(graph, ctx)
    _assert_same(planted, graph)
    rows = [v for v in ctx.layers.values() if "weight_out_err_awq" in v]
    assert rows and all(0 < r["weight_out_err_channels"] <= 16 for r in rows)
    assert np.mean([r["weight_out_err_awq"] for r in rows]) < np.mean([r["weight_out_err_rtn"] for r in rows])

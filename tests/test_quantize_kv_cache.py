"""quantize-kv-cache: Q/DQ on the keys and values entering attention, per tensor (TensorRT-deployable) or per
head (INT8/INT4), with GQA heads sharing a scale; bounded error through ONNX Runtime on both families."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_smooth_quant import _ctx, _logits

from llmq.backends.qdq import check_tensorrt_rules
from llmq.frontends.onnx_loader import load_graph
from llmq.ir import Graph
from llmq.ir.errors import UsageError
from llmq.ir.passes import PassManager
from llmq.passes import FoldSmoothAttentionScalesPass, QuantizeKVCachePass
from test_smooth_attention import _ids


def _run(path, *passes):
    graph = load_graph(path)
    ctx = _ctx()
    records = PassManager(list(passes), verify=True).run(graph, ctx)
    return graph, ctx, records[-1]


def _rel_err(path, graph):
    ref, got = _logits(path, _ids()), _logits(graph.to_model(), _ids())
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_per_tensor(family, request):
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph, ctx, record = _run(path, FoldSmoothAttentionScalesPass(), QuantizeKVCachePass())
    assert record["stats"]["quantized_tensors"] == 4  # k and v of 2 layers
    st = ctx.structure(graph)
    nodes = graph.node_by_name()
    for block in st.attention:
        for key in ("scores", "context"):
            dq = Graph.producer(nodes[block[key]].inputs[1])
            assert dq.op == "DequantizeLinear" and np.asarray(dq.inputs[1].values).ndim == 0
            assert Graph.producer(dq.inputs[0]).op == "QuantizeLinear"
    assert check_tensorrt_rules(graph) == []
    assert 0.0 < _rel_err(path, graph) < 0.02  # INT8 cache: a small, non-zero change


def test_int4_per_head_shares_scales_across_a_gqa_group(tiny_llama_onnx):
    graph, ctx, record = _run(tiny_llama_onnx, QuantizeKVCachePass(bits=4, granularity="per-head"))
    assert record["stats"]["quantized_tensors"] == 4
    model = graph.to_model()
    zero_points = [i for i in model.graph.initializer if "cache_zero_point" in i.name]
    assert zero_points and {i.data_type for i in zero_points} == {onnx.TensorProto.INT4}
    nodes = graph.node_by_name()
    for block in ctx.structure(graph).attention:
        dq = Graph.producer(nodes[block["scores"]].inputs[1])
        scale = np.asarray(dq.inputs[1].values)
        assert scale.shape == (4,) and dq.attrs["axis"] == 1  # 4 query heads over 2 kv heads
        np.testing.assert_array_equal(scale[0], scale[1])
        np.testing.assert_array_equal(scale[2], scale[3])
        assert scale[0] != scale[2]
    # per-axis activation scales are not TensorRT's: the rule check says so
    assert any("per-channel" in p["rule"] for p in check_tensorrt_rules(graph))
    err = _rel_err(tiny_llama_onnx, graph)
    assert 0.0 < err < 0.15
    # and 4 bits lose more than 8
    graph8, _, _ = _run(tiny_llama_onnx, QuantizeKVCachePass(granularity="per-head"))
    assert _rel_err(tiny_llama_onnx, graph8) < err


def test_already_quantized_is_declined(tiny_llama_onnx):
    graph, ctx, _ = _run(tiny_llama_onnx, QuantizeKVCachePass())
    result = QuantizeKVCachePass().run(graph, ctx)
    assert not result.modified
    assert {d["reason"] for d in ctx.declined} == {"already quantized"}


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 6}, {"granularity": "per-token"}, {"tensors": ["q"]},
                                     {"bits": 4, "granularity": "per-head", "group_size": 32},
                                     {"bits": 4, "granularity": "per-token-head", "group_size": 1}])
def test_bad_options(options):
    with pytest.raises(UsageError, match="quantize-kv-cache"):
        QuantizeKVCachePass(**options)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int4_per_token_head_matches_the_formula(family, request):
    """QServe's KV4: per token and head, asymmetric, dynamic. ONNX Runtime's values entering attention equal the
    formula applied to the float keys/values (reduced over the head's channels: axis −2 of Kᵀ, −1 of V), a token
    whose range is huge does not coarsen its neighbours, and the model stays close to the float one."""
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph, ctx, record = _run(path, QuantizeKVCachePass(bits=4, granularity="per-token-head"))
    assert record["stats"]["quantized_tensors"] == 4
    nodes = graph.node_by_name()
    block = ctx.structure(graph).attention[0]
    pairs = []
    for key, axis in (("scores", -2), ("context", -1)):
        out = nodes[block[key]].inputs[1]
        mul = Graph.producer(out)
        assert mul.op == "Mul"
        sub = Graph.producer(mul.inputs[0])
        clip = Graph.producer(sub.inputs[0])
        x = Graph.producer(Graph.producer(Graph.producer(clip.inputs[0]).inputs[0]).inputs[0]).inputs[0]  # Round ← Add ← Div(x, s)
        pairs.append((x.name, out.name, axis))
    values = _tensor_values(graph, [n for p in pairs for n in p[:2]], _ids())
    for x_name, out_name, axis in pairs:
        x = values[x_name].astype(np.float64)
        lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
        s = (hi - lo) / 15
        z = -lo / s
        want = (np.clip(np.rint(x / s + z), 0, 15) - z) * s
        np.testing.assert_allclose(values[out_name], want, rtol=1e-5, atol=1e-5 * np.abs(x).max())
        assert np.all(np.abs(values[out_name] - x) <= s / 2 + 1e-5 * np.abs(x).max())  # within half a step
    assert 0.0 < _rel_err(path, graph) < 0.2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int4_per_token_head_in_groups_matches_the_formula(family, request):
    """``group_size``: one scale and zero per token, head and group of channels. ONNX Runtime's keys and values
    entering attention equal the grouped formula on the float ones, and the error is no larger than per head."""
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    probe = load_graph(path)
    block = _ctx().structure(probe).attention[0]
    width = probe.node_by_name()[block["context"]].inputs[1].shape[-1]
    group = width // 2
    assert isinstance(width, int) and group >= 2
    # the float keys/values: the model with the MatMuls' inputs as outputs
    names = [probe.node_by_name()[block[k]].inputs[1].name for k in ("scores", "context")]
    values = _tensor_values(probe, names, _ids(), optimize=True)

    graph, ctx, record = _run(path, QuantizeKVCachePass(bits=4, granularity="per-token-head", group_size=group))
    assert record["stats"]["quantized_tensors"] == 4 and record["stats"]["group_size"] == group
    assert ctx.layers["layers.0.attn"]["kv_k_bits_per_value"] == 4 + 32 / group
    outs, got = _kv_entering_attention(graph, block)
    for name, out, axis in zip(names, outs, (-2, -1)):
        x = np.moveaxis(values[name].astype(np.float64), axis, -1)
        xs = x.reshape(*x.shape[:-1], width // group, group)
        lo, hi = xs.min(-1, keepdims=True), xs.max(-1, keepdims=True)
        s = (hi - lo) / 15
        z = -lo / s
        want = np.moveaxis(((np.clip(np.rint(xs / s + z), 0, 15) - z) * s).reshape(x.shape), -1, axis)
        np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    head, _, _ = _run(path, QuantizeKVCachePass(bits=4, granularity="per-token-head"))
    assert _rel_err(path, graph) <= _rel_err(path, head) * 1.05


def test_group_size_that_does_not_divide_the_head_is_declined(tiny_llama_onnx):
    graph, ctx, record = _run(tiny_llama_onnx, QuantizeKVCachePass(bits=4, granularity="per-token-head", group_size=7))
    assert record["stats"]["quantized_tensors"] == 0
    assert any("does not divide" in d["reason"] for d in ctx.declined)


def _tensor_values(graph: Graph, names: list, ids: np.ndarray, optimize: bool = False) -> dict:
    """``{name: value}`` of the float tensors ``names`` of ``graph`` on ``ids``: the model with them as extra
    outputs, run by ONNX Runtime (graph optimizations off unless ``optimize``)."""
    import onnxruntime as ort

    model = graph.to_model()
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids})))


def _kv_entering_attention(graph: Graph, block: dict, ids: np.ndarray | None = None) -> tuple:
    """The names and values (on ``ids``, default ``_ids()``; ONNX Runtime unoptimized) of the keys and values entering ``block``'s
    attention in ``graph``."""
    nodes = graph.node_by_name()
    outs = [nodes[block[k]].inputs[1].name for k in ("scores", "context")]
    return outs, _tensor_values(graph, outs, _ids() if ids is None else ids)


def _float_kv(path: str, ids: np.ndarray) -> tuple:
    """The float keys and values of layer 0 where attention reads them (Kᵀ ``[b, h, d, T]``, V ``[b, h, T, d]``)."""
    probe = load_graph(path)
    block = _ctx().structure(probe).attention[0]
    names = [probe.node_by_name()[block[k]].inputs[1].name for k in ("scores", "context")]
    values = _tensor_values(probe, names, ids, optimize=True)
    return block, [values[n].astype(np.float64) for n in names]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("granularity,keep_first", [("per-channel", 0), ("per-channel", 1), ("per-token-head", 2)])
def test_int4_per_channel_and_float_first_tokens_match_the_formula(family, granularity, keep_first, request):
    """``per-channel``: one static scale and float zero per head and channel from the calibration's min and max
    (over the tokens after ``keep_first``); ``keep_first``: those first tokens enter attention exactly float. ONNX
    Runtime's keys and values equal the formula on the float ones, on text other than the calibration's."""
    from test_smooth_quant import TINY_VOCAB

    path = request.getfixturevalue(f"tiny_{family}_onnx")
    calib = np.random.default_rng(0).integers(0, TINY_VOCAB, (3, 1, 32), dtype=np.int64)[0]  # _ctx()'s sample
    block, calib_kv = _float_kv(path, calib)
    _, float_kv = _float_kv(path, _ids())
    graph, ctx, record = _run(path, QuantizeKVCachePass(bits=4, granularity=granularity, keep_first=keep_first))
    assert record["stats"]["quantized_tensors"] == 4 and record["stats"]["keep_first"] == keep_first
    row = ctx.layers["layers.0.attn"]
    assert row["kv_k_float_tokens"] == keep_first
    head = float_kv[0].shape[-2]  # a scale and zero of 16 bits each per token and head, or nothing per token
    assert row["kv_k_bits_per_value"] == (4 if granularity == "per-channel" else 4 + 32 / head)
    outs, got = _kv_entering_attention(graph, block)
    for out, x, c, (channel, token) in zip(outs, float_kv, calib_kv, ((-2, -1), (-1, -2))):
        if granularity == "per-channel":
            rest = np.take(c, np.arange(keep_first, c.shape[token]), axis=token)
            lo = rest.min(axis=(0, c.ndim + token), keepdims=True)
            hi = rest.max(axis=(0, c.ndim + token), keepdims=True)
        else:
            lo, hi = x.min(axis=channel, keepdims=True), x.max(axis=channel, keepdims=True)
        s = (hi - lo) / 15
        z = -lo / s
        want = (np.clip(np.rint(x / s + z), 0, 15) - z) * s
        first = np.arange(x.shape[token]) < keep_first
        want = np.where(first if token == -1 else first[:, None], x, want)
        np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=1e-5 * np.abs(x).max())
        if keep_first:  # and quantized, those tokens would have differed: the check above tells them apart
            quantized = np.take((np.clip(np.rint(x / s + z), 0, 15) - z) * s, np.arange(keep_first), axis=token)
            assert np.abs(quantized - np.take(x, np.arange(keep_first), axis=token)).max() > 1e-3 * np.abs(x).max()
    assert 0.0 < _rel_err(path, graph) < 0.3


@pytest.mark.parametrize("options", [{"granularity": "per-tensor", "keep_first": 1},
                                     {"granularity": "per-channel", "format": "fp8"},
                                     {"bits": 4, "granularity": "per-channel", "keep_first": -1}])
def test_bad_first_token_and_per_channel_options(options):
    with pytest.raises(UsageError, match="quantize-kv-cache"):
        QuantizeKVCachePass(**options)


KV4_SINK = """name: kv4-sink
opset: 21
verify: {max_kl: 5, max_rel_error: 5}
passes:
  - quantize-kv-cache: {bits: 4, granularity: per-channel, keep_first: 1, tensors: [k]}
  - quantize-kv-cache: {bits: 4, granularity: per-token-head, keep_first: 1, tensors: [v]}
"""


def test_per_channel_keys_and_float_first_token_quantize_the_cache(tiny_llama_onnx, tiny_llama_kv_onnx, tmp_path,
                                                                   calib_text):
    """The Q/DQ sits where attention reads the cache, so the KV-cache decoder quantizes each token as it enters
    the cache: its logits at prefill and at every decode step equal the no-cache graph's at those positions
    (the same static ranges from the same calibration; the first token float by its position in the cache, not
    in the step's input)."""
    from conftest import decode_logits

    from llmq.driver import compile as llmq_compile

    recipe = tmp_path / "kv4.yaml"
    recipe.write_text(KV4_SINK)
    kw = dict(calib=calib_text, calib_samples=3, calib_seq_len=48, quiet=True, sqnr=False)
    plain = llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "plain"), **kw)
    kv = llmq_compile(tiny_llama_kv_onnx, str(recipe), str(tmp_path / "kv"), **kw)
    for result in (plain, kv):  # the recipe's two instances of the pass, reported one each over the blocks
        stats = [p["stats"] for p in result.report["passes"] if p["pass"] == "quantize-kv-cache"]
        assert [(st["granularity"], st["quantized_tensors"], st["keep_first"]) for st in stats] == \
            [("per-channel", 2, 1), ("per-token-head", 2, 1)]
    ids = np.random.default_rng(5).integers(0, 64, (1, 12), dtype=np.int64)
    prompt, steps = ids[:, :7], list(ids[0, 7:])
    whole = _logits(plain.paths["model"], ids)[0]
    seen = decode_logits(kv.paths["model"], prompt, steps)
    got = np.concatenate([seen[0][0]] + [s[0] for s in seen[1:]])
    np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())
    float_whole = _logits(tiny_llama_onnx, ids)[0]
    assert np.abs(whole - float_whole).max() > 1e-3 * np.abs(float_whole).max()  # and the cache is quantized


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_channel_clip_search_lowers_the_calibration_error_and_matches_the_formula(family, request):
    """``observer: mse``: each head and channel's range is the calibrated one shrunk about its centre by the β of
    ``CLIP_GRID`` with the least squared error on the calibration tokens; the graph computes the formula with that
    range (ONNX Runtime against numpy, on the calibration tokens), and its error there is at most min/max's —
    below it, on a channel set of 4 bits."""
    from test_smooth_quant import TINY_VOCAB

    from llmq.passes.quantize_kv_cache import CLIP_GRID

    path = request.getfixturevalue(f"tiny_{family}_onnx")
    calib = np.random.default_rng(0).integers(0, TINY_VOCAB, (3, 1, 32), dtype=np.int64)[0]  # _ctx()'s sample
    block, calib_kv = _float_kv(path, calib)
    graph, ctx, record = _run(path, QuantizeKVCachePass(bits=4, granularity="per-channel", observer="mse"))
    assert record["stats"]["quantized_tensors"] == 4 and record["stats"]["observer"] == "mse"
    assert 0.3 <= ctx.layers["layers.0.attn"]["kv_k_mean_clip"] < 1.0

    def formula(x, lo, hi):
        s = (hi - lo) / 15
        z = -lo / s
        return (np.clip(np.rint(x / s + z), 0, 15) - z) * s

    for c, token in zip(calib_kv, (-1, -2)):
        axes = (0, c.ndim + token)
        lo, hi = c.min(axis=axes, keepdims=True), c.max(axis=axes, keepdims=True)
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        errors = np.stack([np.sum((formula(c, centre - b * half, centre + b * half) - c) ** 2, axis=axes, keepdims=True)
                           for b in CLIP_GRID])
        beta = np.asarray(CLIP_GRID)[np.argmin(errors, axis=0)]
        assert (beta < 1).any()
        want = formula(c, centre - beta * half, centre + beta * half)
        assert np.sum((want - c) ** 2) < np.sum((formula(c, lo, hi) - c) ** 2)
        # the graph on the calibration text itself: that range, that formula
        outs, got = _kv_entering_attention(graph, block, calib)
        np.testing.assert_allclose(got[outs[0 if token == -1 else 1]], want, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_per_channel_takes_minmax_or_mse_only():
    with pytest.raises(UsageError, match="minmax or mse"):
        QuantizeKVCachePass(bits=4, granularity="per-channel", observer="percentile")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("keep_first", [0, 1])
def test_key_token_groups_match_the_causal_formula(family, keep_first, request):
    """``per-channel-group`` (KIVI's keys): the query at position p scores key j with k̂_j — quantized per head and
    channel over its group of ``token_group`` tokens after the first ``keep_first`` — iff j's group is complete by
    p, else with the float k_j (ONNX Runtime's scores against numpy on the graph's own float Q and K)."""
    g = 8
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    graph, ctx, record = _run(path, QuantizeKVCachePass(bits=4, granularity="per-channel-group", token_group=g,
                                                        keep_first=keep_first, tensors=["k"]))
    assert record["stats"]["quantized_tensors"] == 2
    assert ctx.layers["layers.0.attn"]["kv_k_bits_per_value"] == 4 + 32 / g
    wheres = [n for n in graph.gs.nodes if n.op == "Where" and n.name.startswith("quantize-kv-cache/")]
    assert len(wheres) == 2  # one per layer: Where(quantized, Q·K̂ᵀ, Q·Kᵀ)
    where = next(w for w in wheres if w.outputs[0].name.startswith("layers.0."))
    mm = Graph.producer(where.inputs[2])  # the float score MatMul, as the model had it
    assert mm.op == "MatMul" and Graph.producer(where.inputs[1]).inputs[0] is mm.inputs[0]
    names = [mm.inputs[0].name, mm.inputs[1].name, where.outputs[0].name]
    got = _tensor_values(graph, names, _ids())
    q, kt, scores = (got[n].astype(np.float64) for n in names)
    t = kt.shape[-1]
    full = (t - keep_first) // g * g
    mid = kt[..., keep_first:keep_first + full]
    groups = mid.reshape(*mid.shape[:-1], full // g, g)
    lo, hi = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    s = (hi - lo) / 15
    z = -lo / s
    khat = kt.copy()
    khat[..., keep_first:keep_first + full] = ((np.clip(np.rint(groups / s + z), 0, 15) - z) * s).reshape(mid.shape)
    pos = np.arange(t)
    limit = keep_first + np.maximum(pos + 1 - keep_first, 0) // g * g
    quantized = (pos[None, :] >= keep_first) & (pos[None, :] < limit[:, None])
    want = np.where(quantized, q @ khat, q @ kt)
    scale = np.abs(want).max()
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(q @ khat - q @ kt)[..., quantized].max() > 1e-3 * scale  # the quantized entries differ
    assert 0.0 < _rel_err(path, graph) < 0.3


KIVI = """name: kivi
opset: 21
verify: {max_kl: 5, max_rel_error: 5}
passes:
  - quantize-kv-cache: {bits: 4, granularity: per-channel-group, token_group: 4, keep_first: 1, tensors: [k]}
  - quantize-kv-cache: {bits: 4, granularity: per-token-head, keep_first: 1, tensors: [v]}
"""


def test_key_token_groups_decode_as_the_whole_sequence(tiny_llama_onnx, tiny_llama_kv_onnx, tmp_path, calib_text):
    """The KV-cache decoder with KIVI keys gives, at prefill and at every decode step, the logits the no-cache
    graph gives at those positions: a group quantized once complete, never with a later token's range."""
    from conftest import decode_logits

    from llmq.driver import compile as llmq_compile

    recipe = tmp_path / "kivi.yaml"
    recipe.write_text(KIVI)
    kw = dict(calib=calib_text, calib_samples=3, calib_seq_len=48, quiet=True, sqnr=False)
    plain = llmq_compile(tiny_llama_onnx, str(recipe), str(tmp_path / "plain"), **kw)
    kv = llmq_compile(tiny_llama_kv_onnx, str(recipe), str(tmp_path / "kv"), **kw)
    for result in (plain, kv):
        stats = [p["stats"] for p in result.report["passes"] if p["pass"] == "quantize-kv-cache"]
        assert [(st["granularity"], st["quantized_tensors"]) for st in stats] == \
            [("per-channel-group", 2), ("per-token-head", 2)]
    ids = np.random.default_rng(5).integers(0, 64, (1, 14), dtype=np.int64)
    prompt, steps = ids[:, :6], list(ids[0, 6:])  # groups [1, 5), [5, 9), [9, 13) complete along the way
    # the onnxruntime backend too: its attention fusion must leave these blocks alone (it cannot round K)
    ort_kv = llmq_compile(tiny_llama_kv_onnx, str(recipe), str(tmp_path / "kv_ort"), backend="onnxruntime", **kw)
    whole = _logits(plain.paths["model"], ids)[0]
    for model in (kv.paths["model"], ort_kv.paths["model"]):
        seen = decode_logits(model, prompt, steps)
        got = np.concatenate([seen[0][0]] + [s[0] for s in seen[1:]])
        np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())
    float_whole = _logits(tiny_llama_onnx, ids)[0]
    assert np.abs(whole - float_whole).max() > 1e-3 * np.abs(float_whole).max()  # and the keys are quantized


@pytest.mark.parametrize("options", [{"granularity": "per-channel-group", "bits": 4},
                                     {"granularity": "per-channel-group", "bits": 4, "tensors": ["k"], "token_group": 1}])
def test_bad_token_group_options(options):
    with pytest.raises(UsageError, match="quantize-kv-cache"):
        QuantizeKVCachePass(**options)


@pytest.mark.parametrize("options", [dict(granularity="per-channel-group", token_group=8, keep_first=1, tensors=["k"]),
                                     dict(granularity="per-token-head", keep_first=1),
                                     dict(granularity="per-channel")])
def test_a_cache_quantized_once_is_not_quantized_again(options, tiny_llama_onnx, tmp_path):
    """The pass run again — on the graph, or on the compiled model loaded from disk (a model compiled twice) —
    declines every block as already quantized and leaves the outputs as they were."""
    graph, _, _ = _run(tiny_llama_onnx, QuantizeKVCachePass(bits=4, **options))
    path = str(tmp_path / "once.onnx")
    onnx.save(graph.to_model(), path)
    for again in (graph, load_graph(path)):
        ctx = _ctx()
        records = PassManager([QuantizeKVCachePass(bits=4, **options)]).run(again, ctx)
        assert records[0]["stats"]["quantized_tensors"] == 0
        reasons = [d["reason"] for d in ctx.declined if d["pass"] == "quantize-kv-cache"]
        assert len(reasons) == 2 * len(options.get("tensors", ["k", "v"])) and set(reasons) == {"already quantized"}
        np.testing.assert_array_equal(_logits(again.to_model(), _ids()), _logits(path, _ids()))

"""The onnxruntime backend's attention fusion (GroupQueryAttention + RotaryEmbedding): the fused KV-cache
decoder computes what the exported one does, step by step; what it cannot express is declined and left as it
was; a fusion that disagrees with the original on the probe is not kept."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from conftest import TINY_VOCAB, decode_logits

from llmq.backends import ort_attention
from llmq.backends.onnxruntime import fused_ops, make_session
from llmq.evaluate import generate
from llmq.ir.feeds import prompt_feeds

PROMPT = np.random.default_rng(5).integers(0, TINY_VOCAB, (1, 11))


def _compile(model, recipe, out, **kw):
    from llmq.driver import compile as llmq_compile

    kw.setdefault("sqnr", False)
    return llmq_compile(model, recipe, str(out), backend="onnxruntime", quiet=True, **kw)


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _lowering(report) -> dict:
    return next(r for r in report["backend"]["lowering"] if r["pass"] == "fuse-attention-gqa")


def _steps(path: str, prompt: np.ndarray, steps: int) -> list:
    return decode_logits(path, prompt, [token * 7 % TINY_VOCAB for token in range(steps)])


def test_fused_kv_decoder_matches_the_export_step_by_step(tiny_llama_kv_onnx, tmp_path):
    res = _compile(tiny_llama_kv_onnx, "fp32", tmp_path / "fused")
    low = _lowering(res.report)
    assert low["modified"] and low["stats"]["fused"] == 2
    assert low["stats"]["heads"] == 4 and low["stats"]["kv_heads"] == 2 and low["stats"]["head_dim"] == 16
    assert low["stats"]["probe_max_error"] <= 1.0
    ops = _ops(res.paths["model"])
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4 and "Softmax" not in ops
    assert fused_ops(res.paths["model"]).get("com.microsoft.GroupQueryAttention") == 2  # ORT keeps it as written
    ref, got = _steps(tiny_llama_kv_onnx, PROMPT, 6), _steps(res.paths["model"], PROMPT, 6)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert generate(res.paths["model"], PROMPT, 10)["tokens"] == generate(tiny_llama_kv_onnx, PROMPT, 10)["tokens"]


def test_fused_positions_are_honoured(tiny_llama_kv_onnx, tmp_path):
    """RoPE reads position_ids, not the cache length: an offset start (a prompt continued at position 40)
    and a batch of two rows give the export's logits."""
    res = _compile(tiny_llama_kv_onnx, "fp32", tmp_path / "fused")
    ref, new = make_session(tiny_llama_kv_onnx), make_session(res.paths["model"])
    inputs = [(i.name, i.shape) for i in ref.get_inputs()]
    ids = np.random.default_rng(1).integers(0, TINY_VOCAB, (2, 4))
    feeds = prompt_feeds(inputs, ids)
    feeds["position_ids"] = feeds["position_ids"] + 40
    for a, b in zip(ref.run(None, feeds), new.run(None, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_fused_w4_model_keeps_its_tokens(tiny_llama_kv_onnx, tmp_path):
    fused = _compile(tiny_llama_kv_onnx, "w4a16-rtn", tmp_path / "fused")
    plain = _compile(tiny_llama_kv_onnx, "w4a16-rtn", tmp_path / "plain", fuse_attention=False)
    assert _lowering(fused.report)["stats"]["fused"] == 2
    assert not any(r["pass"] == "fuse-attention-gqa" for r in plain.report["backend"]["lowering"])
    assert "GroupQueryAttention" not in _ops(plain.paths["model"])
    for a, b in zip(_steps(plain.paths["model"], PROMPT, 4), _steps(fused.paths["model"], PROMPT, 4)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_what_cannot_be_fused_is_declined_and_untouched(tiny_llama_onnx, tiny_gpt2_kv_onnx, tmp_path):
    # the plain graph: RoPE positions computed inside (no position_ids input)
    plain = _compile(tiny_llama_onnx, "fp32", tmp_path / "plain")
    reasons = {d["reason"] for d in plain.report["declined"] if d["pass"] == "fuse-attention-gqa"}
    assert reasons and "GroupQueryAttention" not in _ops(plain.paths["model"])
    # GPT-2: learned positions, no rotary
    gpt2 = _compile(tiny_gpt2_kv_onnx, "fp32", tmp_path / "gpt2")
    reasons = {d["reason"] for d in gpt2.report["declined"] if d["pass"] == "fuse-attention-gqa"}
    assert any("RoPE" in r for r in reasons), reasons
    assert generate(gpt2.paths["model"], PROMPT, 5)["tokens"] == generate(tiny_gpt2_kv_onnx, PROMPT, 5)["tokens"]


def test_quantized_kv_cache_is_not_fused(tiny_llama_kv_onnx, calib_text, tmp_path):
    res = _compile(tiny_llama_kv_onnx, "w8a8-kv8", tmp_path / "kv8", calib=calib_text)
    reasons = {d["reason"] for d in res.report["declined"] if d["pass"] == "fuse-attention-gqa"}
    assert any("quantized (Q/DQ)" in r for r in reasons), reasons
    assert "GroupQueryAttention" not in _ops(res.paths["model"])


def test_probe_rejects_a_wrong_fusion(tiny_llama_kv_onnx, tmp_path, monkeypatch):
    """A matcher that got the softmax scale wrong (a plausible bug: √D instead of 1/√D folded twice) must not
    reach the artifact: the probe sees each block's output move and the pass leaves the graph as it was."""
    real = ort_attention._match

    def wrong(*args):
        plan = real(*args)
        plan.scale *= 1.5
        return plan

    monkeypatch.setattr(ort_attention, "_match", wrong)
    res = _compile(tiny_llama_kv_onnx, "fp32", tmp_path / "wrong")
    low = _lowering(res.report)
    assert not low["modified"] and low["stats"]["probe_max_error"] > 1.0
    assert any("on probe inputs; left unfused" in d["reason"] for d in res.report["declined"])
    assert "GroupQueryAttention" not in _ops(res.paths["model"])
    ref, got = _steps(tiny_llama_kv_onnx, PROMPT, 2), _steps(res.paths["model"], PROMPT, 2)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("flag", [True, False])
def test_cli_switch(tiny_llama_kv_onnx, tmp_path, flag):
    from llmq.cli import compile_main

    out = tmp_path / "out"
    argv = [tiny_llama_kv_onnx, "--recipe", "fp32", "--backend", "onnxruntime", "-o", str(out), "--quiet"]
    assert compile_main(argv + (["--no-fuse-attention"] if flag else [])) == 0
    assert ("GroupQueryAttention" in _ops(out / "model.onnx")) is not flag


def _mask_graph(window: int | None):
    """A graph whose output is an attention mask built from input shapes, causal or with a sliding window."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from llmq.ir.graph import Graph

    c = lambda name, v: h.make_tensor(name, T.INT64, [], [v])  # noqa: E731
    nodes = [h.make_node("Shape", ["past_key_values.0.key"], ["p"], start=2, end=3),
             h.make_node("Shape", ["input_ids"], ["s"], start=1, end=2),
             h.make_node("Add", ["p", "s"], ["t"]),
             h.make_node("Squeeze", ["t"], ["t0"]), h.make_node("Squeeze", ["s"], ["s0"]),
             h.make_node("Range", ["zero", "t0", "one"], ["j"]), h.make_node("Range", ["zero", "s0", "one"], ["i0"]),
             h.make_node("Add", ["i0", "p"], ["i"]), h.make_node("Unsqueeze", ["i", "ax1"], ["ic"]),
             h.make_node("LessOrEqual", ["j", "ic"], ["ok"])]
    if window:
        nodes += [h.make_node("Sub", ["ic", "win"], ["lo"]), h.make_node("Greater", ["j", "lo"], ["in_win"]),
                  h.make_node("And", ["ok", "in_win"], ["ok2"])]
    nodes.append(h.make_node("Where", ["ok2" if window else "ok", "fzero", "ninf"], ["mask"]))
    inits = [c("zero", 0), c("one", 1), c("win", window or 0), h.make_tensor("ax1", T.INT64, [1], [1]),
             h.make_tensor("fzero", T.FLOAT, [], [0.0]), h.make_tensor("ninf", T.FLOAT, [], [float("-inf")])]
    graph = h.make_graph(nodes, "m", [h.make_tensor_value_info("input_ids", T.INT64, [1, "s"]),
                                      h.make_tensor_value_info("past_key_values.0.key", T.FLOAT, [1, 2, "p", 16])],
                         [h.make_tensor_value_info("mask", T.FLOAT, None)], inits)
    g = Graph.from_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]))
    return g, g.gs.outputs[0]


@pytest.mark.parametrize("window", [None, 4096])
def test_mask_must_be_causal_at_long_range(window):
    """A sliding-window mask is causal over any few tokens the block probe runs; it differs only beyond the
    window, where the mask check evaluates it."""
    g, mask = _mask_graph(window)
    verdict = ort_attention._mask_is_causal(mask, g)
    if window is None:
        assert verdict is None
    else:
        assert verdict is not None and "not causal" in verdict

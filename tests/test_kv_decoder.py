"""The KV-cache decoder: its greedy tokens match the no-cache graph's argmax on the same prompt (both
families), and recipes compile it as they compile the plain graph."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY_VOCAB

from llmq.cli import eval_main
from llmq.evaluate import generate

PROMPT = np.random.default_rng(3).integers(0, TINY_VOCAB, (1, 9))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_match_the_no_cache_graph(family, request):
    plain, kv = request.getfixturevalue(f"tiny_{family}_onnx"), request.getfixturevalue(f"tiny_{family}_kv_onnx")
    names = [i.name for i in ort.InferenceSession(kv, providers=["CPUExecutionProvider"]).get_inputs()]
    assert names[:2] == ["input_ids", "position_ids"] and "past_key_values.1.value" in names
    with_cache = generate(kv, PROMPT, max_new_tokens=12)
    without = generate(plain, PROMPT, max_new_tokens=12)
    assert with_cache["kv_cache"] and not without["kv_cache"]
    assert with_cache["tokens"] == without["tokens"] and len(with_cache["tokens"]) == 12
    assert with_cache["decode_tokens_per_s"] > 0 and with_cache["prefill_tokens_per_s"] > 0


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a16"])
def test_recipes_compile_the_kv_graph_like_the_plain_one(recipe, tiny_llama_onnx, tiny_llama_kv_onnx, tmp_path):
    from llmq.driver import compile as llmq_compile

    plain = llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "plain"), backend="onnxruntime", quiet=True)
    kv = llmq_compile(tiny_llama_kv_onnx, recipe, str(tmp_path / "kv"), backend="onnxruntime", quiet=True)
    assert kv.report["structure"]["roles"] == plain.report["structure"]["roles"]
    assert kv.report["totals"]["quantized_weights"] == plain.report["totals"]["quantized_weights"] == 14
    # the same kernels for the linears; the KV graph's attention is fused, so the only float MatMul left is the
    # LM head (the plain graph keeps its Q·Kᵀ and P·V ones, partly as FusedMatMul)
    fused = next(r for r in kv.report["backend"]["lowering"] if r["pass"] == "fuse-attention-gqa")
    assert fused["stats"]["fused"] == 2

    def linear_kernels(ops):
        return {k: v for k, v in ops.items() if v and "MatMul" in k and k not in ("MatMul", "com.microsoft.FusedMatMul")}

    assert linear_kernels(kv.report["backend"]["fused_ops"]) == linear_kernels(plain.report["backend"]["fused_ops"])
    assert kv.report["backend"]["fused_ops"]["MatMul"] == 1
    assert generate(kv.paths["model"], PROMPT, 8)["tokens"] == generate(plain.paths["model"], PROMPT, 8)["tokens"]


def test_eval_generate_prints_text_and_rates(tiny_llama_kv_onnx, tiny_tokenizer, capsys):
    assert eval_main([tiny_llama_kv_onnx, "--tokenizer", tiny_tokenizer, "--generate", "def main():",
                      "--max-new-tokens", "5", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache"] and len(out["tokens"]) <= 5 and isinstance(out["text"], str)
    assert out["decode_tokens_per_s"] is None or out["decode_tokens_per_s"] > 0
    assert os.path.isfile(tiny_llama_kv_onnx)

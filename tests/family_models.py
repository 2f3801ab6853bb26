"""Tiny random-weight Hugging Face models of many architectures, for a test matrix over model families.

Every model has the tiny shapes of ``conftest.py`` (vocab ``TINY_VOCAB`` = 384, hidden 64, 2 layers, 4 heads,
2 KV heads where the family has GQA, MLP width 160, 256 positions), is built under ``torch.manual_seed(0)``
and then has every normalisation weight moved away from 1 (``+ 0.3·randn``) and every bias — norm biases and
linear biases — away from 0 (``+ 0.1·randn``) with a fixed-seed generator, so a wrong fold into a norm (or a
dropped bias) changes the output. Same name, same bytes.

    folder = build_family("phi3", tmp / "hf", tokenizer_dir)     # config.json + model.safetensors + tokenizer
    export_family("phi3", folder, tmp / "model.onnx")           # input_ids -> logits (bert: last_hidden_state)

What each family exercises (``FAMILIES``; ``EXTRA_FAMILIES`` are further layouts of the same code):

* ``llama``      — RMSNorm, separate q/k/v, GQA, SwiGLU, RoPE, tied LM head (conftest's layout).
* ``qwen2``      — llama with q/k/v biases (a bias on the smoothed linears) and an untied LM head.
* ``gemma2``     — ``(1 + w)`` RMSNorm before *and after* attention and MLP (sandwich norms), GeGLU (tanh),
  embeddings × √hidden, attention and final-logit softcapping (``tanh``), query scale from
  ``query_pre_attn_scalar``, alternating sliding/full layers.
* ``phi3``       — fused ``qkv_proj`` and fused ``gate_up_proj`` (split by Slice/chunk in the graph).
* ``mistral``    — llama with a sliding window (64) in the attention mask.
* ``opt``        — pre-LN LayerNorm with biases everywhere, ReLU fc1/fc2, learned positions (offset 2),
  the ``1/√d`` query scale folded into q_proj's output.
* ``opt-postln`` — OPT with ``do_layer_norm_before=False`` (OPT-350m): LayerNorm *after* each residual add,
  so no linear is fed by a norm it owns the input of in the pre-LN sense; no final norm.
* ``gpt-neox``   — fused qkv with heads interleaved (``[head, 3, d]``), partial rotary (25 % of the head dim),
  parallel residual (attention and MLP both read the block input through their own LayerNorms), GELU.
* ``gpt2``       — Conv1D (weights ``[in, out]``), fused ``c_attn``, learned positions, tied head, GELU-tanh.
* ``falcon``     — the 7B layout: ``parallel_attn`` with one shared LayerNorm feeding attention and MLP,
  multi-query (1 KV head), fused qkv, no biases, GELU.
* ``bert``       — an encoder (``BertModel``: bidirectional attention, post-LN, token-type and position
  embeddings, embedding LayerNorm), exported by :func:`export_encoder` as ``input_ids → last_hidden_state``.
* ``mixtral``    — sparse MoE: a router (top-2 of 4 experts) and expert weights stored as 3-D tensors
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), transformers' default ``experts_implementation``
  (``grouped_mm``). ``load_hf`` currently refuses mixture-of-experts configs with one line.

* ``falcon-new`` (extra) — ``new_decoder_architecture=True`` (the 40B/180B layout): GQA with 2 KV heads, two
  LayerNorms per block (``ln_attn`` for attention, ``ln_mlp`` for the MLP), parallel residual.
* ``opt-350m``   (extra) — OPT-350m exactly: post-LN plus ``word_embed_proj_dim`` (32) ≠ hidden, i.e. a
  ``project_in`` linear after the embedding and a ``project_out`` linear before the (tied) LM head.
* ``mixtral-bmm`` (extra) — ``mixtral`` with ``"experts_implementation": "batched_mm"`` in config.json: the
  default (``grouped_mm``) does not export (no ONNX function for ``transformers::grouped_mm_fallback``) and
  ``eager`` neither (a data-dependent loop over the experts hit); ``batched_mm`` exports, with each token's
  top-k expert weights gathered from the 3-D tensors and applied by batched MatMuls (no constant-weight linear).
"""

from __future__ import annotations

import json
import os
import shutil

TINY_VOCAB = 384  # = conftest.TINY_VOCAB (not imported: this module must load without conftest)
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 64, 2, 4, 2, 160, 256

FAMILIES = ("llama", "qwen2", "gemma2", "phi3", "mistral", "opt", "opt-postln", "gpt-neox", "gpt2", "falcon",
            "bert", "mixtral")
EXTRA_FAMILIES = ("falcon-new", "opt-350m", "mixtral-bmm")
ENCODERS = ("bert",)

__all__ = ["ENCODERS", "EXTRA_FAMILIES", "FAMILIES", "build_family", "config_for", "export_encoder",
           "export_family", "load_family"]


def config_for(name: str):
    """The transformers config of family ``name`` (tiny shapes)."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=POSITIONS)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the tiny tokenizer's <unk>, <s>, </s>
    gqa = dict(common, intermediate_size=FFN, num_key_value_heads=KV_HEADS, **ids)
    if name == "llama":
        return tf.LlamaConfig(**gqa, tie_word_embeddings=True)
    if name == "qwen2":
        return tf.Qwen2Config(**gqa, tie_word_embeddings=False)
    if name == "gemma2":  # head_dim and query_pre_attn_scalar default to 256: set both to the tiny head size
        return tf.Gemma2Config(**gqa, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS)
    if name == "phi3":
        return tf.Phi3Config(**gqa)
    if name == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=64)
    if name in ("mixtral", "mixtral-bmm"):
        return tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2)
    if name in ("opt", "opt-postln", "opt-350m"):
        return tf.OPTConfig(**common, ffn_dim=FFN, do_layer_norm_before=name == "opt",
                            word_embed_proj_dim=32 if name == "opt-350m" else HIDDEN, **ids)
    if name == "gpt-neox":
        return tf.GPTNeoXConfig(**common, intermediate_size=FFN, rotary_pct=0.25, use_parallel_residual=True, **ids)
    if name == "gpt2":  # conftest's layout (MLP 4 × hidden)
        return tf.GPT2Config(vocab_size=TINY_VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                             bos_token_id=1, eos_token_id=2)
    if name == "falcon":
        return tf.FalconConfig(**common, ffn_hidden_size=FFN, new_decoder_architecture=False, parallel_attn=True,
                               multi_query=True, bias=False, alibi=False, **ids)
    if name == "falcon-new":
        return tf.FalconConfig(**common, ffn_hidden_size=FFN, new_decoder_architecture=True, num_kv_heads=KV_HEADS,
                               bias=False, alibi=False, **ids)
    if name == "bert":
        return tf.BertConfig(**common, intermediate_size=FFN, pad_token_id=0)
    raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES + EXTRA_FAMILIES)}")


def _perturb(model, seed: int = 0) -> None:
    """Norm weights += 0.3·randn (so ≠ 1; Gemma's ``(1 + w)`` norms start at w = 0, so the same shift) and
    every bias += 0.1·randn, in ``named_parameters`` order with a generator of fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules()
             if (isinstance(m, torch.nn.LayerNorm) or "Norm" in type(m).__name__)
             and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if id(p) in norms:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build_family(name: str, folder: str, tokenizer_dir: str | None = None) -> str:
    """Write the tiny model of family ``name`` to ``folder`` (config.json + safetensors, plus the tokenizer files
    of ``tokenizer_dir`` if given); returns ``folder``. Deterministic."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    folder = str(folder)
    config = config_for(name)
    torch.manual_seed(0)
    model = (AutoModel if name in ENCODERS else AutoModelForCausalLM).from_config(config)
    _perturb(model)
    model.save_pretrained(folder)
    if name == "mixtral-bmm":  # transformers does not write the experts implementation to config.json; it reads it
        path = os.path.join(folder, "config.json")
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        saved["experts_implementation"] = "batched_mm"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(saved, fh, indent=2, sort_keys=True)
    if tokenizer_dir:
        for entry in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, entry), folder)
    return folder


def load_family(name: str, folder: str):
    """The saved model in fp32 eval mode (the torch reference for an export)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if name in ENCODERS else AutoModelForCausalLM
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def export_encoder(folder: str, onnx_path: str) -> str:
    """Export the encoder in ``folder`` as ``input_ids [batch, seq] → last_hidden_state [batch, seq, hidden]`` (both
    axes dynamic, no attention mask, opset 21) through ``export_module``; returns the path written."""
    import torch
    from transformers import AutoModel

    from llmq.frontends.torch_export import export_module

    inner = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).last_hidden_state

    vocab = int(inner.get_input_embeddings().weight.shape[0])
    example = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024),
                          1: torch.export.Dim("seq", min=2, max=inner.config.max_position_embeddings)}}
    meta = {"llmq.source": os.path.basename(os.path.normpath(str(folder))), "llmq.vocab_size": vocab,
            "llmq.architecture": type(inner).__name__}
    with torch.no_grad():
        return export_module(Encoder(inner), (example,), str(onnx_path), ["input_ids"], ["last_hidden_state"], dims,
                             metadata=meta)


def export_family(name: str, folder: str, onnx_path: str, **kwargs) -> str:
    """Export a folder written by :func:`build_family`: ``export_hf`` (``kwargs`` passed on, e.g. ``kv_cache``) for
    the causal LMs, :func:`export_encoder` for encoders; returns the ONNX path."""
    from llmq.frontends.torch_export import export_hf

    if name in ENCODERS:
        return export_encoder(folder, onnx_path)
    return export_hf(str(folder), str(onnx_path), **kwargs)["model"]

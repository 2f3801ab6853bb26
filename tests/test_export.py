"""Export: self-sampled calibration text is the same text, faster; float types; what the export reports."""

from __future__ import annotations

import numpy as np


def _reference_self_calibration(model, samples, seq_len, seed=0):
    """The first implementation (a ``DynamicCache`` re-concatenated every step), kept as the reference: the
    fast one must draw the same tokens."""
    import torch

    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(seed)
    firsts = torch.randint(0, vocab, (samples, 1), generator=gen)
    rows = []
    for start in range(0, samples, 16):
        ids = firsts[start:start + 16]
        cache, out, position = None, [ids], 0
        with torch.no_grad():
            for _ in range(seq_len - 1):
                pos = torch.arange(position, position + ids.shape[1]).expand(ids.shape[0], -1)
                result = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
                cache, position = result.past_key_values, position + ids.shape[1]
                probs = torch.softmax(result.logits[:, -1].double(), dim=-1)
                ids = torch.multinomial(probs, 1, generator=gen)
                out.append(ids)
        rows.append(torch.cat(out, dim=1))
    return torch.cat(rows).numpy().astype("int64")


def test_self_calibration_draws_the_reference_tokens(tiny_llama_dir):
    from llmq.frontends.torch_export import load_hf, self_calibration

    model, _ = load_hf(tiny_llama_dir)
    ticks = []
    fast = self_calibration(model, 18, 40, seed=3, progress=lambda it: (ticks.append(1) or x for x in it))
    assert fast.shape == (18, 40) and fast.dtype == np.int64
    assert np.array_equal(fast, _reference_self_calibration(model, 18, 40, seed=3))
    assert np.array_equal(fast, self_calibration(model, 18, 40, seed=3))  # deterministic


def _run(path, ids):
    from llmq.backends.onnxruntime import make_session

    return make_session(path, optimize=False).run(None, {"input_ids": ids})[0]


def test_streamed_export_is_the_same_model(tiny_llama_dir, tmp_path):
    """The streamed export (weights never loaded: fake-tensor capture, checkpoint streamed into external data)
    computes what the in-memory export computes, in float32 and float16, and its tokenizer comes along."""
    import os

    import onnx

    from llmq.frontends.torch_export import export_hf

    ids = np.random.default_rng(0).integers(0, 300, (2, 17), dtype=np.int64)
    for dtype, rtol in (("float32", 1e-5), ("float16", 2e-2)):
        ref = export_hf(tiny_llama_dir, str(tmp_path / f"ref-{dtype}.onnx"), dtype=dtype, stream=False)
        got = export_hf(tiny_llama_dir, str(tmp_path / f"stream-{dtype}.onnx"), dtype=dtype, stream=True)
        assert got["streamed"] and os.path.isfile(got["model"] + ".data") and got["tokenizer"]
        a, b = _run(ref["model"], ids), _run(got["model"], ids)
        assert b.dtype == a.dtype
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=rtol, atol=rtol)
        meta = {p.key: p.value for p in onnx.load(got["model"], load_external_data=False).metadata_props}
        assert meta["llmq.dtype"] == dtype and meta["llmq.vocab_size"] == str(ref["vocab_size"])

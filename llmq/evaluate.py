"""Evaluation in ONNX Runtime: perplexity over non-overlapping windows with prefill throughput, and greedy
generation (with the KV cache when the graph has one) with prefill and decode throughput.

Preprocessing follows the common WikiText-2 practice: CRLF → LF, the file joined as it stands,
tokenised once without special tokens, cut into consecutive windows of ``seq_len`` tokens; the loss of
each window predicts tokens 2..seq_len from the ones before (``seq_len − 1`` predictions per window).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from .backends.onnxruntime import DEFAULT_ACCURACY_LEVEL, make_session
from .ir.errors import LlmqError
from .ir.feeds import is_kv_decoder, prompt_feeds, session_specs

UPCAST_NOTE = ("bfloat16 model evaluated in float32: ONNX Runtime's CPU provider has no bfloat16 kernels, so the "
               "bf16 weights ran with fp32 arithmetic")

__all__ = ["UPCAST_NOTE", "generate", "perplexity", "read_eval_text", "token_windows"]

logger = logging.getLogger(__name__)


def read_eval_text(path: str) -> str:
    if not os.path.isfile(path):
        raise LlmqError(f"evaluation text not found: {path}", "check the --text path")
    with open(path, encoding="utf-8", errors="strict") as fh:
        return fh.read().replace("\r\n", "\n")


def token_windows(tokenizer, text: str, seq_len: int, windows: int | None) -> np.ndarray:
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    available = len(ids) // seq_len
    if available == 0:
        raise LlmqError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}",
                        "give a longer text or a smaller --seq-len")
    n = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        logger.warning("the text holds only %d windows of %d tokens", available, seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return float((logz - picked).sum())


def perplexity(model_path: str, windows: np.ndarray, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
               progress=None, threads: int | None = None) -> dict:
    """Perplexity of ``model_path`` over ``windows`` ([n, seq_len] int64), with prefill tokens/s."""
    session = make_session(model_path, accuracy_level, threads=threads)
    inputs = session_specs(session)
    logits_name = session.get_outputs()[0].name
    total_nll, count, seconds = 0.0, 0, 0.0
    iterator = progress(range(len(windows))) if progress else range(len(windows))
    for i in iterator:
        batch = windows[i:i + 1]
        started = time.perf_counter()
        (logits,) = session.run([logits_name], prompt_feeds(inputs, batch))
        seconds += time.perf_counter() - started
        if not np.all(np.isfinite(logits)):
            total_nll = math.inf
        else:
            total_nll += _nll(logits[0, :-1], batch[0, 1:])
        count += batch.shape[1] - 1
    ppl = math.exp(total_nll / count) if math.isfinite(total_nll) else math.inf
    return {"perplexity": ppl, "windows": int(len(windows)), "seq_len": int(windows.shape[1]),
            "tokens": int(windows.size), "seconds": round(seconds, 3),
            "prefill_tokens_per_s": round(windows.size / seconds, 1) if seconds else None,
            "accuracy_level": accuracy_level, "upcast": UPCAST_NOTE if session.llmq_upcast else None}


class Decoder:
    """Greedy decoding with one model, a token at a time: :meth:`prefill` the prompt, then :meth:`step` per new
    token — with the KV cache when the graph has one, else by re-running the whole sequence. Each call returns
    its wall time in seconds, so a benchmark can interleave several models step by step."""

    def __init__(self, model_path: str, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, threads: int | None = None,
                 spinning: bool = True):
        self.session = make_session(model_path, accuracy_level, threads=threads, spinning=spinning)
        self.inputs = session_specs(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.kv = is_kv_decoder(self.inputs)
        self.pairs = {f"past_key_values.{n[len('present.'):]}": n for n in self.outputs if n.startswith("present.")}
        self.ids = np.zeros((1, 0), np.int64)
        self.tokens: list = []
        self.result = None

    def prefill(self, prompt_ids: np.ndarray) -> float:
        self.ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
        started = time.perf_counter()
        self.result = self.session.run(self.outputs, prompt_feeds(self.inputs, self.ids))
        spent = time.perf_counter() - started
        self.tokens = [int(np.argmax(self.result[0][0, -1]))]
        return spent

    def step(self) -> float:
        """Feed the last token, read the next one."""
        started = time.perf_counter()
        if self.kv:
            named = dict(zip(self.outputs, self.result))
            past = {p: named[o] for p, o in self.pairs.items()}
            self.result = self.session.run(self.outputs, prompt_feeds(self.inputs, np.asarray([[self.tokens[-1]]]), past))
        else:
            seq = np.concatenate([self.ids, np.asarray([self.tokens])], axis=1)
            self.result = self.session.run(self.outputs, prompt_feeds(self.inputs, seq))
        spent = time.perf_counter() - started
        self.tokens.append(int(np.argmax(self.result[0][0, -1])))
        return spent


def generate(model_path: str, prompt_ids: np.ndarray, max_new_tokens: int = 32, eos_id: int | None = None,
             accuracy_level: int = DEFAULT_ACCURACY_LEVEL, threads: int | None = None) -> dict:
    """Greedy decoding of ``prompt_ids [1, n]`` (see :class:`Decoder`). Returns the new token ids and the
    prefill and decode throughput."""
    decoder = Decoder(model_path, accuracy_level, threads=threads)
    prefill_s = decoder.prefill(prompt_ids)
    decode_s = 0.0
    while len(decoder.tokens) < max_new_tokens and not (eos_id is not None and decoder.tokens[-1] == eos_id):
        decode_s += decoder.step()
    steps = len(decoder.tokens) - 1
    return {"tokens": decoder.tokens, "kv_cache": decoder.kv, "prompt_tokens": int(decoder.ids.shape[1]),
            "prefill_tokens_per_s": round(decoder.ids.shape[1] / prefill_s, 1) if prefill_s else None,
            "decode_tokens_per_s": round(steps / decode_s, 1) if decode_s else None,
            "accuracy_level": accuracy_level}

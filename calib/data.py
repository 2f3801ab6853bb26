"""Calibration data: text (``.txt``, ``.jsonl`` with a ``text`` field) or ready tensors (``.npz``).

Text is tokenised with the model's tokenizer as one stream and cut into ``samples`` windows of
``seq_len`` tokens taken evenly across the stream (deterministic). Without a file, the default text is
the Python standard library's own documentation shipped in ``pydoc_data`` — never the evaluation set.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from ..ir.errors import LlmqError

__all__ = ["default_text", "load_calibration", "read_text"]

logger = logging.getLogger(__name__)


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise LlmqError(f"calibration file not found: {path}", "check the --calib-data path")
    try:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".jsonl"):
                texts = []
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise LlmqError(f"{path}:{lineno}: a .jsonl calibration line needs a string 'text' field")
                    texts.append(record["text"])
                return "\n\n".join(texts)
            return fh.read().replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise LlmqError(f"calibration file {path} is not UTF-8 text ({exc.reason})",
                        "give a .txt or .jsonl file, or an .npz of input_ids") from exc
    except json.JSONDecodeError as exc:
        raise LlmqError(f"calibration file {path} is not valid JSON lines: {exc.msg} at line {exc.lineno}") from exc


def load_calibration(path: str | None, tokenizer, samples: int, seq_len: int,
                     vocab_size: int | None = None) -> np.ndarray:
    """``[samples, seq_len]`` int64 token ids (an ``.npz`` gives its ``input_ids`` as they are)."""
    if samples < 1 or seq_len < 2:
        raise LlmqError(f"--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2 (got {samples}, {seq_len})")
    if path is not None and path.endswith(".npz"):
        if not os.path.isfile(path):
            raise LlmqError(f"calibration file not found: {path}", "check the --calib-data path")
        with np.load(path) as data:
            if "input_ids" not in data:
                raise LlmqError(f"{path} has no 'input_ids' array", f"it has: {', '.join(data.files) or 'nothing'}")
            ids = np.asarray(data["input_ids"]).astype(np.int64)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise LlmqError(f"{path}: input_ids must be [samples, seq_len] with seq_len ≥ 2, got {list(ids.shape)}")
        _check_ids(ids, vocab_size, path)
        if len(ids) < samples:
            logger.warning("%s holds %d calibration windows; using them instead of %d", path, len(ids), samples)
        return ids[:samples]
    if tokenizer is None:
        raise LlmqError("calibration text needs the model's tokenizer",
                        "pass --tokenizer <HF dir>, or keep the <model>.tokenizer folder llmq-export writes beside the model")
    if path is None:
        logger.warning("no --calib-data given: calibrating on the built-in default text (Python's pydoc topics)")
        text, origin = default_text(), "built-in default text"
    else:
        text, origin = read_text(path), path
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if len(ids) < seq_len:
        raise LlmqError(f"calibration text {origin} has {len(ids)} tokens, fewer than one window of {seq_len}",
                        "give more text or a smaller --calib-seq-len")
    n_windows = len(ids) // seq_len
    take = min(samples, n_windows)
    if take < samples:
        logger.warning("calibration text holds %d windows of %d tokens; using %d instead of %d",
                       n_windows, seq_len, take, samples)
    starts = np.linspace(0, n_windows - 1, take).round().astype(int) * seq_len
    batch = np.stack([ids[s:s + seq_len] for s in starts])
    _check_ids(batch, vocab_size, origin)
    return batch


def _check_ids(ids: np.ndarray, vocab_size: int | None, origin: str) -> None:
    if vocab_size is not None and (ids.max() >= vocab_size or ids.min() < 0):
        raise LlmqError(f"token ids from {origin} reach {int(ids.max())}, outside the model's vocabulary of {vocab_size}",
                        "the tokenizer does not match the model: use the model's own tokenizer")

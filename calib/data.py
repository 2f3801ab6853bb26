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

__all__ = ["default_text", "load_calibration", "load_holdout", "read_text"]

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
        ids = _npz_ids(path, vocab_size)
        if len(ids) < samples:
            logger.warning("%s holds %d calibration windows; using them instead of %d", path, len(ids), samples)
        return ids[:samples]
    ids, origin = _text_ids(path, tokenizer, warn=True)
    if len(ids) < seq_len:
        raise LlmqError(f"calibration text {origin} has {len(ids)} tokens, fewer than one window of {seq_len}",
                        "give more text or a smaller --calib-seq-len")
    n_windows = len(ids) // seq_len
    take = min(samples, n_windows)
    if take < samples:
        logger.warning("calibration text holds %d windows of %d tokens; using %d instead of %d",
                       n_windows, seq_len, take, samples)
    batch = np.stack([ids[s:s + seq_len] for s in _calibration_starts(n_windows, take, seq_len)])
    _check_ids(batch, vocab_size, origin)
    return batch


def load_holdout(path: str | None, tokenizer, samples: int, seq_len: int, count: int,
                 vocab_size: int | None = None) -> tuple:
    """``count`` windows of ``seq_len`` tokens that the calibration statistics never see, for verifying a
    compile: ``(ids [n, seq_len], where they come from, held_out)``. Taken from the same source — the text's
    windows :func:`load_calibration` skipped, or an ``.npz``'s rows after the first ``samples`` — else from
    the built-in text; when neither has any (an ``.npz`` of exactly ``samples`` rows and no tokenizer), the
    last calibration windows, with ``held_out`` False. ``(None, reason, False)`` if there is no data at all."""
    if path is not None and path.endswith(".npz"):
        ids = _npz_ids(path, vocab_size)
        if len(ids) >= samples + 1:
            return ids[samples:samples + count], f"{path} (rows {samples}–{min(len(ids), samples + count) - 1})", True
        if tokenizer is None:
            return ids[-count:], f"{path} (calibration rows: no spare rows and no tokenizer)", False
        spare, origin = _spare_windows(None, tokenizer, 0, seq_len, count)
    else:
        if tokenizer is None:
            return None, "no tokenizer for text", False
        spare, origin = _spare_windows(path, tokenizer, samples, seq_len, count)
        if spare is None and path is not None:
            spare, origin = _spare_windows(None, tokenizer, 0, seq_len, count)
    if spare is None:
        return None, "no text left over for held-out windows", False
    _check_ids(spare, vocab_size, origin)
    return spare, origin, True


def _spare_windows(path: str | None, tokenizer, samples: int, seq_len: int, count: int):
    """Up to ``count`` windows of ``path``'s text (the built-in text for None) that calibration did not take."""
    ids, origin = _text_ids(path, tokenizer, warn=False)
    n_windows = len(ids) // seq_len
    taken = set((_calibration_starts(n_windows, min(samples, n_windows), seq_len) // seq_len).tolist()) if samples else set()
    free = [w for w in range(n_windows) if w not in taken]
    if not free:
        return None, origin
    picks = [free[i] for i in np.linspace(0, len(free) - 1, min(count, len(free))).round().astype(int)]
    spare = np.stack([ids[w * seq_len:(w + 1) * seq_len] for w in picks])
    return spare, f"{origin} (windows calibration skipped)" if samples else origin


def _calibration_starts(n_windows: int, take: int, seq_len: int) -> np.ndarray:
    return np.linspace(0, n_windows - 1, take).round().astype(int) * seq_len


def _npz_ids(path: str, vocab_size: int | None) -> np.ndarray:
    if not os.path.isfile(path):
        raise LlmqError(f"calibration file not found: {path}", "check the --calib-data path")
    with np.load(path) as data:
        if "input_ids" not in data:
            raise LlmqError(f"{path} has no 'input_ids' array", f"it has: {', '.join(data.files) or 'nothing'}")
        ids = np.asarray(data["input_ids"]).astype(np.int64)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LlmqError(f"{path}: input_ids must be [samples, seq_len] with seq_len ≥ 2, got {list(ids.shape)}")
    _check_ids(ids, vocab_size, path)
    return ids


def _text_ids(path: str | None, tokenizer, warn: bool) -> tuple:
    """The whole text of ``path`` (the built-in text for None) as one stream of token ids, and its name."""
    if tokenizer is None:
        raise LlmqError("calibration text needs the model's tokenizer, and none was found",
                        "pass --tokenizer <HF dir> (llmq-export writes <model>.tokenizer beside the model), "
                        "or give token ids as --calib-data ids.npz (an input_ids [samples, seq_len] array)")
    if path is None:
        if warn:
            logger.warning("no --calib-data given: calibrating on the built-in default text (Python's pydoc topics)")
        text, origin = default_text(), "built-in default text"
    else:
        text, origin = read_text(path), path
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64), origin


def _check_ids(ids: np.ndarray, vocab_size: int | None, origin: str) -> None:
    if vocab_size is not None and (ids.max() >= vocab_size or ids.min() < 0):
        raise LlmqError(f"token ids from {origin} reach {int(ids.max())}, outside the model's vocabulary of {vocab_size}",
                        "the tokenizer does not match the model: use the model's own tokenizer")

"""Finding the model's tokenizer and checking that it fits the model's vocabulary."""

from __future__ import annotations

import logging
import os

from .ir.errors import LlmqError

__all__ = ["resolve_tokenizer", "check_tokenizer", "load_tokenizer"]

logger = logging.getLogger(__name__)


def resolve_tokenizer(explicit: str | None, beside_model: str) -> str | None:
    """The tokenizer folder to use: ``explicit`` if given (must exist), else the one beside the model."""
    if explicit:
        if not os.path.isdir(explicit):
            raise LlmqError(f"tokenizer folder not found: {explicit}", "give a local HF folder holding tokenizer.json")
        return explicit
    return beside_model if os.path.isdir(beside_model) else None


def load_tokenizer(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise LlmqError(f"cannot load a tokenizer from {path} ({type(exc).__name__})",
                        "give a HF folder with tokenizer.json / tokenizer_config.json") from exc
    if len(tok) == 0:
        raise LlmqError(f"the tokenizer folder {path} holds no vocabulary",
                        "give a HF folder with tokenizer.json / tokenizer_config.json (--tokenizer)")
    return tok


def check_tokenizer(path: str, vocab_size: int | None):
    """Load the tokenizer and refuse one whose vocabulary does not fit the model's embedding."""
    tok = load_tokenizer(path)
    if vocab_size is not None and len(tok) > vocab_size:
        raise LlmqError(f"tokenizer {path} has {len(tok)} tokens but the model's embedding has {vocab_size} rows",
                        "the tokenizer does not match the model: use the model's own tokenizer")
    return tok

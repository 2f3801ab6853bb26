"""Feeds for a decoder graph from token ids: the plain ``input_ids → logits`` graph, or the KV-cache decoder
(``position_ids``, ``attention_mask`` and empty ``past_key_values.*`` for a first, cache-less step); an
encoder's ``token_type_ids`` are all zero (one segment)."""

from __future__ import annotations

import numpy as np

__all__ = ["prompt_feeds", "is_kv_decoder", "input_specs", "session_specs"]

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def input_specs(tensors) -> list:
    """``(name, shape, dtype)`` of graph inputs (onnx-graphsurgeon tensors), as :func:`prompt_feeds` takes them."""
    return [(t.name, list(t.shape) if t.shape is not None else None, t.dtype) for t in tensors]


def session_specs(session) -> list:
    """``(name, shape, dtype)`` of an ONNX Runtime session's inputs, as :func:`prompt_feeds` takes them."""
    return [(i.name, i.shape, _ORT_FLOATS.get(i.type)) for i in session.get_inputs()]


def is_kv_decoder(inputs: list) -> bool:
    """Whether ``inputs`` — ``(name, shape)`` pairs — include a KV cache."""
    return any(spec[0].startswith("past_key_values.") for spec in inputs)


def prompt_feeds(inputs: list, ids: np.ndarray, past: dict | None = None) -> dict:
    """Feeds for running ``ids [batch, seq]`` through a graph with ``inputs`` (``(name, shape[, dtype])``; shape
    entries ints or symbolic names; dtype the cache's float type, float32 if not given). ``past``: the previous step's ``present.*`` outputs by input name, or None
    for an empty cache. Inputs not named here (e.g. a pass's own switches) are left to the caller."""
    ids = np.ascontiguousarray(ids)  # token ids; any other graph's single input passes through as it is
    batch, seq = ids.shape[:2]
    start = 0
    if past:
        start = next(iter(past.values())).shape[2]
    feeds = {}
    for spec in inputs:
        name, shape = spec[0], spec[1]
        if name == "input_ids":
            feeds[name] = ids
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), (batch, seq)).copy()
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, start + seq), np.int64)
        elif name == "token_type_ids":  # an encoder's segment ids: one segment
            feeds[name] = np.zeros((batch, seq), np.int64)
        elif name.startswith("past_key_values."):
            if past and name in past:
                feeds[name] = past[name]
            else:
                dims = [d if isinstance(d, int) else 0 for d in (shape or [])]
                if len(dims) != 4:
                    raise ValueError(f"cache input {name} has shape {shape}, expected [batch, heads, past, head_dim]")
                dtype = spec[2] if len(spec) > 2 and spec[2] is not None else np.float32
                feeds[name] = np.zeros((batch, dims[1], 0, dims[3]), dtype)
    if "input_ids" not in feeds and inputs:
        feeds[inputs[0][0]] = ids  # a graph whose token input has another name
    return feeds

"""KV-cache quantization: Q/DQ on the keys and values where they enter attention.

``Q/DQ`` is placed on the second input of the score MatMul (``Q·Kᵀ``: the keys after RoPE) and of the context
MatMul (``P·V``: the values) — the tensors a KV cache stores, and where TensorRT's fused attention takes its
quantized inputs. Whatever layout ops (repeat-kv for GQA, transposes) sit between the cache and the MatMul
copy values without changing them, so quantizing here is quantizing the cache; under GQA the repeated heads
carry identical values, so per-head scales stay shared by the query heads of a group.

Granularity: ``per-tensor`` (INT8, symmetric — TensorRT-deployable) or ``per-head`` (one scale per head on
axis 1 of the ``[batch, heads, ·, ·]`` tensor; INT8 or INT4, for ONNX Runtime: TensorRT takes per-tensor
activation scales only), or ``format: fp8`` — FP8 E4M3 per tensor, ``s = amax / 448`` (TensorRT's FP8 KV
cache). Scales come from calibration statistics (the observer's range for per-tensor, the
per-head max for per-head). Run after ``smooth-attention``, which shrinks the keys' outlier channels first.

``per-token-head`` (QServe's KV4: asymmetric, dynamic, one scale and zero per token and head, over the head's
channels — the head-dim axis, ``−2`` of the keys as ``Q·Kᵀ`` reads them, ``−1`` of the values): computed in the
graph as each token enters the cache, ``s = (max − min) / (2^b − 1)``, ``z = −min / s`` (a float zero, as
QServe's kernel keeps it), ``x̂ = (clip(round(x / s + z), 0, 2^b − 1) − z) · s``. Written as plain arithmetic
(ReduceMin/Max, Div, Round, Clip, Sub, Mul): ONNX's Q/DQ zero points are integers. ONNX Runtime only; needs no
calibration. ``group_size`` splits a head's channels into groups with a scale and zero each (a Reshape around the
same arithmetic): 5 bits a value at 32 channels with a 16-bit scale and zero, against 4.5 for a 64-wide head.

``per-channel`` (KVQuant's per-channel keys, here after RoPE): static and asymmetric, one calibrated scale and
zero per head and channel (the min and max over every calibration token), the same arithmetic with constant
scales: 4 bits a value, nothing stored per token. Keys have outlier *channels*, which a per-token scale spreads
over the token's other channels; a per-channel range isolates them. ``keep_first`` (per-token-head and
per-channel): the first ``N`` tokens of the cache stay float (IntactKV, KVQuant's attention-sink-aware
quantization): the attention sink's keys lie far outside every other token's range, and a calibrated range
that took them in would coarsen the rest (they are left out of the calibration statistics too). ``N`` float
tokens a head cost ``N · 16`` bits, nothing per further token. It counts positions in the cache as attention
reads it: for a decoder whose cache starts at position 0 (not a sliding window that has moved on), the first
tokens of the text. ``observer: mse`` (per-channel) shrinks each channel's range about its centre to the
factor of ``CLIP_GRID`` with the least squared error over the calibration tokens (a second stream): the few
tokens beyond it are clipped, the many within it get finer steps.

``per-channel-group`` (KIVI's keys; ``tensors: [k]`` only): per head and channel, a scale and float zero over each
run of ``token_group`` tokens (after the first ``keep_first``), dynamic — from the group's own min and max, no
calibration. A cache quantizes a group once its last token has arrived and holds the newer tokens in float, so
the query at position ``p`` sees key ``j`` quantized only if ``j``'s group is complete by ``p``: the scores are
``Where(mask, Q·K̂ᵀ, Q·Kᵀ)``, two MatMuls, the mask from the positions (the queries are the last ``Tq`` of the
``T`` keys). No group's range ever uses a token after the query, and a KV-cache decoder gives step by step the
whole-sequence graph's logits. ``4 + 32 / token_group`` bits a key (a 16-bit scale and zero per channel and
group), plus at most ``token_group − 1`` float tokens a head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from ..calib.observers import OBSERVERS, amax
from ..ir.graph import PROVENANCE_KEY, Graph
from ..ir.passes import Pass, PassContext, PassResult
from .qdq_math import FP8, FP8_MAX, qmax, representable_scale

__all__ = ["CLIP_GRID", "QuantizeKVCachePass"]

# observer: mse on a per-channel cache: the shrinks of each channel's calibrated range searched (1 = min/max)
CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.0, 0.95, …, 0.3

logger = logging.getLogger(__name__)

_ARITHMETIC = ("per-token-head", "per-channel", "per-channel-group")  # written as arithmetic, asymmetric


def _past_kept(value: np.ndarray, token_axis: int, keep: int):
    """``(value without its first keep tokens along token_axis (−1 or −2), that axis as a non-negative index)``,
    or None for a tensor of fewer than 3 axes or with no token left."""
    if value.ndim < 3:
        return None
    axis = value.ndim + token_axis
    value = value[(slice(None),) * axis + (slice(keep, None),)]
    return (value, axis) if value.shape[axis] else None


class QuantizeKVCachePass(Pass):
    """Fake-quantize (explicit Q/DQ) the key and value inputs of every attention block found.

    Declines: blocks whose key/value input is already quantized (Q/DQ, or this pass's own arithmetic, known by
    its provenance — also in a compiled model loaded again), excluded layers (``layers.N.attn``),
    tensors with a zero calibrated range, per-head on a tensor that is not 4-D.
    """

    name = "quantize-kv-cache"
    phase = "quantize"
    changes_activations = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 8
        format: str = "int"  # int | fp8 (E4M3, 8 bits, per tensor)
        granularity: str = "per-tensor"
        observer: str = "minmax"  # per-tensor; per-channel: minmax or mse (a searched clip); per-head: each head's max
        tensors: tuple = ("k", "v")
        group_size: int = 0  # per-token-head only: a scale and zero per this many channels of a head (0: the head)
        keep_first: int = 0  # per-token-head, per-channel(-group): the first N tokens of the cache stay float (sinks)
        token_group: int = 32  # per-channel-group: the tokens a channel's scale and zero cover (KIVI's group)

        def __post_init__(self):
            object.__setattr__(self, "tensors", tuple(self.tensors))
            if self.bits not in (4, 8):
                raise ValueError("KV-cache bits must be 8 or 4")
            if self.granularity not in ("per-tensor", "per-head", "per-token-head", "per-channel", "per-channel-group"):
                raise ValueError("KV-cache granularity must be per-tensor, per-head, per-token-head, per-channel or "
                                 "per-channel-group")
            if self.granularity in _ARITHMETIC and self.format != "int":
                raise ValueError(f"a {self.granularity} KV cache is integer (asymmetric)")
            if self.format not in ("int", "fp8"):
                raise ValueError(f"format must be int or fp8, not {self.format!r}")
            if self.format == "fp8" and (self.bits != 8 or self.granularity != "per-tensor"):
                raise ValueError("an FP8 KV cache is 8 bits, per tensor")
            if self.bits == 4 and self.granularity == "per-tensor":
                raise ValueError("4-bit KV cache needs granularity: per-head or per-token-head")
            if self.observer not in OBSERVERS:
                raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}")
            if self.granularity == "per-channel" and self.observer not in ("minmax", "mse"):
                raise ValueError("a per-channel KV cache takes observer: minmax or mse")
            if self.group_size and (self.granularity != "per-token-head" or self.group_size < 2):
                raise ValueError("group_size (≥ 2 channels) is for granularity: per-token-head")
            if self.keep_first < 0 or (self.keep_first and self.granularity not in _ARITHMETIC):
                raise ValueError("keep_first (≥ 0 tokens) is for granularity: per-token-head, per-channel or "
                                 "per-channel-group")
            if self.token_group < 2:
                raise ValueError("token_group must be ≥ 2 tokens")
            if self.granularity == "per-channel-group" and self.tensors != ("k",):
                raise ValueError("per-channel-group is for the keys (tensors: [k]); KIVI quantizes values per token "
                                 "(per-token-head)")
            if not self.tensors or set(self.tensors) - {"k", "v"}:
                raise ValueError("tensors must be a subset of [k, v]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        nodes = graph.node_by_name()
        targets = []  # (where, which, MatMul node)
        for block in ctx.structure(graph).attention:
            where = f"layers.{block['layer']}.attn"
            if ctx.exclude(where, block["scores"]):
                ctx.decline(self.name, where, "excluded by --exclude")
                continue
            for which, key in (("k", "scores"), ("v", "context")):
                if which not in o.tensors:
                    continue
                mm = nodes[block[key]]
                producer = Graph.producer(mm.inputs[1])
                # a Q/DQ, or this pass's own arithmetic (by provenance, which a compiled model keeps): a model
                # compiled once and compiled again must not have its cache rounded twice
                if producer is not None and producer.op == "DequantizeLinear" or self._made_here(graph, producer) \
                        or self._made_here(graph, mm):
                    ctx.decline(self.name, f"{where}.{which}", "already quantized")
                    continue
                targets.append((where, which, mm))
        if not targets:
            return PassResult(False, {"quantized_tensors": 0})
        if o.granularity in _ARITHMETIC:
            return self._arithmetic(graph, ctx, targets)
        stats = ctx.activation_stats(graph, sorted({mm.inputs[1].name for _, _, mm in targets}))
        done = 0
        for where, which, mm in targets:
            x = mm.inputs[1]
            st = stats[x.name]
            if o.granularity == "per-head":
                if st.head_absmax is None:
                    ctx.decline(self.name, f"{where}.{which}", "per-head needs a 4-D [batch, heads, ., .] tensor")
                    continue
                scale = (np.where(st.head_absmax > 0, st.head_absmax, 1.0) / qmax(o.bits)).astype(np.float32)
                rng = float(st.head_absmax.max())
            else:
                rng = amax(st, o.observer, qmax(o.bits))
                scale = np.asarray(rng / (FP8_MAX if o.format == "fp8" else qmax(o.bits)), np.float32)
            if rng <= 0.0:
                ctx.decline(self.name, f"{where}.{which}", "calibrated range is zero")
                continue
            mm.inputs[1] = self._qdq(graph, x, scale, f"{where}.{which}_cache")
            ctx.record(where, **{f"kv_{which}_bits": o.bits, f"kv_{which}_format": "fp8e4m3" if o.format == "fp8" else "int", f"kv_{which}_granularity": o.granularity,
                                 f"kv_{which}_amax": rng,
                                 f"kv_{which}_head_amax": [float(v) for v in np.atleast_1d(st.head_absmax)]
                                 if st.head_absmax is not None else None})
            done += 1
        return PassResult(done > 0, {"quantized_tensors": done, "bits": o.bits, "granularity": o.granularity})

    def _made_here(self, graph: Graph, node: gs.Node | None) -> bool:
        return node is not None and graph.node_metadata.get(node.name, {}).get(PROVENANCE_KEY) == self.name

    def _arithmetic(self, graph: Graph, ctx: PassContext, targets: list) -> PassResult:
        """per-token-head (dynamic) and per-channel (static, calibrated): asymmetric with a float zero, written
        as arithmetic; ``keep_first`` tokens passed through float."""
        o = self.options
        ranges = self._channel_ranges(graph, ctx, targets) if o.granularity == "per-channel" else {}
        done = 0
        for where, which, mm in targets:
            x = mm.inputs[1]
            channel_axis, token_axis = (-2, -1) if which == "k" else (-1, -2)  # Kᵀ is [b, h, d, T]; V [b, h, T, d]
            base = f"{where}.{which}_cache"
            if o.granularity == "per-channel":
                if x.name not in ranges:
                    ctx.decline(self.name, f"{where}.{which}", "per-channel needs a [batch, heads, ., .] tensor with "
                                f"more than keep_first={o.keep_first} tokens in calibration")
                    continue
                lo, hi, *beta = ranges[x.name]
                out = self._static(graph, x, lo, hi, base)
                granularity, bits_per_value = "per-channel static asymmetric (calibrated min/max)", float(o.bits)
                extra = {f"kv_{which}_channel_amax": float(np.maximum(np.abs(lo), np.abs(hi)).max())}
                if beta:
                    granularity = "per-channel static asymmetric (calibrated range, clip searched for least error)"
                    extra[f"kv_{which}_mean_clip"] = round(float(np.mean(beta[0])), 4)
            elif o.granularity == "per-channel-group":
                if x.shape is None or len(x.shape) != 4:
                    ctx.decline(self.name, f"{where}.{which}", "per-channel-group needs a 4-D [batch, heads, "
                                "channels, tokens] key tensor")
                    continue
                self._causal_token_groups(graph, mm, base)
                first = f", first {o.keep_first} token(s) float" if o.keep_first else ""
                ctx.record(where, **{f"kv_{which}_bits": o.bits, f"kv_{which}_format": "int",
                                     f"kv_{which}_granularity": f"per-channel dynamic asymmetric over groups of "
                                     f"{o.token_group} tokens (KIVI), an incomplete last group float{first}",
                                     f"kv_{which}_bits_per_value": o.bits + 2 * 16 / o.token_group,
                                     f"kv_{which}_float_tokens": o.keep_first})
                done += 1
                continue
            else:
                width = x.shape[channel_axis] if x.shape is not None else None
                group = o.group_size or width
                if o.group_size and not (isinstance(width, int) and width % group == 0):
                    ctx.decline(self.name, f"{where}.{which}", f"group_size {group} does not divide the head's "
                                f"{width if isinstance(width, int) else 'unknown number of'} channels")
                    continue
                out = self._dynamic(graph, x, channel_axis, base, o.group_size and width)
                granularity = "per-token-head dynamic asymmetric" + (f", groups of {group} channels" if o.group_size else "")
                bits_per_value = o.bits + 2 * 16 / group if isinstance(group, int) else None
                extra = {}
            if o.keep_first:
                out = self._keep_first(graph, x, out, token_axis, base)
                granularity += f", first {o.keep_first} token(s) float"
            mm.inputs[1] = out
            ctx.record(where, **{f"kv_{which}_bits": o.bits, f"kv_{which}_format": "int",
                                 f"kv_{which}_granularity": granularity,
                                 f"kv_{which}_bits_per_value": bits_per_value,
                                 f"kv_{which}_float_tokens": o.keep_first}, **extra)
            done += 1
        stats = {"quantized_tensors": done, "bits": o.bits, "granularity": o.granularity, "keep_first": o.keep_first}
        if o.granularity == "per-channel":
            stats["observer"] = o.observer
        if o.granularity == "per-token-head":
            stats["group_size"] = o.group_size or "head"
        return PassResult(done > 0, stats)

    def _channel_ranges(self, graph: Graph, ctx: PassContext, targets: list) -> dict:
        """``{tensor: (min, max)}`` per head and channel (reduced over the batch and token axes, kept as size-1
        axes so they broadcast), over every calibration batch (streamed when the context can), leaving out the
        first ``keep_first`` tokens. Tensors of fewer than 3 axes, or with no token past those, are left out."""
        token_axis = {mm.inputs[1].name: (-1 if which == "k" else -2) for _, which, mm in targets}
        acc: dict = {}
        keep = self.options.keep_first

        def each(name, value):
            cut = _past_kept(value, token_axis[name], keep)
            if cut is None:
                return
            value, axis = cut
            lo = value.min(axis=(0, axis), keepdims=True).astype(np.float64)
            hi = value.max(axis=(0, axis), keepdims=True).astype(np.float64)
            if name in acc:
                lo, hi = np.minimum(acc[name][0], lo), np.maximum(acc[name][1], hi)
            acc[name] = (lo, hi)

        ctx.stream(graph, sorted(token_axis), each)
        if self.options.observer == "mse" and acc:
            acc = self._clip_search(graph, ctx, acc, token_axis)
        return acc

    def _clip_search(self, graph: Graph, ctx: PassContext, ranges: dict, token_axis: dict) -> dict:
        """``observer: mse``: per head and channel, the range ``[c − β·h, c + β·h]`` (``c``, ``h``: the calibrated
        range's centre and half-width, ``β`` in ``CLIP_GRID``) whose quantization gives the least squared error
        over the calibration tokens (a second stream), the rest clipped; each candidate is scored with the scale
        and zero point the graph would hold (:meth:`_scale_zero`). The ranges' keys gain a third item, ``β`` per
        channel. A channel's squared error adds to the attention logits' independently of the others' (weighted
        by its query's mean square, a constant per channel), so each channel's best β is the logits'."""
        levels = float(2 ** self.options.bits - 1)
        grid = np.asarray(CLIP_GRID, np.float64)
        candidates = {}
        for name, (lo, hi) in ranges.items():
            centre, half = (lo + hi) / 2, (hi - lo) / 2
            candidates[name] = [tuple(a.astype(np.float64) for a in
                                      self._scale_zero(graph, centre - beta * half, centre + beta * half))
                                for beta in grid]
        errors: dict = {}

        def each(name, value):
            cut = _past_kept(value, token_axis[name], self.options.keep_first)
            if cut is None:
                return
            value, axis = cut
            value = value.astype(np.float64)
            sums = []
            for s, z in candidates[name]:
                diff = (np.clip(np.rint(value / s + z), 0, levels) - z) * s - value
                sums.append(np.sum(diff * diff, axis=(0, axis), keepdims=True))
            errors[name] = errors.get(name, 0.0) + np.stack(sums)

        ctx.stream(graph, sorted(ranges), each)
        out = {}
        for name, (lo, hi) in ranges.items():
            if name not in errors:
                out[name] = (lo, hi, np.ones_like(lo))
                continue
            beta = grid[np.argmin(errors[name], axis=0)]
            centre, half = (lo + hi) / 2, (hi - lo) / 2
            out[name] = (centre - beta * half, centre + beta * half, beta)
        return out

    def _scale_zero(self, graph: Graph, lo: np.ndarray, hi: np.ndarray) -> tuple:
        """The scale (in the graph's float type, rounded up to a value it can hold) and float32 zero point of the
        range ``[lo, hi]``, as :meth:`_static` writes them."""
        levels = float(2 ** self.options.bits - 1)
        tiny = float(np.finfo(np.float16).tiny) if graph.float_dtype == np.float16 else 1e-30
        s = representable_scale((np.maximum(hi - lo, levels * tiny) / levels).astype(np.float32), graph.float_dtype)
        return s, (-lo / s.astype(np.float64)).astype(np.float32)

    def _static(self, graph: Graph, x: gs.Tensor, lo: np.ndarray, hi: np.ndarray, base: str) -> gs.Variable:
        """``x̂ = (clip(round(x / s + z), 0, 2^b − 1) − z) · s`` with a constant ``s`` and float ``z`` per channel
        (shapes that broadcast against ``x``), from the calibrated ``[lo, hi]``."""
        s_values, z_values = self._scale_zero(graph, lo, hi)
        s = graph.make_constant(f"{base}_scale", s_values, self.name)
        z = graph.make_constant(f"{base}_zero", z_values, self.name)
        return self._codes_and_back(graph, x, s, z, base, f"{base}_dq", x.shape)

    def _codes_and_back(self, graph: Graph, x, s, z, base: str, out: str, out_shape) -> gs.Variable:
        """``(clip(round(x / s + z), 0, 2^b − 1) − z) · s`` for a scale ``s`` and float zero ``z`` (constants or
        tensors that broadcast against ``x``)."""
        p, levels = self.name, float(2 ** self.options.bits - 1)
        shifted = graph.make_node("Add", [graph.make_node("Div", [x, s], f"{base}_steps", p, out_dtype=np.float32), z],
                                  f"{base}_shifted", p, out_dtype=np.float32)
        q = graph.make_node("Clip", [graph.make_node("Round", [shifted], f"{base}_round", p, out_dtype=np.float32),
                                     graph.make_constant(f"{base}_qmin", np.asarray(0, np.float32), p),
                                     graph.make_constant(f"{base}_qmax", np.asarray(levels, np.float32), p)],
                            f"{base}_codes", p, out_dtype=np.float32)
        return graph.make_node("Mul", [graph.make_node("Sub", [q, z], f"{base}_centred", p, out_dtype=np.float32), s],
                               out, p, out_dtype=np.float32, out_shape=out_shape)

    def _keep_first(self, graph: Graph, x: gs.Tensor, dq: gs.Tensor, token_axis: int, base: str) -> gs.Variable:
        """``Where(position < keep_first, x, x̂)`` along ``token_axis`` (−1 or −2): the first tokens of the cache
        pass through float."""
        p = self.name
        shape = graph.make_node("Shape", [x], f"{base}_shape_t", p, out_dtype=np.int64)
        count = graph.make_node("Gather", [shape, graph.make_constant(f"{base}_token_axis", np.asarray(token_axis, np.int64), p)],
                                f"{base}_tokens", p, {"axis": 0}, out_dtype=np.int64, out_shape=[])
        positions = graph.make_node("Range", [graph.make_constant(f"{base}_start", np.asarray(0, np.int64), p), count,
                                              graph.make_constant(f"{base}_step", np.asarray(1, np.int64), p)],
                                    f"{base}_positions", p, out_dtype=np.int64)
        first = graph.make_node("Less", [positions, graph.make_constant(f"{base}_keep_first", np.asarray(self.options.keep_first, np.int64), p)],
                                f"{base}_first", p, out_dtype=np.bool_)
        if token_axis == -2:  # [T] → [T, 1], to broadcast over the channels after the tokens
            first = graph.make_node("Unsqueeze", [first, graph.make_constant(f"{base}_unsq", np.asarray([1], np.int64), p)],
                                    f"{base}_first_col", p, out_dtype=np.bool_)
        return graph.make_node("Where", [first, x, dq], f"{base}_kept", p, out_dtype=np.float32, out_shape=x.shape)

    def _dynamic(self, graph: Graph, x: gs.Tensor, axis: int, base: str, width: int = 0) -> gs.Variable:
        """Asymmetric fake quantization of ``x`` with a scale and a float zero per slice along ``axis`` (−2 or −1
        of a 4-D tensor); with ``width`` (the axis' size), per group of ``group_size`` along it: the axis is
        split in two (a Reshape), reduced over the inner one, and the result reshaped back."""
        if not width:
            return self._min_max_fake_quant(graph, x, axis, base, f"{base}_dq", x.shape)
        g = self.options.group_size
        # Reshape's 0 copies the input's dimension: [b, h, d, T] → [b, h, d/g, g, T]; [b, h, T, d] → [b, h, T, d/g, g]
        split = [0, 0, width // g, g, -1] if axis == -2 else [0, 0, 0, width // g, g]
        return self._grouped(graph, x, graph.make_constant(f"{base}_groups", np.asarray(split, np.int64), self.name),
                             axis, base)

    def _causal_token_groups(self, graph: Graph, mm: gs.Node, base: str) -> None:
        """KIVI's keys at the score MatMul ``Q·Kᵀ`` (``Kᵀ`` ``[b, h, d, T]``): per head and channel, a scale and
        float zero over each run of ``token_group`` tokens after the first ``keep_first``; a cache quantizes a
        group once it is full and holds the newer tokens (and the kept first ones) in float. So the query at
        position ``p`` (the last ``Tq`` of the ``T`` keys) sees key ``j`` quantized iff ``keep_first ≤ j <
        keep_first + ⌊(p + 1 − keep_first) / g⌋·g``: the scores are ``Where(that, Q·K̂ᵀ, Q·Kᵀ)``, two MatMuls. A
        group's range never uses a token after the query, and a KV-cache decoder gives, step by step, the
        logits the whole-sequence graph gives (tested)."""
        p, g, kf = self.name, self.options.token_group, self.options.keep_first
        q_in, kt = mm.inputs[0], mm.inputs[1]
        i64 = lambda name, v: graph.make_constant(f"{base}_{name}", np.asarray(v, np.int64), p)  # noqa: E731
        node = lambda op, ins, name, attrs=None, dtype=np.int64: graph.make_node(  # noqa: E731
            op, ins, f"{base}_{name}", p, attrs, out_dtype=dtype)
        shape = node("Shape", [kt], "k_shape")
        keys = node("Slice", [shape, i64("t0", [3]), i64("t1", [4])], "keys")  # [1]: T
        grouped_n = node("Mul", [node("Div", [node("Max", [node("Sub", [keys, i64("kf", [kf])], "after_kept"),
                                                            i64("nil", [0])], "after_kept_pos"),
                                              i64("g", [g])], "groups"), i64("g_m", [g])], "grouped_n")
        axes = i64("axes", [3])
        kept = node("Slice", [kt, i64("zero", [0]), i64("kf_end", [kf]), axes], "kept", dtype=np.float32)
        start = i64("kf_start", [kf])
        end = node("Add", [start, grouped_n], "grouped_end")
        middle = node("Slice", [kt, start, end, axes], "grouped_part", dtype=np.float32)
        rest = node("Slice", [kt, end, i64("end", [np.iinfo(np.int64).max]), axes], "residual", dtype=np.float32)
        split = node("Concat", [node("Slice", [shape, i64("pre_s", [0]), i64("pre_e", [3])], "pre"), i64("split", [-1, g])],
                     "split_shape", {"axis": 0})
        dq = node("Concat", [kept, self._grouped(graph, middle, split, -1, base), rest], "dq", {"axis": 3},
                  dtype=np.float32)
        scores_f = mm.outputs[0]
        scores_q = graph.make_node("MatMul", [q_in, dq], f"{base}_scores_q", p, out_dtype=np.float32)
        # the mask [Tq, T]: key j quantized for the query at position p = T − Tq + i
        queries = node("Slice", [node("Shape", [q_in], "q_shape"), i64("q0", [-2]), i64("q1", [-1])], "queries")
        scalar = lambda t, name: node("Squeeze", [t, i64(f"{name}_ax", [0])], name)  # noqa: E731
        t_all, t_q = scalar(keys, "keys_s"), scalar(queries, "queries_s")
        one = i64("one", 1)
        positions = node("Range", [node("Sub", [t_all, t_q], "first_query"), t_all, one], "q_positions")
        seen = node("Sub", [node("Add", [positions, one], "q_seen"), i64("kf_s", kf)], "q_after_kept")
        limit = node("Add", [node("Mul", [node("Div", [node("Max", [seen, i64("nil_s", 0)], "q_after_kept_pos"),
                                                       i64("g_s", g)], "q_groups"), i64("g_ms", g)], "q_grouped"),
                             i64("kf_a", kf)], "q_limit")
        key_pos = node("Range", [i64("k0", 0), t_all, one], "k_positions")
        below = node("Less", [node("Unsqueeze", [key_pos, i64("k_ax", [0])], "k_row"),
                              node("Unsqueeze", [limit, i64("q_ax", [1])], "q_col")], "below_limit", dtype=np.bool_)
        mask = node("And", [below, node("GreaterOrEqual", [key_pos, i64("kf_g", kf)], "past_kept", dtype=np.bool_)],
                    "quantized", dtype=np.bool_) if kf else below
        consumers = list(scores_f.outputs)
        out = graph.make_node("Where", [mask, scores_q, scores_f], f"{base}_scores", p, out_dtype=np.float32,
                              out_shape=scores_f.shape)
        for c in consumers:
            for i, t in enumerate(c.inputs):
                if t is scores_f:
                    c.inputs[i] = out

    def _grouped(self, graph: Graph, x: gs.Tensor, split, axis: int, base: str) -> gs.Variable:
        """``x`` reshaped to ``split`` (a constant or tensor shape), fake-quantized per slice along ``axis`` of
        that shape, and reshaped back."""
        p = self.name
        grouped = graph.make_node("Reshape", [x, split], f"{base}_grouped", p, out_dtype=np.float32)
        dq = self._min_max_fake_quant(graph, grouped, axis, base, f"{base}_dq_grouped", None)
        shape = graph.make_node("Shape", [x], f"{base}_shape", p, out_dtype=np.int64)
        return graph.make_node("Reshape", [dq, shape], f"{base}_dq_full", p, out_dtype=np.float32, out_shape=x.shape)

    def _min_max_fake_quant(self, graph: Graph, x: gs.Tensor, axis: int, base: str, out: str, out_shape) -> gs.Variable:
        """``(clip(round(x / s + z), 0, 2^b − 1) − z) · s`` with ``s = (max − min) / (2^b − 1)``, ``z = −min / s``
        over ``axis`` (kept), computed in the graph."""
        p, levels = self.name, float(2 ** self.options.bits - 1)
        axes = graph.make_constant(f"{base}_axes", np.asarray([axis], np.int64), p)
        lo = graph.make_node("ReduceMin", [x, axes], f"{base}_min", p, {"keepdims": 1}, out_dtype=np.float32)
        hi = graph.make_node("ReduceMax", [x, axes], f"{base}_max", p, {"keepdims": 1}, out_dtype=np.float32)
        span = graph.make_node("Sub", [hi, lo], f"{base}_span", p, out_dtype=np.float32)
        tiny = float(np.finfo(np.float16).tiny) if graph.float_dtype == np.float16 else 1e-30
        span = graph.make_node("Max", [span, graph.make_constant(f"{base}_floor", np.asarray(levels * max(tiny, 1e-30), np.float32), p)],
                               f"{base}_span_pos", p, out_dtype=np.float32)
        s = graph.make_node("Div", [span, graph.make_constant(f"{base}_levels", np.asarray(levels, np.float32), p)],
                            f"{base}_scale", p, out_dtype=np.float32)
        z = graph.make_node("Neg", [graph.make_node("Div", [lo, s], f"{base}_min_steps", p, out_dtype=np.float32)],
                            f"{base}_zero", p, out_dtype=np.float32)
        return self._codes_and_back(graph, x, s, z, base, out, out_shape)

    def _qdq(self, graph: Graph, x: gs.Tensor, scale: np.ndarray, base: str) -> gs.Variable:
        bits = self.options.bits
        if self.options.format == "fp8":
            zp = graph.make_constant(f"{base}_zero_point", np.zeros(scale.shape, FP8), self.name)
            qtype = None  # FP8: left to shape inference, as INT4
        elif bits == 4:  # the zero point's type names the quantized type
            zp = graph.make_constant(f"{base}_zero_point", np.zeros(scale.shape, ml_dtypes.int4), self.name)
            qtype = None  # INT4: left to shape inference (onnx-graphsurgeon has no 4-bit numpy type)
        else:
            zp = graph.make_constant(f"{base}_zero_point", np.zeros(scale.shape, np.int8), self.name)
            qtype = np.int8
        s = graph.make_constant(f"{base}_scale", representable_scale(scale, graph.float_dtype), self.name)
        attrs = {"axis": 1} if scale.ndim else {}
        q = graph.make_node("QuantizeLinear", [x, s, zp], f"{base}_q", self.name, attrs, out_dtype=qtype,
                            out_shape=x.shape if qtype is not None else None)
        return graph.make_node("DequantizeLinear", [q, s, zp], f"{base}_dq", self.name, attrs,
                               out_dtype=np.float32, out_shape=x.shape)

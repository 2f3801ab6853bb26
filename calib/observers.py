"""Streaming activation statistics and the observers that turn them into a quantization range.

:class:`TensorStats` is updated batch by batch and never keeps the activations: min, max, per-channel
absmax (last axis; for 4-D tensors also per axis 1, the heads of attention tensors) and a histogram of ``|x|`` whose range doubles when a larger value arrives (two
adjacent bins merge), so memory is fixed whatever the number of samples.

Observers (``amax(stats, method)``):

* ``minmax`` — ``max(|min|, |max|)``;
* ``percentile`` — the ``p``-th percentile of ``|x|`` (default 99.99);
* ``mse`` — the clip value minimising the expected squared error of symmetric quantization over the
  histogram (rounding error ``Δ²/12`` inside, ``(|x| − amax)²`` outside, ``Δ = amax / qmax``);
* ``entropy`` — TensorRT's KL calibration: the clip value whose 128-level quantized distribution has the
  least KL divergence from the clipped reference distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TensorStats", "amax", "OBSERVERS"]

OBSERVERS = ("minmax", "percentile", "mse", "entropy")


@dataclass
class TensorStats:
    bins: int = 2048
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    channel_absmax: np.ndarray | None = None
    head_absmax: np.ndarray | None = None  # 4-D tensors ([batch, heads, seq, dim] in attention): per axis 1
    hist: np.ndarray | None = None
    hist_range: float = 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        self.count += x.size
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        a = np.abs(x)
        ch = a.reshape(-1, a.shape[-1]).max(axis=0) if a.ndim >= 1 else a.reshape(1)
        self.channel_absmax = ch if self.channel_absmax is None else np.maximum(self.channel_absmax, ch)
        if a.ndim == 4:
            heads = a.max(axis=(0, 2, 3))
            self.head_absmax = heads if self.head_absmax is None else np.maximum(self.head_absmax, heads)
        peak = float(ch.max())
        if self.hist is None:
            self.hist = np.zeros(self.bins, dtype=np.int64)
            self.hist_range = peak if peak > 0 else 1.0
        while peak > self.hist_range:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([merged, np.zeros(self.bins // 2, dtype=np.int64)])
            self.hist_range *= 2.0
        counts, _ = np.histogram(a, bins=self.bins, range=(0.0, self.hist_range))
        self.hist += counts

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def bin_edges(self) -> np.ndarray:
        return np.linspace(0.0, self.hist_range, self.bins + 1)


def amax(stats: TensorStats, method: str = "minmax", qmax: int = 127, percentile: float = 99.99) -> float:
    """The clipping range for symmetric quantization of the tensor described by ``stats``."""
    if stats.count == 0:
        raise ValueError("no calibration data reached this tensor")
    full = stats.absmax
    if method == "minmax" or full == 0.0:
        return full
    edges = stats.bin_edges()
    hist = stats.hist.astype(np.float64)
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(edges[min(i + 1, len(edges) - 1)], full))
    if method == "mse":
        return float(min(_mse_amax(hist, edges, qmax), full))
    if method == "entropy":
        return float(min(_entropy_amax(stats.hist, edges, levels=qmax + 1), full))
    raise ValueError(f"unknown observer '{method}' (choose from {', '.join(OBSERVERS)})")


def _mse_amax(hist: np.ndarray, edges: np.ndarray, qmax: int) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    nonzero = np.nonzero(hist)[0]
    last = int(nonzero[-1]) + 1 if len(nonzero) else len(hist)
    candidates = edges[max(1, last // 64):last + 1:max(1, last // 512)]
    best, best_err = edges[last], math.inf
    for c in candidates:
        delta = c / qmax
        inside = centers <= c
        err = (hist[inside].sum() * delta * delta / 12.0) + (hist[~inside] * (centers[~inside] - c) ** 2).sum()
        if err < best_err:
            best, best_err = c, err
    return float(best)


def _entropy_amax(hist: np.ndarray, edges: np.ndarray, levels: int = 128, stride: int = 1) -> float:
    """TensorRT-style KL-divergence calibration over a histogram of |x|."""
    hist = hist.astype(np.float64)
    nbins = len(hist)
    nonzero = np.nonzero(hist)[0]
    last = int(nonzero[-1]) + 1 if len(nonzero) else nbins
    if last <= levels:
        return float(edges[last])
    best_i, best_kl = last, math.inf
    for i in range(levels, last + 1, stride):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()
        # quantize the first i bins into `levels` buckets, spread back over the non-empty source bins
        src = hist[:i]
        bucket = (np.arange(i) * levels) // i
        sums = np.bincount(bucket, weights=src, minlength=levels)
        nonempty = np.bincount(bucket, weights=(src > 0).astype(np.float64), minlength=levels)
        q = np.where(src > 0, sums[bucket] / np.maximum(nonempty[bucket], 1), 0.0)
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q = q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(edges[best_i])

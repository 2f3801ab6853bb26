"""Streaming statistics and the observers that turn them into ranges."""

from __future__ import annotations

import numpy as np
import pytest

from llmq.calib.observers import TensorStats, amax


def test_streaming_matches_one_shot():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 32, 8)).astype(np.float32) * (i + 1) for i in range(5)]
    streamed = TensorStats()
    for b in batches:
        streamed.update(b)
    allx = np.concatenate(batches)
    assert streamed.count == allx.size
    assert streamed.min == pytest.approx(allx.min()) and streamed.max == pytest.approx(allx.max())
    np.testing.assert_allclose(streamed.channel_absmax, np.abs(allx).reshape(-1, 8).max(axis=0))
    assert streamed.hist.sum() == allx.size and streamed.hist.shape == (2048,)
    # the histogram after range doubling equals a one-shot histogram over the final range
    ref, _ = np.histogram(np.abs(allx), bins=2048, range=(0, streamed.hist_range))
    # bin edges of the merged histogram equal the one-shot edges mathematically but not in float
    # rounding, so a value lying on an edge may land one bin over: at most a few counts move
    coarse, coarse_ref = streamed.hist.reshape(-1, 64).sum(1), ref.reshape(-1, 64).sum(1)
    assert coarse.sum() == coarse_ref.sum()
    assert np.abs(coarse - coarse_ref).max() <= 2


def test_memory_does_not_grow_with_samples():
    s = TensorStats()
    for i in range(50):
        s.update(np.full((2, 16, 4), float(i), np.float32))
    assert s.hist.shape == (2048,) and s.channel_absmax.shape == (4,)


def test_observers_clip_outliers_but_minmax_does_not():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:5] = 80.0  # a few huge outliers
    s = TensorStats()
    s.update(x)
    assert amax(s, "minmax") == pytest.approx(80.0)
    p = amax(s, "percentile", percentile=99.9)
    assert 2.5 < p < 4.5  # ≈ 3.29 for a unit Gaussian, quantised to the histogram
    for method in ("mse", "entropy"):
        a = amax(s, method)
        assert 1.0 < a < 80.0, method


def test_errors():
    with pytest.raises(ValueError, match="no calibration data"):
        amax(TensorStats(), "minmax")
    s = TensorStats()
    s.update(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="unknown observer"):
        amax(s, "median")

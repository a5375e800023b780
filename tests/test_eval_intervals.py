"""The clip-bootstrap intervals of ``eval longform``, checked exactly (no nets, no clips: fast).

Seen to fail on planted bugs: a 90% interval reported as 95% (5/95 percentiles), another seed, fewer
resamples, NaN clips kept (the mean turns NaN) or counted as zeros, the interval's ends swapped.
"""

import math

import numpy as np
import pytest

from avatarforcing.eval.longform import clip_summary
from avatarforcing.eval.report import PER_CLIP


def by_hand(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """The percentile bootstrap over clips: ``resamples`` draws of n clips with replacement, 2.5 / 97.5 %."""
    v = np.asarray(values)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_interval_is_the_stated_percentile_bootstrap_exactly():
    rng = np.random.default_rng(0)
    values = [float(x) for x in rng.normal(0.5, 0.2, size=40)]
    s = clip_summary([{"lipsync_r": x} for x in values], resamples=500, seed=7)
    assert PER_CLIP[0] == "lipsync_r"  # the first score draws first from the summary's generator
    assert s["lipsync_r"] == pytest.approx(np.mean(values), abs=1e-12)
    assert s["ci95"]["lipsync_r"] == pytest.approx(by_hand(values, 500, 7), abs=1e-12)


def test_default_interval_is_2000_resamples_with_seed_0():
    """The published intervals were made with the defaults: 2,000 resamples, seed 0."""
    values = [float(x) for x in np.random.default_rng(3).normal(size=40)]  # continuous: any other count moves it
    assert clip_summary([{"lipsync_r": x} for x in values])["ci95"]["lipsync_r"] == \
        pytest.approx(by_hand(values, 2000, 0), abs=1e-12)


def test_interval_width_is_the_normal_one_for_many_clips():
    """400 clips: the bootstrap interval's width is 2 x 1.96 x sd / sqrt(n) within 2% (measured: 0.3%)."""
    rng = np.random.default_rng(0)
    v = rng.normal(0.5, 0.2, size=400)
    s = clip_summary([{"lipsync_r": float(x)} for x in v])
    lo, hi = s["ci95"]["lipsync_r"]
    assert lo < s["lipsync_r"] < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * v.std(ddof=1) / math.sqrt(len(v)), rel=0.02)


def test_two_clips_give_the_whole_range():
    """Two clips 0 and 1: the resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    97.5% points are 0 and 1 whatever the seed (a 50% interval would give 0.5, 0.5)."""
    for seed in range(3):
        assert clip_summary([{"sync_c": 0.0}, {"sync_c": 1.0}], seed=seed)["ci95"]["sync_c"] == [0.0, 1.0]


def test_nan_clips_are_left_out_of_mean_and_interval():
    values = [0.2, float("nan"), 0.6, 0.4, float("nan"), 0.9]
    kept = [x for x in values if x == x]
    s = clip_summary([{"lipsync_r": x} for x in values], resamples=300, seed=1)
    assert s["lipsync_r"] == pytest.approx(np.mean(kept), abs=1e-12)
    assert s["ci95"]["lipsync_r"] == pytest.approx(by_hand(kept, 300, 1), abs=1e-12)
    # a score that no clip has (or only NaN) is absent, not 0 or NaN
    s = clip_summary([{"lipsync_r": float("nan"), "sync_c": 0.1}, {"sync_c": 0.3}])
    assert "lipsync_r" not in s and "lipsync_r" not in s["ci95"] and s["sync_c"] == pytest.approx(0.2)
    # scores without intervals (fid, fvd, fps) are not summarised per clip
    assert "fid" not in clip_summary([{"fid": 3.0, "sync_c": 0.1}])

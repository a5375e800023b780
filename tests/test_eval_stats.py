"""Numbers you can trust (#30): paired comparisons, a frozen mouth scores r = 0, permutation p-values, the
frozen-reference row."""

import numpy as np
import pytest

from avatarforcing.eval.metrics import lip_sync
from avatarforcing.eval.stats import clip_summary, paired, paired_markdown, pearson, permutation_p


def test_a_constant_series_scores_zero_never_nan():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert pearson(np.full(50, 0.3), b) == 0.0 and pearson(a, np.zeros(50)) == 0.0
    gt = {"opening": rng.random(40), "viseme": rng.integers(0, 5, 40)}
    frozen = (np.tile([[0.2, 0.5, 0.1]], (40, 1)), np.zeros(40, int))  # a mouth that never moves
    res = lip_sync(None, None, gt, readings=frozen)
    assert res["lipsync_r"] == 0.0
    assert res["viseme_majority"] == pytest.approx(np.bincount(gt["viseme"]).max() / 40)


def test_the_summary_says_what_it_excluded():
    details = [{"lipsync_r": 0.5}, {"lipsync_r": float("nan")}, {"lipsync_r": 0.7}]
    s = clip_summary(details, ["lipsync_r"])
    assert s["lipsync_r"] == pytest.approx(0.6)
    assert s["excluded"] == {"lipsync_r": {"clips": 1, "why": "not a finite number (NaN or infinite)"}}


def test_paired_intervals_against_known_cases():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(40)  # clip difficulty varies a lot ...
    clips = [f"c{i}" for i in range(40)]
    details = {"a": [{"clip": c, "s": float(x)} for c, x in zip(clips, base)],
               "shifted": [{"clip": c, "s": float(x + 0.1)} for c, x in zip(clips, base)],
               "noisy": [{"clip": c, "s": float(x + 0.05 + 0.02 * rng.standard_normal())} for c, x in zip(clips, base)]}
    p = paired(details, "a", ["s"])
    assert p["shifted"]["s"]["diff"] == pytest.approx(0.1) and p["shifted"]["s"]["ci95"] == pytest.approx([0.1, 0.1])
    lo, hi = p["noisy"]["s"]["ci95"]
    assert 0 < lo < 0.05 < hi < 0.06  # ... so the paired interval finds the 0.05 a marginal comparison cannot
    marginal = {m: clip_summary(d, ["s"])["ci95"]["s"] for m, d in details.items()}
    assert marginal["noisy"][0] < marginal["a"][1]  # the marginal intervals overlap
    table = paired_markdown(p, "a", ["s"], {"s": "score"})
    assert "| mode - a | score |" in table and "+0.100 [+0.100, +0.100] *" in table
    missing = paired({"a": details["a"], "b": [{"clip": "c0", "s": 1.0}, {"clip": "zz", "s": 9.0}]}, "a", ["s"])
    assert missing["b"]["s"]["clips"] == 1  # only clips both modes scored


def test_permutation_p():
    null = np.linspace(0, 1, 99)
    assert permutation_p(2.0, null) == pytest.approx(0.01)  # above every shift: the smallest p 99 shifts allow
    assert permutation_p(-1.0, null) == 1.0
    assert permutation_p(0.6, null) == pytest.approx((1 + 40) / 100)  # 40 of the 99 are >= 0.6


def test_a_frozen_portrait_gets_its_own_row_and_wins_only_what_rewards_stillness():
    from avatarforcing.eval.longform import markdown_table, run_longform

    res = run_longform("mini", 2, 100, ["avatarforcing", "frozen"], None, None, progress=False)
    frozen, model = res["summary"]["frozen"], res["summary"]["avatarforcing"]
    assert frozen["lipsync_r"] == 0.0 and "excluded" not in frozen  # counted, at zero
    assert frozen["flicker_end"] < model["flicker_end"]  # stillness wins flicker ...
    assert model["lipsync_r"] > frozen["lipsync_r"]  # ... and loses lip sync
    d = res["paired"]["frozen"]["lipsync_r"]
    assert d["clips"] == 2 and d["diff"] < 0
    table = markdown_table(res)
    assert "Sync-C*" in table and "Paired differences against `avatarforcing`" in table

"""Numbers you can trust (#30): paired comparisons, a frozen mouth scores r = 0, permutation p-values, the
frozen-reference row, stillness scores gated by lip sync, FID/FVD intervals and a true video FVD, identity drift
on the face only, a test split of unseen speakers."""

import json

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
    from avatarforcing.eval.longform import run_longform
    from avatarforcing.eval.report import markdown_table

    res = run_longform("mini", 2, 100, ["avatarforcing", "frozen", "real", "reversed", "late"], None, None,
                       progress=False)
    assert [d["flicker_vs_real"] for d in res["clips_detail"]["real"]] == [1.0, 1.0]  # the real render itself
    # the real render backwards or 12 frames late: lip sync collapses, and Sync-C*'s offset finds the delay
    real, back = res["summary"]["real"], res["summary"]["reversed"]
    assert real["lipsync_r"] > 0.95 and back["lipsync_r"] < 0.5 and res["summary"]["late"]["lipsync_r"] < 0.5
    assert [abs(d["offset"]) for d in res["clips_detail"]["late"]] == [12, 12]
    assert "fps" not in res["summary"]["late"]
    frozen, model = res["summary"]["frozen"], res["summary"]["avatarforcing"]
    assert frozen["lipsync_r"] == 0.0 and "lipsync_r" not in frozen.get("excluded", {})  # counted, at zero
    assert model["lipsync_r"] > frozen["lipsync_r"]  # stillness loses lip sync ...
    # ... and would win flicker and drift, which therefore count only above the lip-sync floor
    raw, gen = res["clips_detail"]["frozen"], res["clips_detail"]["avatarforcing"]
    assert all(not d["above_floor"] and d["flicker_vs_real"] == 0.0 for d in raw)
    assert all(f["flicker_end"] < g["flicker_end"] for f, g in zip(raw, gen))
    for k in ("flicker_end", "flicker_vs_real", "identity_drift_end", "colour_drift_background_end"):
        assert k not in frozen and "lip sync not above" in frozen["excluded"][k]["why"], k
    assert "flicker_end" not in res["paired"]["frozen"]
    d = res["paired"]["frozen"]["lipsync_r"]
    assert d["clips"] == 2 and d["diff"] < 0
    table = markdown_table(res)
    assert "Sync-C*" in table and "Paired differences against `avatarforcing`" in table


def test_gated_scores_count_only_where_their_flag_holds():
    """Drift-like scores count only on clips whose flag is true, in the summary and in the paired differences
    (a clip must count in both modes); the summary says how many were left out and why."""
    gates = {"drift": ("above_floor", "still")}
    rows = [{"clip": "a", "drift": 0.1, "above_floor": True}, {"clip": "b", "drift": 0.0, "above_floor": False},
            {"clip": "c", "drift": float("nan"), "above_floor": True}, {"clip": "d", "drift": 0.3}]
    s = clip_summary(rows, ["drift"], gates=gates)
    assert s["drift"] == pytest.approx(0.1)  # a only: b is still, c is NaN, d has no flag
    assert s["excluded"]["drift"] == {"clips": 3, "why": "2 clip(s): still; 1 clip(s): not a finite number (NaN or "
                                                         "infinite)"}
    assert clip_summary(rows, ["drift"])["drift"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)  # ungated
    other = [{"clip": "a", "drift": 0.5, "above_floor": True}, {"clip": "b", "drift": 0.9, "above_floor": True}]
    d = paired({"base": rows, "m": other}, "base", ["drift"], gates=gates)["m"]["drift"]
    assert d["clips"] == 1 and d["diff"] == pytest.approx(0.4)


def test_frechet_intervals_known_case():
    """Same distribution as the real clips: a distance near the real-vs-real split, its interval about it; a mean
    shifted by 1 in one dimension: ~1 more, and the paired difference's interval excludes 0."""
    from avatarforcing.eval.frechet import frechet_distance, frechet_intervals

    rng = np.random.default_rng(0)
    real = [rng.normal(0, 1, (50, 3)) for _ in range(16)]
    same = [rng.normal(0, 1, (50, 3)) for _ in range(16)]
    shifted = [rng.normal(0, 1, (50, 3)) + np.array([1.0, 0, 0]) for _ in range(16)]
    fd = frechet_intervals({"same": same, "shifted": shifted}, real, "same", resamples=100)
    assert fd["value"]["same"] < 0.1 and fd["real_split"] < 0.1  # halves of the same distribution
    assert fd["value"]["shifted"] == frechet_distance(np.concatenate(shifted), np.concatenate(real))
    assert 0.8 < fd["value"]["shifted"] < 1.5  # 1 + the sample means' own error (real's is -0.1 here)
    for m in ("same", "shifted"):
        lo, hi = fd["ci95"][m]
        assert 0 <= lo < fd["value"][m] < hi  # about the estimate (a percentile interval sat above it)
    d = fd["paired"]["shifted"]
    assert d["clips"] == 16 and d["ci95"][0] > 0.5
    assert d["diff"] == pytest.approx(fd["value"]["shifted"] - fd["value"]["same"])
    assert "same" not in fd["paired"]  # the baseline has no difference with itself
    one = frechet_intervals({"same": same[:1]}, real[:1], "same")
    assert one["ci95"] == {} and one["real_split"] < 0.6  # one clip: nothing to resample; its halves still split
    # the split is in time, within clips: clips of different "identities" (means) still split to ~0
    apart = [rng.normal(10 * i, 1, (50, 3)) for i in range(4)]
    assert frechet_intervals({"m": apart}, apart, "m", resamples=10)["real_split"] < 0.5


def test_a_true_fvd_sees_time_and_fid_does_not(tmp_path):
    """With a video network (TorchScript, I3D-style [N, 3, T, H, W]) the FVD of a video played backwards is
    large while its FID is exactly the same as forwards: FID is blind to frame order, FVD must not be."""
    import torch

    from avatarforcing.eval.frechet import TorchScriptClips, TorchScriptFrames, frechet_distance

    class Motion(torch.nn.Module):  # per window: mean brightness change between consecutive frames
        def forward(self, x):
            m = x.mean((1, 3, 4))
            return m[:, 1:] - m[:, :-1]

    class Colour(torch.nn.Module):  # per frame: mean of each channel
        def forward(self, x):
            return x.mean((2, 3))

    torch.jit.trace(Motion(), torch.zeros(1, 3, 8, 32, 32)).save(str(tmp_path / "video.pt"))
    torch.jit.trace(Colour(), torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "frames.pt"))
    rng = np.random.default_rng(0)
    level = np.cumsum(rng.uniform(0, 4, 320)) % 200 + 20  # brightens, then wraps: mostly rising
    video = np.broadcast_to(level[:, None, None, None], (320, 16, 16, 3)).astype(np.uint8)
    video = np.clip(video + rng.integers(0, 30, (320, 1, 1, 3)), 0, 255).astype(np.uint8)
    back = video[::-1].copy()
    clips, frames = TorchScriptClips(str(tmp_path / "video.pt"), frames=8, size=32), \
        TorchScriptFrames(str(tmp_path / "frames.pt"), size=32)
    assert clips(video).shape == (40, 7)
    assert frechet_distance(frames(back), frames(video)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(clips(back), clips(video)) > 0.05
    with pytest.raises(Exception, match="fewer than one 8-frame window"):
        clips(video[:5])


def test_identity_drift_sees_the_face_not_the_background():
    """A new background and clothes leave identity drift where it was; another face in the same frame moves it.
    (Planted: without the face mask the background change reads as drift.)"""
    from avatarforcing.data.corpus import make_clip, reference_frame
    from avatarforcing.eval.metrics import face_mask, identity_drift
    from avatarforcing.eval.nets import load_eval_nets

    nets = load_eval_nets()
    spec, frames, _, _ = make_clip("test", 0, 1234, 2.0)
    ref = reference_frame(spec, 128)
    m = face_mask(128, 128)[0, 0].numpy()[..., None]
    restyled = (frames * m + (255 - frames) * (1 - m)).astype(np.uint8)  # everything outside the face inverted
    other = make_clip("test", 1, 1234, 2.0)[1]
    swapped = (other * m + frames * (1 - m)).astype(np.uint8)  # another identity's face in this frame
    base = np.mean(identity_drift(nets, frames, ref))
    assert abs(np.mean(identity_drift(nets, restyled, ref)) - base) < 0.2 * base + 1e-3
    assert np.mean(identity_drift(nets, swapped, ref)) > base + 0.05


def test_the_test_split_speaks_with_timbres_training_never_heard():
    from avatarforcing.data.corpus import TEST_VARIANTS, VARIANTS, make_clip, voices
    from avatarforcing.data.speech import synthesize

    def timbres(split):
        return {v.split("+")[1] for v in voices(split)}

    assert timbres("test") == set(TEST_VARIANTS) and not timbres("test") & (timbres("train") | timbres("heldout"))
    assert not timbres("test") & set(VARIANTS)
    assert timbres("heldout") <= timbres("train")  # the development split shares timbres (accents differ)
    for v in TEST_VARIANTS:  # every one exists in espeak-ng's data and speaks
        assert len(synthesize("Hello there.", voice=f"en+{v}").samples) > 1000, v
    spec = make_clip("test", 3, 1234, 1.0)[0]
    assert spec.name == "test-00003" and spec.voice.split("+")[1] in TEST_VARIANTS


def test_eval_video_on_a_real_render_frozen_reversed_and_shifted(tmp_path, capsys):
    """`eval video` on the test split's real render and three videos no metric should reward: the real one
    follows its speech above the floors; a frozen and a reversed video do not (and the note says their drift and
    flicker mean nothing); a video 6 frames late is found 6 frames late."""
    from avatarforcing.cli import main
    from avatarforcing.data.corpus import make_clip
    from avatarforcing.data.video import VideoWriter

    _, real, audio, _ = make_clip("test", 2, 1234, 5.0)
    videos = {"real": real, "frozen": np.repeat(real[:1], len(real), 0), "reversed": real[::-1],
              "late": np.concatenate([np.repeat(real[:1], 6, 0), real[:-6]])}
    res = {}
    for name, frames in videos.items():
        with VideoWriter(tmp_path / f"{name}.mp4", fps=25, sample_rate=16000) as w:
            w.add_audio(audio)
            w.write(np.ascontiguousarray(frames))
        assert main(["eval", "video", "--video", str(tmp_path / f"{name}.mp4")]) == 0
        out = capsys.readouterr()
        res[name] = json.loads(out.out)
        assert ("say nothing about stability" in out.err) == (not res[name]["above_floor"]), name
    assert res["real"]["above_floor"] and res["real"]["sync_c_p"] <= 0.05 and res["real"]["offset"] == 0
    for name in ("frozen", "reversed"):
        assert not res[name]["above_floor"] and res[name]["sync_c_p"] > 0.05, name
    assert res["frozen"]["loudness_r"] == 0.0
    assert res["late"]["offset"] in (-6, 6) and res["late"]["above_floor"]


def test_a_bootstrap_resample_from_moments_equals_the_concatenated_rows():
    from avatarforcing.eval.frechet import _Moments, frechet_distance

    rng = np.random.default_rng(0)
    clips = [rng.normal(i, 1 + i, (20 + i, 4)) for i in range(5)]
    pick = [0, 0, 3, 4, 4]
    rows = np.concatenate([clips[i] for i in pick])
    mu, cov = _Moments(clips)(np.bincount(pick, minlength=5).astype(float))
    assert np.allclose(mu, rows.mean(0)) and np.allclose(cov, np.cov(rows, rowvar=False))
    other = rng.normal(0, 1, (50, 4))
    assert frechet_distance(rows, other) > 0


def test_eval_longform_flags_reach_the_benchmark(monkeypatch, capsys):
    """`eval longform --split --fid-extractor --fvd-extractor --fvd-frames` arrive in run_longform; the default
    split is the test split."""
    import avatarforcing.eval.longform as longform
    from avatarforcing.cli import main

    got = {}

    def fake(model, clips, frames, modes, json_path, report, **kw):
        got.update(kw, modes=modes)
        raise SystemExit(0)  # nothing to print

    monkeypatch.setattr(longform, "run_longform", fake)
    with pytest.raises(SystemExit):
        main(["eval", "longform", "--clips", "2", "--frames", "50", "--modes", "real,late", "--split", "heldout",
              "--fid-extractor", "f.pt", "--fvd-extractor", "v.pt", "--fvd-frames", "8"])
    assert (got["split"], got["fid_extractor"], got["fvd_extractor"], got["fvd_frames"], got["modes"]) == \
        ("heldout", "f.pt", "v.pt", 8, ["real", "late"])
    with pytest.raises(SystemExit):
        main(["eval", "longform"])
    assert got["split"] == "test" and got["fvd_extractor"] is None

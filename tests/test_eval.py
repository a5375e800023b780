import json

import numpy as np
import pytest

from avatarforcing.data.corpus import make_clip
from avatarforcing.errors import InputError
from avatarforcing.eval.longform import merge_longform, run_longform
from avatarforcing.eval.metrics import colour_drift, flicker, lip_sync, sync
from avatarforcing.eval.nets import load_eval_nets
from avatarforcing.eval.report import write_report

FRAMES = 50  # two seconds per clip: on shorter clips batched rounding moves Sync-C* past the bound (32: 7% once)


@pytest.fixture(scope="module")
def nets():
    return load_eval_nets()


@pytest.fixture(scope="module")
def clip():
    return make_clip("heldout", 3, 1234, 10.0)


@pytest.mark.parametrize("k", [-6, 0, 4, 9])
def test_sync_finds_the_audio_offset(nets, clip, k):
    _, frames, audio, _ = clip
    shifted = np.roll(audio, k * 640)  # audio delayed by k frames
    res = sync(nets, frames, shifted)
    assert abs(res["offset"] - k) <= 1, res
    assert res["sync_c"] > 0


def test_lipsync_r_high_for_truth_and_near_zero_when_shuffled(nets, clip):
    _, frames, _, gt = clip
    assert lip_sync(nets, frames, gt)["lipsync_r"] > 0.85
    other = make_clip("heldout", 4, 1234, 10.0)[3]
    assert abs(lip_sync(nets, frames, other)["lipsync_r"]) < 0.3


def test_colour_drift_grows_linearly_with_an_injected_ramp(clip):
    _, frames, _, _ = clip
    t = np.arange(len(frames))[:, None, None, None] / len(frames)
    ramped = np.clip(frames.astype(np.float32) + 60 * t * np.array([1.0, 0.2, -0.5]), 0, 255).astype(np.uint8)
    base, drift = colour_drift(frames)["background"], colour_drift(ramped)["background"]
    secs = np.arange(len(drift))
    assert np.corrcoef(secs, drift)[0, 1] > 0.99 and drift[-1] > 10 * (max(base) + 0.1)
    assert len(flicker(frames)) == len(drift)


def test_report_renders(tmp_path):
    result = {"model": "m", "clips": 1, "frames": 50, "seed": 0, "feature_extractors": {},
              "summary": {"avatarforcing": {"lipsync_r": 0.5}, "ar": {"lipsync_r": 0.4}},
              "curves_per_second": {"avatarforcing": {"identity_drift": [0.1, 0.2]},
                                    "ar": {"identity_drift": [0.1, 0.4]}}}
    write_report(result, tmp_path)
    assert (tmp_path / "identity_drift.png").stat().st_size > 1000
    assert "| avatarforcing | 0.500 |" in (tmp_path / "report.md").read_text()


def test_longform_batched_equals_one_clip_at_a_time(tmp_path):
    modes = ["avatarforcing", "shuffled"]  # a mode and its paired baseline
    one = run_longform("mini", 3, FRAMES, modes, tmp_path / "r.json", tmp_path / "report", progress=False)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["summary"]) == set(modes) and saved["clips"] == 3
    assert all(len(d) == 3 for d in saved["clips_detail"].values())
    assert (tmp_path / "report" / "report.md").exists()
    assert one["summary"]["avatarforcing"]["fps"] > 0
    lo, hi = one["summary"]["avatarforcing"]["ci95"]["lipsync_r"]
    assert lo <= one["summary"]["avatarforcing"]["lipsync_r"] <= hi
    # the final result carries FID*/FVD* intervals and their paired differences (intermediate JSONs do not)
    assert {"fid", "fvd"} <= set(one["summary"]["shuffled"]["ci95"])
    assert {"fid", "fvd"} <= set(one["paired"]["shuffled"])
    assert one["frechet"]["fid"]["resamples"] > 0
    # two clips per engine run, clips synthesised by two worker processes: the same videos, the same scores
    two = run_longform("mini", 3, FRAMES, modes, None, None, progress=False, batch=2, workers=2)

    def per_clip(res, m, k):
        return [d[k] for d in res["clips_detail"][m]]

    for m in modes:
        for k, rel in (("lipsync_r", 0.02), ("sync_c", 0.02), ("identity_drift_end", 0.02),
                       ("colour_drift_face_end", 0.03)):
            # batched numerics: the per-clip scores agree to ~1% (colour drift, a difference of the clip's end
            # from its start, compounds them: 2.07% once, in a make test run)
            assert per_clip(two, m, k) == pytest.approx(per_clip(one, m, k), rel=rel, abs=5e-3), (m, k)
    # a deadline stops after the batch that passes it, and the JSON says how many clips it covers
    cut = run_longform("mini", 3, FRAMES, ["avatarforcing"], tmp_path / "cut.json", None, progress=False, batch=2,
                       deadline_minutes=0)
    assert cut["clips"] == 2 and cut["clips_requested"] == 3
    assert json.loads((tmp_path / "cut.json").read_text())["clips"] == 2
    # ... and a second run from clip 2 completes it: merged, the per-clip scores are those of one run
    rest = run_longform("mini", 3, FRAMES, ["avatarforcing"], None, None, progress=False, first=2)
    assert rest["clips"] == 1 and rest["clips_detail"]["avatarforcing"][0]["clip"] == "test-00002"
    merged = merge_longform([rest, cut])
    assert merged["clips"] == 3 and len(merged["summary"]["avatarforcing"]["fid_parts"]) == 2
    for k in ("lipsync_r", "sync_c"):  # within the per-clip bound above (batched rounding: 0.0027 seen once)
        assert merged["summary"]["avatarforcing"][k] == pytest.approx(one["summary"]["avatarforcing"][k], abs=5e-3)
    assert per_clip(merged, "avatarforcing", "identity_drift_end") == pytest.approx(
        per_clip(one, "avatarforcing", "identity_drift_end"), abs=5e-3)
    with pytest.raises(InputError, match="consecutive"):
        merge_longform([rest, rest])


def test_frechet_distance_matches_closed_form_and_orders_distributions(nets, clip):
    from avatarforcing.eval.frechet import CorpusClips, CorpusFrames, frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 3))
    b = rng.normal(0, 2, (4000, 3)) + np.array([1.0, 0, 0])
    # Gaussians: |mu|^2 + sum over dims of (1 + 4 - 2*2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    _, frames, _, _ = clip
    feats = CorpusFrames(nets)
    first, second = frames[:125], frames[125:]  # the same identity, other moments
    noisy = np.clip(second + np.random.default_rng(1).normal(0, 40, second.shape), 0, 255).astype(np.uint8)
    other = make_clip("heldout", 5, 1234, 5.0)[1]  # another identity
    same = frechet_distance(feats(first), feats(second))
    assert same < frechet_distance(feats(first), feats(noisy))
    assert same < frechet_distance(feats(first), feats(other))
    assert CorpusClips(nets)(frames).shape[1] == 128


def test_loudness_sync_follows_own_audio_above_the_shift_floor(nets, clip):
    """Without ground truth: the render's mouth follows its own speech's loudness above the time-shifted
    floor, and another clip's speech does not."""
    from avatarforcing.eval.metrics import loudness_sync, mouth_readings

    _, frames, audio, _ = clip
    opening = mouth_readings(nets, frames)[0][:, 0]
    own = loudness_sync(opening, audio)
    assert own["loudness_r"] > 0.4 and own["loudness_r"] > own["loudness_r_floor95"] and abs(own["loudness_lag"]) <= 1
    other = loudness_sync(opening, make_clip("heldout", 4, 1234, 10.0)[2])
    assert other["loudness_r"] < other["loudness_r_floor95"]


def test_sync_c_of_the_own_audio_is_above_its_shifted_floor(nets, clip):
    from avatarforcing.eval.metrics import sync_floor

    _, frames, audio, _ = clip
    floor = sync_floor(nets, frames, audio, shifts=5)
    assert sync(nets, frames, audio)["sync_c"] > floor["sync_c_floor95"] > 0


def test_evaluate_video_refuses_clips_too_short_for_its_metrics(nets, clip):
    from avatarforcing.errors import InputError
    from avatarforcing.eval.metrics import evaluate_video

    _, frames, audio, _ = clip
    with pytest.raises(InputError, match="cover 0.80 s; the metrics need at least 1 s"):
        evaluate_video(nets, frames[:20], audio)
    with pytest.raises(InputError, match="cover 0.40 s"):
        evaluate_video(nets, frames, audio[: 16000 * 2 // 5])
    short = evaluate_video(nets, frames[:75], audio, floors=True)  # 3 s: Sync-C, no loudness sync, no floors
    assert "sync_c" in short and "loudness_r" not in short and "sync_c_floor95" not in short


def test_codec_mode_is_the_render_through_the_vae(tmp_path, clip):
    """``Avatar.reconstruct``: causal, so a longer clip starts with the shorter one's reconstruction; the
    long-form "codec" mode scores it: below the real render in lip sync, a face identity nearly unchanged."""
    from avatarforcing.api import Avatar

    av = Avatar.load("mini")
    frames = clip[1][:50]
    rec = av.reconstruct(frames)
    assert rec.shape == frames.shape and rec.dtype == np.uint8
    assert np.array_equal(rec[:49], av.reconstruct(frames[:49]))  # 49 = 1 + 4 * 12: no padding
    assert 20 < 10 * np.log10(255**2 / np.mean((rec.astype(float) - frames) ** 2)) < 40
    with pytest.raises(InputError, match="uint8"):
        av.reconstruct(frames.astype(np.float32))
    res = run_longform("mini", 2, 100, ["codec", "real"], None, None, progress=False)["summary"]
    assert res["codec"]["lipsync_r"] < res["real"]["lipsync_r"] and res["codec"]["identity_drift_end"] < 0.1

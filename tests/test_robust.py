"""Robust distillation (train/robust.py): what the student hears vs what the teacher and critic hear."""

import dataclasses
import json

import numpy as np
import torch

from avatarforcing.api import Avatar, model_folder
from avatarforcing.config import Config
from avatarforcing.data.corpus import synth
from avatarforcing.model import AvatarDiT
from avatarforcing.train import stages
from avatarforcing.train.recipe import SMOKE
from avatarforcing.train.robust import HeardClips, HeardSpeech, RobustConfig, run_robust

from .conftest import tiny_cfg


def _fake_clips(tmp_path, clips=3, n_lat=12, versions=3, pack=4, dim=8):
    """Latents and rows whose values say where they came from: clip * 20 + frame (+ 100 * version for heard),
    exact in float16."""
    frame = np.arange(1 + n_lat, dtype=np.float32)
    lat = np.stack([np.broadcast_to((c * 20 + frame)[None, :, None, None], (2, 1 + n_lat, 2, 2))
                    for c in range(clips)])
    rows = np.stack([np.broadcast_to((c * 20 + frame)[:, None, None], (1 + n_lat, pack, dim))
                     for c in range(clips)])
    heard = np.stack([[rows[c] + 100 * (v + 1) for v in range(versions)] for c in range(clips)])
    np.savez(tmp_path / "latents.npz", latents=lat.astype(np.float16), rows=rows.astype(np.float16))
    np.savez(tmp_path / "heard.npz", heard=heard.astype(np.float16))
    return HeardClips(tmp_path / "latents.npz", tmp_path / "heard.npz", 4, "cpu")


def test_heard_clips_give_the_student_the_same_window_heard_differently(tmp_path):
    data = _fake_clips(tmp_path)
    lat, rows, heard = data.sample_heard(torch.Generator().manual_seed(0), 64)
    assert lat.shape == (64, 2, 5, 2, 2) and rows.shape == heard.shape == (64, 5, 4, 8)
    # the reference entry first, then n consecutive frames; latents and both rows from the same clip and window
    assert torch.equal(lat[:, 0, :, 0, 0], rows[:, :, 0, 0])
    where = rows[:, :, 0, 0]
    assert torch.all(where[:, 0] % 20 == 0)
    assert torch.all(where[:, 2:] - where[:, 1:-1] == 1)
    offset = heard[:, :, 0, 0] - where
    assert torch.all(offset == offset[:, :1])  # one version per sample, over the whole window
    assert set(offset[:, 0].tolist()) == {100.0, 200.0, 300.0}
    # the plain path draws the same windows from the same generator state (LatentClips.sample)
    lat2, rows2 = data.sample(torch.Generator().manual_seed(0), 64)
    assert torch.equal(lat2, lat) and torch.equal(rows2, rows)


def test_heard_clips_reject_mismatched_rows(tmp_path):
    import pytest

    from avatarforcing.errors import InputError

    _fake_clips(tmp_path)
    np.savez(tmp_path / "heard.npz", heard=np.zeros((3, 2, 9, 4, 8), np.float16))
    with pytest.raises(InputError, match="do not match"):
        HeardClips(tmp_path / "latents.npz", tmp_path / "heard.npz", 4, "cpu")


def test_dmd_scores_judge_the_student_on_the_clean_rows(monkeypatch):
    """The student rolls out on the heard rows; the real and fake scores see the clean rows of its window."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    student, teacher, critic = (AvatarDiT(cfg.model) for _ in range(3))
    n = 6
    heard = torch.randn(1, 1 + n, cfg.model.audio_pack, cfg.model.audio_dim)
    clean = torch.randn_like(heard)
    seen = []
    real_score_x0 = stages.score_x0

    def spy(model, cfg_, ref, x_t, sigma, rows, guidance):
        seen.append(rows.clone())
        return real_score_x0(model, cfg_, ref, x_t, sigma, rows, guidance)

    monkeypatch.setattr(stages, "score_x0", spy)
    seen_rollout = []
    real_rollout = stages.rollout_sample

    def spy_rollout(student_, cfg_, ref, rows, gen, rng):
        seen_rollout.append(rows)
        return real_rollout(student_, cfg_, ref, rows, gen, rng)

    monkeypatch.setattr(stages, "rollout_sample", spy_rollout)
    sample = {"ref": torch.randn(1, cfg.model.latent_channels, 1, 4, 4), "rows": heard, "score_rows": clean}
    loss, (x, xrows), _ = stages.dmd_loss(student, teacher, critic, cfg, sample, torch.Generator().manual_seed(1),
                                          np.random.default_rng(2))
    assert seen_rollout[0] is heard
    assert len(seen) == 2 and all(torch.equal(r, xrows) for r in seen)
    f = x.shape[2]
    starts = [s for s in range(1, 2 + n - f) if torch.equal(clean[:, s:s + f], xrows)]
    assert len(starts) == 1  # a window of the clean rows, not of the heard ones
    assert not any(torch.equal(heard[:, s:s + f], xrows) for s in range(1, 2 + n - f))
    loss.backward()
    assert any(p.grad is not None for p in student.parameters())


def test_heard_speech_is_seeded_and_differs_by_version(tmp_path):
    synth(tmp_path / "c", 2, 2.0, "train", seed=3, progress=False, clip_files=False)
    folder = model_folder("mini")
    cfg = Config.load(folder / "config.yaml")
    make = HeardSpeech(cfg, folder / "listener.safetensors", 3, {"p_codec": 0.0}, seed=5)
    shard = tmp_path / "c" / "shards" / "train-0000"
    a, b = make((0, shard, 1, 48)), make((0, shard, 1, 48))
    assert a.shape == (3, 1 + 12, cfg.model.audio_pack, cfg.model.audio_dim) and a.dtype == np.float16
    assert np.array_equal(a, b)  # (seed, clip index) fixes every chain
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    assert not np.array_equal(make((1, shard, 1, 48)), a)


def test_robust_run_end_to_end_keeps_the_latents_and_resumes(tmp_path):
    """decoder -> latents -> heard -> ode-gen -> ode -> dmd -> export on a tiny corpus, from the shipped mini."""
    corpus = tmp_path / "corpus"
    synth(corpus, 2, 4.0, "train", seed=1, progress=False, clip_files=False)
    synth(corpus, 1, 4.0, "heldout", seed=1, progress=False, clip_files=False)
    rc = RobustConfig(versions=2, workers=0, microphone={"p_codec": 0.0},
                      recipe=dataclasses.replace(SMOKE, decoder_steps=2, decoder_batch=2, sample_every=0))
    run_robust(corpus, model_folder("mini"), tmp_path / "run", "cpu", rc,
               export_to=tmp_path / "model")
    from safetensors.torch import load_file

    shipped = model_folder("mini")
    new = tmp_path / "model"
    old_vae, new_vae = load_file(str(shipped / "vae.safetensors")), load_file(str(new / "vae.safetensors"))
    assert all(torch.equal(old_vae[k].float(), new_vae[k]) for k in old_vae if k.startswith("encoder."))
    assert any(not torch.equal(old_vae[k].float(), new_vae[k]) for k in old_vae if k.startswith("decoder."))
    old_dit, new_dit = load_file(str(shipped / "model.safetensors")), load_file(str(new / "model.safetensors"))
    assert any(not torch.equal(old_dit[k], new_dit[k]) for k in old_dit)  # the student was trained
    for name in ("teacher.safetensors", "listener.safetensors"):
        assert (tmp_path / "model" / name).read_bytes() == (shipped / name).read_bytes()
    info = json.loads((tmp_path / "model" / "training.json").read_text())
    assert info["robust"]["decoder"]["psnr_db_before"] > 0 and info["robust"]["dmd"]["steps"] == 2
    assert "listener" in info  # the shipped model's history is kept
    heard = np.load(tmp_path / "run" / "heard.npz")["heard"]
    rows = np.load(tmp_path / "run" / "latents.npz")["rows"]
    assert heard.shape[0] == rows.shape[0] and heard.shape[1] == 2 and heard.shape[2:] == rows.shape[1:]
    avatar = Avatar.load(tmp_path / "model")
    frames = avatar.generate(np.full((128, 128, 3), 120, np.uint8), np.zeros(16000, np.float32))
    assert frames.shape == (25, 128, 128, 3)
    run_robust(corpus, shipped, tmp_path / "run", "cpu", rc, export_to=tmp_path / "model")  # every stage done
    again = load_file(str(new / "model.safetensors"))  # (not bytes: safetensors orders its metadata freely)
    assert all(torch.equal(new_dit[k], again[k]) for k in new_dit)


def test_robust_config_from_yaml_dict():
    import pytest

    from avatarforcing.errors import InputError

    rc = RobustConfig.from_dict({"versions": 3, "recipe": {"dmd_steps": 7, "stage_minutes": {"dmd": 1.5}}})
    assert rc.versions == 3 and rc.recipe.dmd_steps == 7 and rc.recipe.stage_minutes == {"dmd": 1.5}
    with pytest.raises(InputError, match="unknown fields"):
        RobustConfig.from_dict({"version": 3})

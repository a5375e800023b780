import dataclasses
import json

import numpy as np
import torch

from avatarforcing.api import Avatar
from avatarforcing.data.corpus import synth
from avatarforcing.train.recipe import SMOKE, run_recipe


def test_smoke_recipe_end_to_end_and_resume(tmp_path):
    """Every stage on a tiny corpus; the exported student loads and streams; re-running resumes (no-op)."""
    corpus = tmp_path / "corpus"
    synth(corpus, 2, 4.0, "train", seed=1, progress=False, clip_files=False)
    synth(corpus, 1, 4.0, "heldout", seed=1, progress=False, clip_files=False)
    recipe = dataclasses.replace(SMOKE, teacher_steps=2)  # one teacher sample (the slowest hook), not two
    run_recipe(corpus, tmp_path / "run", "cpu", recipe, export_to=tmp_path / "model")
    for stage in ("vae", "teacher", "ode", "dmd"):
        assert (tmp_path / "run" / f"{stage}.done").exists()
        assert (tmp_path / "run" / f"{stage}.jsonl").exists()
    assert (tmp_path / "run" / "samples" / "dmd-000002.mp4").stat().st_size > 1000  # periodic sample videos
    info = json.loads((tmp_path / "model" / "training.json").read_text())
    assert "psnr_db" in info["vae"]
    avatar = Avatar.load(tmp_path / "model")
    frames = avatar.generate(np.full((128, 128, 3), 120, np.uint8), np.zeros(16000, np.float32))  # the student
    assert frames.shape == (25, 128, 128, 3)
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    run_recipe(corpus, tmp_path / "run", "cpu", recipe, export_to=tmp_path / "model")  # every stage is done
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the run folder belongs to its model config: resuming it with another is refused before any stage runs
    import pytest

    from avatarforcing.config import preset
    from avatarforcing.errors import ConfigError

    with pytest.raises(ConfigError, match=r"another model config \(differs in \['model.latent_channels'\]"):
        run_recipe(corpus, tmp_path / "run", "cpu", recipe, cfg=preset("mini").override({"model.latent_channels": 16}))


def test_wan_layout_recipe_with_a_pretrained_vae(tmp_path):
    """The same stages with a Wan-style config: pretrained (here tiny, random) Wan VAE instead of the vae stage."""
    import dataclasses

    from avatarforcing.config import preset

    from .test_codecs import tiny_wan

    vae_dir = tmp_path / "vae"
    tiny_wan().save_pretrained(vae_dir)
    cfg = preset("wan-1.3b").override({
        "model.dim": 48, "model.ffn_dim": 64, "model.num_heads": 2, "model.num_layers": 2,
        "model.latent_channels": 4, "model.audio_dim": 128, "model.audio_blocks": [0, 1], "model.text_len": 4,
        "codec.height": 128, "codec.width": 128, "codec.audio": "mel"})
    corpus = tmp_path / "corpus"
    synth(corpus, 1, 4.0, "train", seed=2, progress=False, clip_files=False)
    # a time budget finishes the teacher stage long before its (large) step count
    r = dataclasses.replace(SMOKE, vae_path=str(vae_dir), sample_every=0, teacher_steps=100_000,
                            stage_minutes={"teacher": 1e-6})
    run_recipe(corpus, tmp_path / "run", "cpu", r, cfg=cfg, export_to=tmp_path / "model")
    assert (tmp_path / "run" / "dmd.done").exists() and not (tmp_path / "run" / "vae.done").exists()
    teacher = json.loads((tmp_path / "run" / "teacher.done").read_text())
    assert teacher["steps"] == 1 and teacher["planned_steps"] == 100_000 and teacher["train_seconds"] > 0
    from avatarforcing.checkpoints import load_model

    model, cfg2 = load_model(tmp_path / "model")
    assert cfg2.codec.vae == "wan" and cfg2.model.dim == 48

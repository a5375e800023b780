"""Training data alignment: a click in video frame k lands in the audio rows of the latent frame that holds
frame k, in the latents stage (the rows every stage trains on) and in the robust stage's heard rows.

A window of 1 + n latent frames is [reference | clip frames 4(j-1) .. 4j-1 for latent frame j]; its rows are
[anchor row x pack | the clip's per-frame rows in order], so clip frame k's row is row 1 + k // pack, entry
k % pack. Seen to fail with the training audio one video frame early (the audio sliced from
``samples_per_frame`` on) and with the anchor row dropped from the rows.
"""

from pathlib import Path

import numpy as np

from avatarforcing.codecs.vae import MiniVAE
from avatarforcing.config import preset
from avatarforcing.train.recipe import RecipeConfig, stage_latents

ASSETS = Path(__file__).parent.parent / "avatarforcing" / "assets"
CLICKS = (6, 17, 30)  # video frames of the clip (after the reference)


def click_corpus(root: Path, cfg, frames: int = 36) -> Path:
    """One train shard, one clip: noise frames, a portrait, silence with a click in the middle of each frame k."""
    shard = root / "shards" / "train-00000"
    shard.mkdir(parents=True)
    size, spf = cfg.codec.height, cfg.codec.samples_per_frame
    rng = np.random.default_rng(0)
    np.save(shard / "frames.npy", rng.integers(0, 255, (1, frames, size, size, 3), dtype=np.uint8))
    np.save(shard / "references.npy", rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8))
    audio = np.zeros((1, frames * spf), np.float32)
    for k in CLICKS:
        audio[0, k * spf + spf // 2] = 0.9
    np.save(shard / "audio.npy", audio)
    return root


def frame_of_click(rows: np.ndarray, pack: int) -> list[int]:
    """Per click, the clip frame whose row has the most energy above the silent rows' level (rows [1+n, pack, D])."""
    per_frame = rows[1:].reshape(-1, rows.shape[-1]).astype(np.float64)  # the clip's rows, frame by frame
    energy = per_frame.mean(1)
    energy = energy - np.median(energy)
    return [int(np.argmax(np.where(np.abs(np.arange(len(energy)) - k) <= 3, energy, -np.inf))) for k in CLICKS]


def test_latents_stage_rows_hold_each_click_in_its_frame(tmp_path):
    cfg = preset("mini").override({"codec.listener": "none"})
    corpus = click_corpus(tmp_path / "c", cfg)
    (tmp_path / "run").mkdir()
    path = stage_latents(corpus, tmp_path / "run", cfg, RecipeConfig(), MiniVAE(cfg.model.latent_channels, 8), "cpu")
    data = np.load(path)
    rows, lat = data["rows"][0], data["latents"][0]
    pack = cfg.model.audio_pack
    assert rows.shape[0] == lat.shape[1] == 1 + 36 // 4  # one row group per latent frame, the anchor first
    assert np.all(rows[0] == rows[0, :1])  # the anchor row repeated over its pack
    assert frame_of_click(rows, pack) == list(CLICKS)


def test_robust_heard_rows_hold_each_click_in_its_frame(tmp_path):
    from avatarforcing.train.robust import HeardSpeech

    cfg = preset("mini")
    corpus = click_corpus(tmp_path / "c", cfg)
    maker = HeardSpeech(cfg, ASSETS / "models" / "mini" / "listener.safetensors", versions=1, microphone={}, seed=0)
    heard = maker((0, corpus / "shards" / "train-00000", 0, 36))
    assert heard.shape[:2] == (1, 1 + 36 // 4)
    assert frame_of_click(heard[0], cfg.model.audio_pack) == list(CLICKS)

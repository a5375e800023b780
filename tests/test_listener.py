"""Microphone augmentation and the listener front end: effects do what they say, streaming == offline,
training runs, resumes and exports a model folder that loads."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarforcing.codecs.audio import MelFrontEnd
from avatarforcing.codecs.factory import make_front_end
from avatarforcing.codecs.listener import Listener, ListeningFrontEnd
from avatarforcing.config import mini
from avatarforcing.data import augment as A
from avatarforcing.errors import ConfigError, InputError

RATE = 16000


def tone(freq: float, seconds: float = 1.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray) -> float:
    s = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / RATE)[s.argmax()])


def band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    s = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(s[(f >= lo) & (f < hi)].sum() / s.sum())


def speechlike(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding pitch under a syllable-rate envelope, with pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 20))
    env = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) * (rng.random() * 0.5 + 0.5)
    return (0.2 * x * env).astype(np.float32)


# ------------------------------------------------------------------ augmentation


def test_time_stretch_changes_length_not_pitch():
    y = A.time_stretch(tone(440), 1.25)
    assert len(y) == 20000
    assert abs(peak_hz(y) - 440) < 5


def test_pitch_shift_moves_pitch_keeps_length():
    y = A.pitch_shift(tone(440), 12)
    assert len(y) == RATE
    assert abs(peak_hz(y) - 880) < 10
    assert abs(peak_hz(A.pitch_shift(tone(440), -5)) - 440 * 2 ** (-5 / 12)) < 10


def test_formant_warp_moves_the_spectral_envelope():
    x = speechlike()
    centroid = lambda v: float((np.abs(np.fft.rfft(v)) ** 2 * np.fft.rfftfreq(len(v))).sum()  # noqa: E731
                               / (np.abs(np.fft.rfft(v)) ** 2).sum())
    assert centroid(A.formant_warp(x, 1.15)) > 1.05 * centroid(x)
    assert centroid(A.formant_warp(x, 0.87)) < 0.95 * centroid(x)


def test_telephone_band():
    rng = np.random.default_rng(0)
    y = A.band_limit(rng.normal(0, 0.1, RATE).astype(np.float32), "telephone", rng)
    assert band_energy(y, 0, 200) < 1e-3 and band_energy(y, 3600, 8000) < 1e-3
    assert band_energy(y, 400, 3300) > 0.95


def test_noise_hits_the_requested_snr():
    x, rng = speechlike(), np.random.default_rng(1)
    for kind in ("white", "pink", "babble"):
        n = A.noise(kind, len(x), rng, babble=[speechlike(seed=5), speechlike(seed=6)])
        y = A.add_noise(x, n, 10.0)
        snr = 20 * np.log10(A._active_rms(x) / np.sqrt(np.mean((y - x) ** 2)))
        assert abs(snr - 10.0) < 0.1, kind


@pytest.mark.parametrize("kind,kbps", [("mp3", 32), ("opus", 24)])
def test_codec_round_trip_is_aligned(kind, kbps):
    x = speechlike()
    y = A.codec_round_trip(x, kind, kbps)
    assert len(y) == len(x)
    assert np.corrcoef(x, y)[0, 1] > 0.9  # a misaligned round trip would be uncorrelated


def test_reverb_rt60():
    rng = np.random.default_rng(2)
    h = A.room_impulse(rng, 0.5)
    energy = np.cumsum(h[::-1] ** 2)[::-1]  # Schroeder backward integration
    db = 10 * np.log10(energy / energy[0])
    t20 = np.argmax(db < -25) - np.argmax(db < -5)  # -5 to -25 dB, x3 = RT60
    assert abs(3 * t20 / RATE - 0.5) < 0.1


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31))
def test_microphone_chain_is_seeded_bounded_and_timed(seed):
    x = speechlike(2.0)
    mic = A.Microphone()
    a = mic.apply(x, np.random.default_rng(seed), babble=[speechlike(seed=9)])
    b = mic.apply(x, np.random.default_rng(seed), babble=[speechlike(seed=9)])
    assert np.array_equal(a.pcm, b.pcm) and a.effects == b.effects
    assert a.pcm.dtype == np.float32 and np.isfinite(a.pcm).all() and np.abs(a.pcm).max() <= 1.0
    assert abs(len(a.pcm) - len(x) * a.tempo) <= 1


# ------------------------------------------------------------------ listener


def random_listener(seed: int = 0) -> Listener:
    torch.manual_seed(seed)
    net = Listener(128, 32, dim=32, lookahead=2, history=40, blocks=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


@settings(max_examples=8, deadline=None)
@given(chunks=st.lists(st.integers(1, 9000), min_size=1, max_size=12), seed=st.integers(0, 1000),
       cached=st.booleans())
def test_listener_streaming_equals_offline(chunks, seed, cached):
    """Blocks of 4 frames computed as a Session does (pcm trimmed to left_context_samples), by the stateless
    front end or by a stream's caching one, == offline."""
    cfg = mini().codec
    base = ListeningFrontEnd(cfg, random_listener(seed))
    fe = base.streamer() if cached else base
    pcm = torch.from_numpy(speechlike(4.0, seed))
    full = base.offline(pcm)
    buf, offset, received, done, rows = torch.zeros(0), 0, 0, 0, []
    bounds = np.cumsum(chunks + [len(pcm)])
    prev = 0
    for b in bounds:
        b = min(int(b), len(pcm))
        buf, received = torch.cat([buf, pcm[prev:b]]), b
        prev = b
        ready = fe.frames_ready(received) if b < len(pcm) else len(full)
        while done + 4 <= ready or (b == len(pcm) and done < len(full)):
            stop = min(done + 4, len(full))
            rows.append(fe.features(buf, done, stop, offset))
            done = stop
            drop = done * fe.spf - fe.left_context_samples - offset
            if drop > 0:
                buf, offset = buf[drop:], offset + drop
        if b == len(pcm):
            break
    assert torch.allclose(torch.cat(rows), full, atol=1e-5)


def test_normalisation_removes_level_and_channel():
    """Without the prior, a per-band offset of the log-mel rows (a gain or a microphone's EQ) changes nothing."""
    net = random_listener()
    net.prior_frames = 0.0
    x = torch.randn(100, 128)
    eq = torch.randn(32).repeat(4)
    assert torch.allclose(net.normalise(x), net.normalise(x + eq), atol=1e-4)


def test_listener_config_and_loading_errors(tmp_path):
    cfg = mini().override({"codec.listener": "mel-adapter"})
    with pytest.raises(InputError, match="listener.safetensors"):
        make_front_end(cfg.codec)
    with pytest.raises(InputError, match="listener weights not found"):
        make_front_end(cfg.codec, folder=tmp_path)
    with pytest.raises(ConfigError, match="codec.listener"):
        mini().override({"codec.listener": "mel-adapter", "codec.audio": "wav2vec2"})
    with pytest.raises(InputError, match="not a listener"):
        Listener.from_state_dict({"x": torch.zeros(1)}, cfg.codec)


def test_train_listener_resumes_and_exports(tmp_path):
    from avatarforcing.api import Avatar, model_folder
    from avatarforcing.data.corpus import synth
    from avatarforcing.train.listener import ListenerTrainConfig, train_listener

    corpus = tmp_path / "corpus"
    synth(corpus, 2, 4.0, "train", seed=1, progress=False, clip_files=False)
    synth(corpus, 1, 4.0, "heldout", seed=1, progress=False, clip_files=False)
    cfg = mini()
    tcfg = ListenerTrainConfig(steps=4, batch=2, crop_seconds=2.0, workers=0)
    train_listener(corpus, model_folder("mini"), tmp_path / "run", cfg, tcfg, progress=False)
    tcfg = ListenerTrainConfig(steps=6, batch=2, crop_seconds=2.0, workers=0)
    report = train_listener(corpus, model_folder("mini"), tmp_path / "run", cfg, tcfg, progress=False,
                            export=tmp_path / "model")
    assert report["steps"] == 6
    logs = [json.loads(line) for line in (tmp_path / "run" / "listener.jsonl").read_text().splitlines()]
    assert any("injection_rel" in r for r in logs)  # judged by what the DiT receives
    assert report["heldout"]["injection_rel_raw"] > 0 and "opening_r" in report["heldout"]
    av = Avatar.load(tmp_path / "model")
    assert isinstance(av.front_end, ListeningFrontEnd)
    mel = MelFrontEnd(cfg.codec)
    assert av.front_end.lookahead_samples == mel.lookahead_samples + 2 * cfg.codec.samples_per_frame
    window_ms = 1000 * cfg.stream.window_blocks * cfg.stream.block_frames * cfg.codec.temporal_stride / cfg.codec.fps
    assert av.lookahead_ms() == pytest.approx(window_ms + 1000 * av.front_end.lookahead_samples / cfg.codec.sample_rate)
    frames = av.generate(np.zeros((128, 128, 3), np.uint8), speechlike(1.0))
    assert frames.shape == (25, 128, 128, 3)

"""Shared test setup and the helpers several test files use: tiny configs and models, test speech, ports."""

import dataclasses
import os
import resource
import socket

import numpy as np
import pytest
import torch

from avatarforcing.config import ModelConfig, preset
from avatarforcing.model import AvatarDiT
from avatarforcing.stream.window import WindowSampler

# at most 2 threads; fewer when OMP_NUM_THREADS says so (benchmarks/mutation.py runs one thread per mutant)
torch.set_num_threads(min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2)))

ASSETS = os.path.join(os.path.dirname(__file__), "..", "avatarforcing", "assets")


@pytest.fixture
def seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------- tiny models


TINY = ModelConfig(dim=48, ffn_dim=64, num_heads=2, num_layers=3, latent_channels=4, text_dim=16, text_len=5,
                   freq_dim=32, audio_dim=6, audio_pack=4, audio_token_dim=8, audio_blocks=(1, 2))


def tiny_model(**kw) -> AvatarDiT:
    torch.manual_seed(0)
    m = AvatarDiT(dataclasses.replace(TINY, **kw)).eval()
    with torch.no_grad():  # non-trivial modulation/bias values
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


TINY_MODEL = ModelConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, latent_channels=4, text_dim=0, text_len=0,
                         freq_dim=16, audio_dim=128, audio_token_dim=8, audio_blocks=(0, 1))


def tiny_cfg(**stream):
    c = preset("mini")
    c = dataclasses.replace(c, model=TINY_MODEL, codec=dataclasses.replace(c.codec, height=32, width=32,
                                                                         vae_base_dim=8))
    return c.override({f"stream.{k}": v for k, v in stream.items()}) if stream else c.validate()


def sampler(cfg, opts=None, seed=0, **kw):
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval()
    ref = torch.randn(1, cfg.model.latent_channels, 1, 4, 4)
    return WindowSampler(model, cfg, ref, torch.Generator().manual_seed(seed), opts, **kw)


def audio(cfg):
    return torch.randn(1, cfg.stream.block_frames, 4, cfg.model.audio_dim)


# ---------------------------------------------------------------- servers


def speech(seconds=1.0):
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


def tts_chunks(seconds: float, rate: int = 24000, chunk_ms: int = 20) -> list[np.ndarray]:
    """Test speech (never exactly zero, so its extent in output PCM is exact) as a TTS engine at ``rate`` delivers
    it: float32 chunks of ``chunk_ms``."""
    from avatarforcing.data.audio import resample

    pcm = resample(speech(seconds) + 0.01, 16000, rate)
    n = rate * chunk_ms // 1000
    return [pcm[i:i + n] for i in range(0, len(pcm), n)]


@pytest.fixture(scope="module")
def tiny_avatar():
    """A random-weight avatar of the tiny config (32 x 32 frames): the live engine's contracts, fast."""
    from avatarforcing.api import Avatar

    return Avatar.random(tiny_cfg())


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

"""Configs are data: dataclasses with presets, YAML round-trip and validation.

Presets:
  * ``wan-1.3b``: the published AvatarForcing shape (Wan2.1-T2V-1.3B + OmniAvatar audio),
    832x480, B=4 L=4 N=1 (docs/design.md s1-s5).
  * ``mini``: the CPU model this project trains and ships (128x128, docs/training.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

POSITION_SCHEMES = ("reindexed", "release", "absolute")  # stream.positions; laid out by stream/positions.py


@dataclass
class ModelConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    latent_channels: int = 16  # out channels; in = 2 * latent + 1 with reference conditioning
    reference_conditioning: bool = True  # 33-channel input: noisy + reference latent + mask
    text_dim: int = 4096  # 0: no cross-attention
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    audio_dim: int = 10752  # per video frame features; 0: no audio
    audio_pack: int = 4  # video frames per latent frame packed into one audio token
    audio_token_dim: int = 32
    audio_blocks: tuple[int, int] = (2, 15)  # inclusive range of blocks receiving audio

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def in_channels(self) -> int:
        return 2 * self.latent_channels + 1 if self.reference_conditioning else self.latent_channels

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels per axis (time, height, width), as in Wan: 44/42/42 for head_dim 128."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return d - 2 * hw, hw, hw

    def audio_block_ids(self) -> list[int]:
        if self.audio_dim == 0:
            return []
        lo, hi = self.audio_blocks
        return list(range(lo, hi + 1))


@dataclass
class CodecConfig:
    vae: str = "wan"  # "wan" | "mini"
    height: int = 480
    width: int = 832
    spatial_stride: int = 8
    temporal_stride: int = 4  # latent 0 = 1 frame, then 4 frames per latent frame
    vae_base_dim: int = 96  # mini VAE width; for "wan" the diffusers config decides
    audio: str = "wav2vec2"  # "wav2vec2" | "mel"
    sample_rate: int = 16000
    fps: int = 25
    audio_lookahead_frames: int = 0  # right context a streaming audio front end waits for
    audio_left_context_frames: int = 50  # bounded left context (wav2vec2 streaming)
    n_mels: int = 32  # mel front end: bands per 10 ms hop
    # mel rows through the listener (codecs/listener.py, weights listener.safetensors): any voice and microphone
    # -> the rows of clean speech the DiT was trained on
    listener: str = "none"  # "none" | "mel-adapter"
    listener_history_frames: int = 150  # its per-band normalisation window (6 s)
    listener_lookahead_frames: int = 2  # its right context, added to the front end's look-ahead
    # how inputs are prepared; a converted official checkpoint uses the release's choices (docs/weights.md):
    # bilinear, no EXIF rotation, sinc_hann, clip
    image_filter: str = "lanczos"  # "lanczos" | "bilinear" (antialiased, as the release's torchvision resize)
    exif_rotate: bool = True  # apply a portrait's EXIF orientation; the release reads the pixels as stored
    resampler: str = "kaiser"  # "kaiser" (ours, polyphase) | "sinc_hann" (torchaudio's default algorithm)
    audio_rows: str = "streaming"  # "streaming": bounded windows per block | "clip": a file's rows at once
    audio_clip_tail_frames: int = 80  # clip rows: audio frames after the video's end that the encoder sees

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.spatial_stride, self.width // self.spatial_stride


@dataclass
class StreamConfig:
    block_frames: int = 4  # B: latent frames per block
    window_blocks: int = 4  # L: blocks in the local-future window
    passes: int = 1  # N: forward passes per step
    denoising_steps: tuple[int, ...] = field(default=(1000, 800, 400, 200),  # newest -> oldest, warped by shift
                                             metadata={"variable_length": True})
    num_train_timesteps: int = 1000
    shift: float = 5.0
    temporal_anchor_frames: int = 2
    clean_cache_pass: bool = True
    # where each pass puts its frames on the time axis (stream/positions.py): "reindexed" (the paper) | "release"
    # (the published code) | "absolute" (the no-re-indexing ablation, also reachable as Options.rope_reindex)
    positions: str = "reindexed"
    output: str = "aligned"  # "aligned": frame i <-> audio frame i | "release": frame 0 = the reference
    teacher_steps: int = 50
    guidance: float = 4.5


@dataclass
class TrainConfig:
    """What the model's training losses take from its config (train/stages.py). The recipe's schedule and
    optimiser settings (steps, batches, learning rates) are ``train.recipe.RecipeConfig``: one table each."""

    audio_dropout: float = 0.1  # teacher stage: audio rows dropped, for classifier-free guidance
    min_score_t: int = 20  # DMD: the scores are judged at noise levels in [min, max] / 1000
    max_score_t: int = 980


# fields that earlier versions wrote into every config.yaml and nothing ever read: a model folder written then
# still loads (the values those versions wrote for wan-1.3b and mini are accepted, and change nothing); any other
# value is refused with the reason, so setting a field that nothing reads is impossible
_RECIPE = "training hyper-parameters are train.recipe.RecipeConfig's (`train recipe --config`)"
REMOVED: dict[str, tuple[tuple, str]] = {
    "stream.style_anchor": ((True,), "the style anchor is switched by the ablation --no-style-anchor (Options)"),
    "stream.rope_reindex": ((True,), "positions are stream.positions; the ablation is --no-rope-reindex"),
    "stream.audio_zero_pad": ((True,), "the anchor's zero audio is switched by the ablation --no-audio-zero-pad"),
    **{f"train.{name}": (values, _RECIPE) for name, values in {
        "lr": (1.5e-6, 2e-4), "critic_lr": (4e-7, 1e-4), "betas": ([0.0, 0.999],), "weight_decay": (0.01,),
        "batch_size": (64, 4), "grad_accum": (1,), "grad_clip": (10.0, 1.0), "clip_latent_frames": (21, 9),
        "ema_decay": (0.99,), "ema_start": (200, 50), "critic_updates": (5,), "steps": (1000, 2000),
        "log_every": (10,), "save_every": (100,), "sample_every": (0,), "text_dropout": (0.1,), "seed": (0,),
    }.items()},
}


@dataclass
class Config:
    name: str = "wan-1.3b"
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        base = preset(data["preset"]) if "preset" in data else cls()
        return _merge(base, {k: v for k, v in data.items() if k != "preset"}, source).validate()

    @classmethod
    def load(cls, path: str | Path) -> Config:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        return cls.from_dict(data or {}, source=str(p))

    def override(self, dotted: dict[str, Any]) -> Config:
        """Apply ``{"stream.window_blocks": 2, ...}`` overrides and re-validate."""
        nested: dict[str, Any] = {}
        for key, value in dotted.items():
            *head, last = key.split(".")
            d = nested
            for h in head:
                d = d.setdefault(h, {})
            d[last] = value
        return _merge(self, nested, "override").validate()


def mini() -> Config:
    """The CPU model: 128x128, 16x16x8 latents (mini VAE), 64 tokens per latent frame.

    dim 256 x 8 layers (5.86M parameters; docs/design.md s7 has the 2-core budget it fits);
    B=1 latent frame (4 video frames = 160 ms) per step keeps each step inside the real-time budget.
    """
    return Config(
        name="mini",
        model=ModelConfig(
            dim=256, ffn_dim=768, num_heads=4, num_layers=8, latent_channels=8,
            text_dim=0, text_len=0, freq_dim=128, audio_dim=128, audio_token_dim=32,
            audio_blocks=(1, 6),
        ),
        codec=CodecConfig(vae="mini", height=128, width=128, vae_base_dim=32, audio="mel",
                          audio_lookahead_frames=2, n_mels=32),
        stream=StreamConfig(block_frames=1, window_blocks=4, temporal_anchor_frames=1, teacher_steps=20,
                            guidance=2.0),
    )


def wan_1_3b() -> Config:
    return Config(name="wan-1.3b")


PRESETS = {"mini": mini, "wan-1.3b": wan_1_3b}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]().validate()


# ---------------------------------------------------------------- helpers


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _merge(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    known = {f.name: f for f in fields(obj)}
    updates = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in REMOVED:
            written, why = REMOVED[path]
            if any(value == w and isinstance(value, bool) == isinstance(w, bool) for w in written):
                continue  # what an earlier version wrote, never read: nothing to apply
            raise ConfigError(f"{source}: field '{path}' was removed, nothing read it ({why}); got {value!r}")
        if key not in known:
            raise ConfigError(f"{source}: unknown field '{path}'; expected one of {sorted(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: field '{path}' must be a mapping, got {value!r}")
            updates[key] = _merge(current, value, source, path + ".")
        else:
            updates[key] = _coerce(current, value, f"{source}: field '{path}'",
                                   known[key].metadata.get("variable_length", False))
    return dataclasses.replace(obj, **updates)


def _coerce(current: Any, value: Any, where: str, variable_length: bool = False) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if current and len(value) != len(current) and not variable_length:
            raise ConfigError(f"{where} must have {len(current)} items, got {len(value)}")
        proto = current[0] if current else value[0] if value else 0
        return tuple(_coerce(proto, v, where) for v in value)
    return value


def _check(cond: bool, field_name: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{field_name}' {why}")


def _one_of(value: str, field_name: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, field_name, f"must be one of {list(allowed)}, got {value!r}")


def release(cfg: Config) -> Config:
    """The published code's choices for everything it does differently from the paper's engine."""
    return cfg.override({"stream.positions": "release", "stream.output": "release", "codec.image_filter": "bilinear",
                         "codec.exif_rotate": False, "codec.resampler": "sinc_hann", "codec.audio_rows": "clip"})


def _validate(c: Config) -> None:
    m, k, s, t = c.model, c.codec, c.stream, c.train
    _check(m.dim > 0 and m.num_heads > 0, "model.dim", "and model.num_heads must be positive")
    _check(m.dim % m.num_heads == 0, "model.dim", f"({m.dim}) must be divisible by model.num_heads ({m.num_heads})")
    _check(m.head_dim % 2 == 0 and m.head_dim >= 6, "model.num_heads", "must leave an even head_dim >= 6 for 3-D RoPE")
    _check(m.num_layers >= 1, "model.num_layers", "must be >= 1")
    _check(m.latent_channels >= 1, "model.latent_channels", "must be >= 1")
    _check(all(p >= 1 for p in m.patch_size), "model.patch_size", "entries must be >= 1")
    if m.audio_dim:
        lo, hi = m.audio_blocks
        _check(0 <= lo <= hi < m.num_layers, "model.audio_blocks",
               f"must be an inclusive range inside [0, {m.num_layers - 1}], got {list(m.audio_blocks)}")
        _check(m.audio_pack >= 1, "model.audio_pack", "must be >= 1")
    _check(k.vae in ("wan", "mini"), "codec.vae", f"must be 'wan' or 'mini', got {k.vae!r}")
    _check(k.audio in ("wav2vec2", "mel"), "codec.audio", f"must be 'wav2vec2' or 'mel', got {k.audio!r}")
    unit = k.spatial_stride * max(m.patch_size[1], m.patch_size[2])
    _check(k.height > 0 and k.height % unit == 0, "codec.height", f"must be a positive multiple of {unit}")
    _check(k.width > 0 and k.width % unit == 0, "codec.width", f"must be a positive multiple of {unit}")
    _check(k.sample_rate % k.fps == 0, "codec.sample_rate", f"must be a multiple of codec.fps ({k.fps})")
    _check(k.temporal_stride == m.audio_pack or not m.audio_dim, "model.audio_pack",
           f"must equal codec.temporal_stride ({k.temporal_stride})")
    _check(k.audio_lookahead_frames >= 0, "codec.audio_lookahead_frames", "must be >= 0")
    _check(k.audio_left_context_frames >= 0, "codec.audio_left_context_frames", "must be >= 0")
    _check(k.audio_clip_tail_frames >= 0, "codec.audio_clip_tail_frames", "must be >= 0")
    _one_of(k.listener, "codec.listener", ("none", "mel-adapter"))
    _check(k.listener == "none" or k.audio == "mel", "codec.listener", "needs codec.audio: mel")
    _check(k.listener_history_frames >= 1, "codec.listener_history_frames", "must be >= 1")
    _check(k.listener_lookahead_frames >= 0, "codec.listener_lookahead_frames", "must be >= 0")
    _one_of(k.image_filter, "codec.image_filter", ("lanczos", "bilinear"))
    _one_of(k.resampler, "codec.resampler", ("kaiser", "sinc_hann"))
    _one_of(k.audio_rows, "codec.audio_rows", ("streaming", "clip"))
    _one_of(s.positions, "stream.positions", POSITION_SCHEMES)
    _one_of(s.output, "stream.output", ("aligned", "release"))
    _check(s.block_frames >= 1, "stream.block_frames", "must be >= 1")
    _check(s.window_blocks >= 1, "stream.window_blocks", "must be >= 1")
    _check(s.passes >= 1, "stream.passes", "must be >= 1")
    _check(len(s.denoising_steps) == s.window_blocks, "stream.denoising_steps",
           f"must list one step per window block ({s.window_blocks}), got {list(s.denoising_steps)}")
    steps = list(s.denoising_steps)
    _check(all(0 < a <= s.num_train_timesteps for a in steps), "stream.denoising_steps",
           f"entries must be in (0, {s.num_train_timesteps}]")
    _check(all(a > b for a, b in zip(steps, steps[1:])), "stream.denoising_steps",
           f"must be strictly decreasing (newest block noisiest), got {steps}")
    _check(s.shift > 0, "stream.shift", "must be positive")
    _check(0 <= s.temporal_anchor_frames <= s.block_frames, "stream.temporal_anchor_frames",
           f"must be in [0, stream.block_frames={s.block_frames}]")
    _check(s.teacher_steps >= 1, "stream.teacher_steps", "must be >= 1")
    _check(0 <= t.audio_dropout < 1, "train.audio_dropout", "must be in [0, 1)")
    _check(0 <= t.min_score_t < t.max_score_t <= s.num_train_timesteps, "train.min_score_t",
           f"and train.max_score_t must satisfy 0 <= min < max <= {s.num_train_timesteps}")

"""The VAE interface the engine sees, and the mini VAE.

Temporal grouping (as Wan): latent frame 0 <-> video frame 0; latent frame k >= 1 <-> video frames
4(k-1)+1 .. 4k. Latents are normalised per channel: z_model = (z_vae - mean) / std.
A ``StreamingDecoder`` decodes one block of latent frames per call and carries its causal state, so a
stream decoded block by block equals the full decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn


class StreamingDecoder(Protocol):
    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, n, h, w] normalised latents -> [B, 3, T, H, W] frames in [-1, 1]."""


class VideoVAE(Protocol):
    latent_channels: int
    spatial_stride: int
    temporal_stride: int

    def encode_image(self, image: Tensor) -> Tensor: ...  # [B, 3, H, W] -> [B, C, 1, h, w]
    def encode_video(self, frames: Tensor) -> Tensor: ...  # [B, 3, 1+4n, H, W] -> [B, C, 1+n, h, w]
    def stream_decoder(self) -> StreamingDecoder: ...
    def decode(self, latents: Tensor) -> Tensor: ...


class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class MiniVAE(nn.Module):
    """A small causal video autoencoder for 128x128 (any multiple of 8), stride 8x8 spatial, 4 temporal.

    Encoder: one latent frame from a group of 4 video frames stacked on channels (frame 0 alone,
    repeated). Decoder: latent frame k together with latent frame k-1 (its causal state) -> 4 frames,
    via convolutions at 1/8 .. 1/2 resolution and a final pixel shuffle (no full-resolution convs).
    """

    spatial_stride = 8
    temporal_stride = 4

    @classmethod
    def load(cls, path: str | Path, latent_channels: int, width: int) -> MiniVAE:
        """A model folder's ``vae.safetensors`` (any float dtype) as a float32 MiniVAE on the CPU."""
        from ..checkpoints import load_into, read_state_dict

        vae = cls(latent_channels, width)
        load_into(vae, {k: v.float() for k, v in read_state_dict(path).items()}, str(path))
        return vae

    def __init__(self, latent_channels: int = 8, width: int = 32):
        super().__init__()
        self.latent_channels = c = latent_channels
        t, w = self.temporal_stride, width
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(3 * t * 4, w, 3, padding=1), nn.SiLU(),  # 1/2
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(), _Res(2 * w),  # 1/4
            nn.Conv2d(2 * w, 3 * w, 4, stride=2, padding=1), nn.SiLU(), _Res(3 * w),  # 1/8
            nn.Conv2d(3 * w, c, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * c, 3 * w, 3, padding=1), nn.SiLU(), _Res(3 * w),  # 1/8
            nn.Conv2d(3 * w, 2 * w * 4, 3, padding=1), nn.PixelShuffle(2), nn.SiLU(), _Res(2 * w),  # 1/4
            nn.Conv2d(2 * w, w * 4, 3, padding=1), nn.PixelShuffle(2), nn.SiLU(), _Res(w),  # 1/2
            nn.Conv2d(w, 3 * t * 4, 3, padding=1), nn.PixelShuffle(2),  # full resolution, 3*t channels
        )
        self.register_buffer("latents_mean", torch.zeros(c))
        self.register_buffer("latents_std", torch.ones(c))

    # -- normalisation
    def _norm(self, z: Tensor) -> Tensor:
        return (z - self.latents_mean.view(1, -1, 1, 1, 1)) / self.latents_std.view(1, -1, 1, 1, 1)

    def _denorm(self, z: Tensor) -> Tensor:
        return z * self.latents_std.view(1, -1, 1, 1, 1) + self.latents_mean.view(1, -1, 1, 1, 1)

    # -- encode
    def _groups(self, frames: Tensor) -> Tensor:
        """[B, 3, 1+4n, H, W] -> [B*(1+n), 3*4, H, W] (frame 0 repeated 4 times as group 0)."""
        b, ch, t, h, w = frames.shape
        if (t - 1) % self.temporal_stride:
            raise ValueError(f"video of {t} frames: expected 1 + {self.temporal_stride}n frames")
        first = frames[:, :, :1].expand(b, ch, self.temporal_stride, h, w)
        x = torch.cat([first, frames[:, :, 1:]], dim=2)  # [B, 3, 4(1+n), H, W]
        n = x.shape[2] // self.temporal_stride
        return x.view(b, ch, n, self.temporal_stride, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b * n, -1, h, w)

    def encode_video(self, frames: Tensor) -> Tensor:
        b = frames.shape[0]
        z = self.encoder(self._groups(frames))  # [B*n, C, h, w]
        z = z.view(b, -1, *z.shape[1:]).transpose(1, 2)
        return self._norm(z)

    def encode_image(self, image: Tensor) -> Tensor:
        return self.encode_video(image[:, :, None])

    # -- decode
    def decode_step(self, z: Tensor, prev: Tensor | None) -> Tensor:
        """One latent frame [B, C, h, w] (+ previous, or None for the first) -> [B, 3, 4, H, W]."""
        z = self._denorm(z[:, :, None])[:, :, 0]
        prev = torch.zeros_like(z) if prev is None else self._denorm(prev[:, :, None])[:, :, 0]
        x = self.decoder(torch.cat([z, prev], dim=1))
        b, _, h, w = x.shape
        return x.view(b, self.temporal_stride, 3, h, w).transpose(1, 2)

    def stream_decoder(self) -> MiniStreamingDecoder:
        return MiniStreamingDecoder(self)

    def decode(self, latents: Tensor) -> Tensor:
        return self.stream_decoder().decode(latents)

    def forward(self, frames: Tensor) -> Tensor:
        """Reconstruction for training: frames [B, 3, 1+4n, H, W] -> same shape (unclamped)."""
        return self.decode_unclamped(self.encode_video(frames))

    def decode_unclamped(self, z: Tensor) -> Tensor:
        """Differentiable decode of normalised latents [B, C, 1+n, h, w] -> [B, 3, 1+4n, H, W]."""
        outs, prev = [], None
        for k in range(z.shape[2]):
            x = self.decode_step(z[:, :, k], prev)
            outs.append(x[:, :, -1:] if k == 0 else x)
            prev = z[:, :, k]
        return torch.cat(outs, dim=2)


class MiniStreamingDecoder:
    def __init__(self, vae: MiniVAE):
        self.vae = vae
        self.prev: Tensor | None = None  # causal state: the last latent frame decoded
        self.started = False

    @staticmethod
    @torch.no_grad()
    def decode_many(decoders: list[MiniStreamingDecoder], latents: list[Tensor]) -> list[Tensor]:
        """Several streams' next blocks [1, C, n, h, w] (same n, every decoder started) in one decoder call per
        latent frame: each stream's frames equal its own ``decode`` (to float rounding)."""
        if not all(d.started and d.vae is decoders[0].vae for d in decoders):
            return [d.decode(z) for d, z in zip(decoders, latents)]
        z_all = torch.cat(latents)
        outs = []
        for k in range(z_all.shape[2]):
            z = z_all[:, :, k]
            outs.append(decoders[0].vae.decode_step(z, torch.cat([d.prev for d in decoders])))
            for i, d in enumerate(decoders):
                d.prev = z[i:i + 1]
        return list(torch.cat(outs, dim=2).clamp(-1, 1).split(1))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        outs = []
        for k in range(latents.shape[2]):
            z = latents[:, :, k]
            x = self.vae.decode_step(z, self.prev)
            outs.append(x[:, :, -1:] if not self.started else x)
            self.prev, self.started = z, True
        return torch.cat(outs, dim=2).clamp(-1, 1)

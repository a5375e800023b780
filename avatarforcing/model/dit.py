"""The avatar DiT: Wan2.1 blocks + reference-latent conditioning + OmniAvatar audio injection.

    x_in = [noisy latent | reference latent | mask]              [B, 2C+1, F, H, W]
    tokens = patch_embedding(x_in)                                [B, F*h*w, D]
    e = time_embedding(sinusoid(t))  (per latent frame)          [B, F, D]
    for i, block in enumerate(blocks):
        if i in audio blocks: tokens += audio_cond_projs[i-lo](audio_pack(audio))   (per frame)
        tokens = block(tokens, time_projection(e), rope(ids), text)
    v = unpatchify(head(tokens, e))                               [B, C, F, H, W]

Positions are passed in explicitly (``frame_pos``); the model holds no position tables and no
state: a streaming caller hands in the cached keys of earlier calls as a ``KVPrefix``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .layers import AudioPack, Head, KVPrefix, WanBlock, timestep_embedding
from .math import rope_freqs, token_ids


class AvatarDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        if cfg.text_dim:
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                                nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(
            WanBlock(d, cfg.ffn_dim, cfg.num_heads, cfg.eps, cross_attention=bool(cfg.text_dim))
            for _ in range(cfg.num_layers)
        )
        self.head = Head(d, cfg.latent_channels, cfg.patch_size, cfg.eps)
        self.audio_blocks = cfg.audio_block_ids()
        if self.audio_blocks:
            self.audio_proj = AudioPack(cfg.audio_dim, cfg.audio_pack, cfg.audio_token_dim)
            self.audio_cond_projs = nn.ModuleList(nn.Linear(cfg.audio_token_dim, d) for _ in self.audio_blocks)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        frame_pos: Tensor,
        audio: Tensor | None = None,
        context: Tensor | None = None,
        frame_mask: Tensor | None = None,
        prefix: KVPrefix | None = None,
        return_kv: bool = False,
    ):
        """Predict the flow velocity v = eps - x0.

        x:         [B, in_channels, F, H, W] conditioned input (see ``condition``)
        t:         [B, F] timesteps in [0, num_train_timesteps], one per latent frame
        frame_pos: [F] integer time positions of the frames (any value; RoPE is relative)
        audio:     [B, F, audio_pack, audio_dim] audio rows per latent frame, or None (no injection)
        context:   [B, Lt, text_dim] text embeddings, or None (cross-attention skipped)
        frame_mask:[F, F] bool, frame i may attend to frame j (dense regime); None = bidirectional
        prefix:    cached keys/values (streaming regime), attended to by every query of this call
        return_kv: also return this call's per-layer (keys without RoPE, values)
        """
        cfg = self.cfg
        b, _, f, hh, ww = x.shape
        pt, ph, pw = cfg.patch_size
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {x.shape[1]}")
        if f % pt or hh % ph or ww % pw:
            raise ValueError(f"latent grid {(f, hh, ww)} is not divisible by the patch size {cfg.patch_size}")
        gf, gh, gw = f // pt, hh // ph, ww // pw
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, L, D]
        t = t.view(b, gf, pt)[..., 0]  # one timestep per patch-frame

        e = self.time_embedding(timestep_embedding(t, cfg.freq_dim).to(tokens.dtype)).float()  # [B, F, D]
        e6 = self.time_projection(e.to(tokens.dtype)).float().unflatten(-1, (6, cfg.dim))  # [B, F, 6, D]
        cos, sin = rope_freqs(token_ids(frame_pos.view(gf, pt)[:, 0], gh, gw), cfg.rope_split, cfg.rope_theta)
        if context is not None and cfg.text_dim:
            context = self.text_embedding(context)
        audio_tok = None
        if audio is not None and self.audio_blocks:
            audio_tok = self.audio_proj(audio.to(tokens.dtype))  # [B, F, token_dim]
        mask = None
        if frame_mask is not None:
            per_frame = gh * gw
            mask = frame_mask.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
            if prefix is not None:
                raise ValueError("frame_mask and prefix are exclusive (dense vs streaming regime)")

        kv = []
        for i, block in enumerate(self.blocks):
            if audio_tok is not None and i in self.audio_blocks:
                inject = self.audio_cond_projs[i - self.audio_blocks[0]](audio_tok)  # [B, F, D]
                tokens = tokens + inject.repeat_interleave(gh * gw, dim=1)
            layer_prefix = None
            if prefix is not None:
                layer_prefix = (prefix.keys[i], prefix.values[i], prefix.cos, prefix.sin)
            tokens, k, v = block(tokens, e6, gf, cos, sin, context, mask, layer_prefix)
            if return_kv:
                kv.append((k, v))
        out = self.head(tokens, e, gf)  # [B, L, pt*ph*pw*C]
        out = out.view(b, gf, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        v = out.reshape(b, -1, f, hh, ww)
        return (v, kv) if return_kv else v

    # ------------------------------------------------------------------ helpers

    def condition(self, latents: Tensor, reference: Tensor, is_reference: Tensor) -> Tensor:
        """[noisy latent | reference latent repeated over frames | mask (0 on reference frames, else 1)].

        latents [B, C, F, H, W]; reference [B, C, 1, H, W]; is_reference [F] bool.
        """
        if not self.cfg.reference_conditioning:
            return latents
        b, c, f, h, w = latents.shape
        ref = reference.expand(b, c, f, h, w)
        mask = (~is_reference).to(latents.dtype).view(1, 1, f, 1, 1).expand(b, 1, f, h, w)
        return torch.cat([latents, ref, mask], dim=1)

    def rope(self, frame_pos: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """RoPE tables for the tokens of frames at ``frame_pos`` on a latent grid (pre-patch size)."""
        _, ph, pw = self.cfg.patch_size
        return rope_freqs(token_ids(frame_pos, height // ph, width // pw), self.cfg.rope_split, self.cfg.rope_theta)


def pack_audio_rows(rows: Tensor, pack: int) -> Tensor:
    """Audio rows per video frame -> [B, F, pack, dim] rows per latent frame (docs/design.md s3).

    rows [B, R, dim]. If R is not a multiple of ``pack`` (the usual 1 + 4k with the anchor row),
    the first row is repeated pack-1 more times, so row 0 fills latent frame 0 on its own.
    """
    b, r, d = rows.shape
    if r % pack:
        rows = torch.cat([rows[:, :1].expand(b, pack - 1, d), rows], dim=1)
        r = rows.shape[1]
    if r % pack:
        raise ValueError(f"{r} audio rows cannot be packed by {pack} (expected 1 + {pack}k or {pack}k)")
    return rows.view(b, r // pack, pack, d)


def velocity_to_x0(x_t: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """Flow matching: x_t = (1-s) x0 + s eps, v = eps - x0  =>  x0 = x_t - s v."""
    return x_t - sigma * v


def x0_to_velocity(x_t: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - x0) / sigma.clamp_min(1e-6)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

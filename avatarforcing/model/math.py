"""RoPE from explicit integer positions, and the attention seam."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_ids(frame_pos: Tensor, height: int, width: int) -> Tensor:
    """Integer (time, height, width) ids for every token of a latent grid, frame-major: [F*H*W, 3]."""
    f = frame_pos.to(torch.int64)
    h = torch.arange(height, device=f.device)
    w = torch.arange(width, device=f.device)
    grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def rope_freqs(ids: Tensor, split: tuple[int, int, int], theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables [L, head_dim/2] for ids [L, 3]; any integer position, no table ceiling.

    Axis a gets split[a] channels (split[a]/2 complex pairs) with inverse frequencies
    theta^(-2i/split[a]), as Wan's per-axis tables. Angles are formed in float64.
    """
    angles = []
    for axis, dim in enumerate(split):
        inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].to(torch.float64)[:, None] * inv[None, :])
    a = torch.cat(angles, dim=-1)
    return a.cos().float(), a.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (even, odd) of x [B, L, H, D] by the angles of cos/sin [L, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D], mask [Lq, Lk] bool (True = attend) -> [B, Lq, H*D].

    The one seam for attention kernels: SDPA picks flash / memory-efficient kernels on GPU.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)

"""Building blocks of the Wan DiT. Parameter names follow the original Wan2.1 layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .math import apply_rope, attention


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoid of raw t in [0, 1000], cos first then sin, freqs 10000^(-i/(dim/2)), float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


@dataclass
class KVPrefix:
    """Keys (without RoPE) and values from earlier calls that this call's queries also attend to.

    keys/values: one tensor per layer, [B, Lk, heads, head_dim]; cos/sin: RoPE of the prefix tokens.
    """

    keys: list[Tensor]
    values: list[Tensor]
    cos: Tensor
    sin: Tensor


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)  # over the full width, before the head split
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                prefix: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (output, k without RoPE, v) so a caller can cache this call's keys."""
        h = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (h, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (h, -1))
        v = self.v(x).unflatten(-1, (h, -1))
        q_r, k_r = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if prefix is not None:
            pk, pv, pcos, psin = prefix
            k_r = torch.cat([apply_rope(pk, pcos, psin).to(k_r.dtype), k_r], dim=1)
            v_all = torch.cat([pv.to(v.dtype), v], dim=1)
        else:
            v_all = v
        return self.o(attention(q_r, k_r, v_all, mask)), k, v


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (h, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (h, -1))
        v = self.v(context).unflatten(-1, (h, -1))
        return self.o(attention(q, k, v))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, F, HW, D] float32, shift/scale [B, F, 1, D]."""
    return x * (1 + scale) + shift


class WanBlock(nn.Module):
    """norm1 -> modulate -> self-attn -> gate; norm3 -> cross-attn; norm2 -> modulate -> FFN -> gate."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attention else None
        self.cross_attn = CrossAttention(dim, num_heads, eps) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor, frames: int, cos: Tensor, sin: Tensor, context: Tensor | None,
                mask: Tensor | None = None, prefix=None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, D]; e [B, F, 6, D] per-frame time projection (float32)."""
        b, n, d = x.shape
        mod = (self.modulation.float()[:, None] + e).unsqueeze(3)  # [B, F, 6, 1, D]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod.unbind(2)

        def per_frame(t: Tensor) -> Tensor:
            return t.float().view(b, frames, n // frames, d)

        y = modulate(per_frame(self.norm1(x.float())), shift_msa, scale_msa).view(b, n, d).type_as(x)
        y, k, v = self.self_attn(y, cos, sin, mask, prefix)
        x = (per_frame(x) + per_frame(y) * gate_msa).view(b, n, d).type_as(x)
        if self.cross_attn is not None and context is not None:
            n3 = self.norm3
            y = F.layer_norm(x.float(), (d,), n3.weight.float(), n3.bias.float(), n3.eps).type_as(x)
            x = x + self.cross_attn(y, context)
        y = modulate(per_frame(self.norm2(x.float())), shift_ffn, scale_ffn).view(b, n, d).type_as(x)
        y = self.ffn(y)
        x = (per_frame(x) + per_frame(y) * gate_ffn).view(b, n, d).type_as(x)
        return x, k, v


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor, frames: int) -> Tensor:
        """x [B, L, D]; e [B, F, D] time embedding (not the 6x projection)."""
        b, n, d = x.shape
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unsqueeze(3).unbind(2)
        y = modulate(self.norm(x.float()).view(b, frames, n // frames, d), shift, scale)
        return self.head(y.view(b, n, d).type_as(x))


class AudioPack(nn.Module):
    """Every ``pack`` audio rows (video frames) -> one token per latent frame: Linear -> LayerNorm."""

    def __init__(self, audio_dim: int, pack: int, token_dim: int):
        super().__init__()
        self.proj = nn.Linear(audio_dim * pack, token_dim)
        self.norm_out = nn.LayerNorm(token_dim)

    def forward(self, rows: Tensor) -> Tensor:
        """rows [B, F, pack, audio_dim] (time-major within a pack) -> [B, F, token_dim]."""
        return self.norm_out(self.proj(rows.flatten(2)))

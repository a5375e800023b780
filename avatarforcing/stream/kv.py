"""The fixed-size KV buffer of the streaming window.

Per layer it holds keys (without RoPE) and values for 1 style-anchor frame followed by the temporal
anchor (the last ``n_temporal`` latent frames of the most recently finalised block). Its size is fixed
at construction from the config and never changes; writes go into place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import KVPrefix


class KVBuffer:
    def __init__(self, layers: int, batch: int, tokens_per_frame: int, heads: int, head_dim: int,
                 n_temporal: int, device, dtype):
        self.tpf, self.n_temporal = tokens_per_frame, n_temporal
        shape = (batch, (1 + n_temporal) * tokens_per_frame, heads, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.temporal_frames = 0  # how many temporal-anchor frames hold data (0 until a block is final)

    def write_anchor(self, kv: list[tuple[Tensor, Tensor]]) -> None:
        for i, (k, v) in enumerate(kv):
            self.keys[i][:, : self.tpf] = k
            self.values[i][:, : self.tpf] = v

    def write_block(self, kv: list[tuple[Tensor, Tensor]]) -> None:
        """Keep the last ``n_temporal`` frames of a finalised block as the temporal anchor."""
        if self.n_temporal == 0:
            return
        n = self.n_temporal * self.tpf
        for i, (k, v) in enumerate(kv):
            self.keys[i][:, self.tpf:] = k[:, -n:]
            self.values[i][:, self.tpf:] = v[:, -n:]
        self.temporal_frames = self.n_temporal

    def prefix(self, use_anchor: bool, use_temporal: bool, cos: Tensor, sin: Tensor) -> KVPrefix | None:
        """Views of the buffer for this call; ``cos``/``sin`` must cover exactly the frames selected."""
        lo = 0 if use_anchor else self.tpf
        hi = self.tpf * (1 + (self.temporal_frames if use_temporal else 0))
        if hi <= lo:
            return None
        return KVPrefix([k[:, lo:hi] for k in self.keys], [v[:, lo:hi] for v in self.values], cos, sin)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

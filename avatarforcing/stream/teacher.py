"""The bidirectional teacher as a streaming baseline: overlapping chunks, N Euler steps with audio CFG.

Each chunk is [reference frame (clean) | overlap frames from the previous chunk (clean) | new frames];
only the new frames are denoised, from pure noise over the teacher's shifted grid, with classifier-free
guidance on audio (the negative branch has all-zero audio): v = v_neg + g (v_pos - v_neg).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import Config
from ..model import AvatarDiT
from .schedule import teacher_sigmas
from .window import Trace, noise_like


def teacher_velocity(model: AvatarDiT, x_in: Tensor, t: Tensor, pos: Tensor, audio: Tensor | None,
                     guidance: float, text: Tensor | None = None) -> Tensor:
    v_pos = model(x_in, t, pos, audio=audio, context=text)
    if audio is None or guidance == 1.0:
        return v_pos
    v_neg = model(x_in, t, pos, audio=torch.zeros_like(audio), context=text)
    return v_neg + guidance * (v_pos - v_neg)


class TeacherSampler:
    """One stream, or N streams together (reference [N, ...], one generator per stream)."""

    def __init__(self, model: AvatarDiT, cfg: Config, reference: Tensor,
                 generator: torch.Generator | Sequence[torch.Generator], chunk_blocks: int | None = None,
                 steps: int | None = None, guidance: float | None = None, text: Tensor | None = None):
        s = cfg.stream
        self.text = text  # [N, text_len, text_dim] or None
        self.model, self.cfg, self.reference = model, cfg, reference
        self.gens = generator
        self.B = s.block_frames
        self.chunk_blocks = chunk_blocks or s.window_blocks
        self.sigmas = teacher_sigmas(steps or s.teacher_steps, s.shift)
        self.guidance = s.guidance if guidance is None else guidance
        self.overlap = s.temporal_anchor_frames
        self.T = s.num_train_timesteps
        self.pending: list[Tensor | None] = []  # audio rows per block waiting for a full chunk
        self.context: Tensor | None = None  # last clean frames of the previous chunk
        self.trace = Trace()
        self.emitted_blocks = 0

    @torch.no_grad()
    def push(self, audio: Tensor | None) -> list[Tensor]:
        self.pending.append(audio)
        if len(self.pending) < self.chunk_blocks:
            return []
        return self._chunk()

    @torch.no_grad()
    def drain(self) -> list[Tensor]:
        return self._chunk() if self.pending else []

    drain_step = drain  # the last chunk is one step

    @property
    def empty(self) -> bool:
        return not self.pending

    def _chunk(self) -> list[Tensor]:
        blocks, self.pending = self.pending, []
        n_new = len(blocks) * self.B
        ref = self.reference
        n, c, _, h, w = ref.shape
        ctx = self.context if self.context is not None else ref[:, :, :0]
        n_clean = 1 + ctx.shape[2]
        x = noise_like((n, c, n_new, h, w), self.gens, ref)
        audio = None
        if all(a is not None for a in blocks):
            new_audio = torch.cat(blocks, dim=1)
            clean_audio = torch.zeros_like(new_audio[:, :1]).expand(-1, n_clean, -1, -1)
            audio = torch.cat([clean_audio, new_audio], dim=1)  # anchor-audio zero padding
        f = n_clean + n_new
        pos = torch.arange(f, device=ref.device)
        is_ref = torch.zeros(f, dtype=torch.bool, device=ref.device)
        is_ref[0] = True
        for s_now, s_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            seq = torch.cat([ref, ctx, x], dim=2)
            t = torch.cat([torch.zeros(n_clean), torch.full((n_new,), s_now)]).to(ref.device) * self.T
            x_in = self.model.condition(seq, ref, is_ref)
            v = teacher_velocity(self.model, x_in, t.view(1, f).expand(n, f), pos, audio, self.guidance, self.text)
            self.trace.model_calls += 1 if audio is None else 2
            x = x + (s_next - s_now) * v[:, :, n_clean:]  # Euler step of dx/ds = v
        self.context = x[:, :, x.shape[2] - self.overlap:] if self.overlap else None
        out = list(x.split(self.B, dim=2))
        self.trace.emitted += list(range(self.emitted_blocks, self.emitted_blocks + len(out)))
        self.emitted_blocks += len(out)
        return out

"""The AvatarForcing window state machine: latent blocks and audio rows in, clean latent blocks out.

A window holds up to L blocks of B latent frames, oldest first, at noise levels s_1 < ... < s_L
(``schedule.window_sigmas``). Each ``push`` adds a pure-noise block and runs one step:

  1. N passes of the DiT over the window (per-frame timesteps), each predicting x0 for every block;
     between passes every block is re-noised to the next sub-level (N=1: a single pass);
  2. the oldest block, if it sits at s_1, is final: it is emitted, then written to the KV buffer by a
     clean pass at t=0 (its last frames become the temporal anchor);
  3. every other block's x0 is re-noised with fresh noise to the level one position older.

The window's queries attend to the style anchor (the reference latent, keys cached once without RoPE and
roped every step at ``window_start - n_temporal - 1``), the temporal anchor and the window itself.
Positions are rebased every step (anchor at 0), so cost and memory are constant and a stream never
reaches a position ceiling. Where each pass puts its frames is ``positions.py``'s table, chosen by
``stream.positions`` (the paper's ``reindexed`` or the published code's ``release``). ``Options``
switches the paper's ablations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import Config
from ..model import AvatarDiT
from .options import Options
from .passes import Passes
from .positions import Layout, clean_layout, window_layout
from .schedule import add_noise, window_sigmas


@dataclass
class Block:
    index: int  # block number in the stream (0, 1, ...)
    x: Tensor  # [N, C, B, h, w] current noisy latent (N streams in a batch)
    audio: Tensor | None  # [N, B, pack, dim]
    age: int = 0  # steps taken so far


class _Discard(list):
    """A list that keeps nothing (a trace that is off)."""

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass

    def __iadd__(self, items):
        return self


class Trace:
    """What the sampler did, for tests and benchmarks; ``keep=False`` records nothing (long-lived sessions)."""

    def __init__(self, keep: bool = True):
        new = list if keep else _Discard
        self.passes: list[tuple[int, float]] = new()  # (block index, sigma) per block per pass
        self.emitted: list[int] = new()
        self.model_calls = 0
        self.prefix_offsets: list[int] = new()  # window start - anchor position per step
        self.layouts: list[tuple[str, int, Layout]] = new()  # (pass, first block, positions)


def noise_like(shape: Sequence[int], generators: torch.Generator | Sequence[torch.Generator], like: Tensor) -> Tensor:
    """Gaussian noise [N, ...], stream i's slice drawn from ``generators[i]`` (so a stream's noise does not
    depend on the batch it runs in); one generator stands for a single stream."""
    if isinstance(generators, torch.Generator):
        generators = [generators]
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]} streams")
    noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators])
    return noise.to(like.device, like.dtype)


class WindowSampler:
    """One stream, or N streams stepped together (reference [N, ...], one generator per stream)."""

    def __init__(self, model: AvatarDiT, cfg: Config, reference: Tensor,
                 generator: torch.Generator | Sequence[torch.Generator], options: Options | None = None,
                 window_blocks: int | None = None, denoising_steps: tuple[int, ...] | None = None,
                 context: Tensor | None = None):
        s = cfg.stream
        self.context = context  # [N, Lt, text_dim] cached text embeddings, or None
        self.model, self.cfg, self.opt = model, cfg, options or Options()
        self.reference = reference  # [N, C, 1, h, w]
        self.gens = generator
        self.B = s.block_frames
        self.L = window_blocks or s.window_blocks
        steps = denoising_steps or s.denoising_steps
        self.sigmas = window_sigmas(tuple(steps), s.shift, s.num_train_timesteps)  # oldest first
        self.T = s.num_train_timesteps
        self.passes = s.passes
        self.n_temporal = s.temporal_anchor_frames
        self.scheme = s.positions if self.opt.rope_reindex else "absolute"  # the ablation overrides the config
        self.dit = Passes(model, reference, self.n_temporal, self.T, context, self.opt)  # the DiT calls, KV buffer
        self.kv = self.dit.kv
        self.window: list[Block] = []
        self.next_index = 0
        self.anchor_ready = False
        self.trace = Trace()

    # ----------------------------------------------------------------- public

    def push(self, audio: Tensor | None, grad: bool = False) -> list[Tensor]:
        """Add one pure-noise block (with its audio rows [N, B, pack, dim]) and step; returns emitted blocks.

        ``grad=True`` keeps the autograd graph of this step's window prediction (``last_x0``), for DMD.
        """
        self.begin(audio)
        with torch.set_grad_enabled(grad):
            return self._step()

    @torch.no_grad()
    def begin(self, audio: Tensor | None) -> None:
        """The first half of ``push``: the anchor pass if this is the first block, then the new noise block joins
        the window (``batch.py`` steps the window of several samplers together after this)."""
        if not self.anchor_ready:
            self._write_anchor(audio)
        noise = self._noise(self.reference.shape[:2] + (self.B,) + self.reference.shape[3:])
        self.window.append(Block(self.next_index, noise, audio))
        self.next_index += 1

    def signature(self) -> tuple:
        """What this step's DiT calls depend on besides the tensors: samplers with equal signatures can be
        stepped as one batch (``batch.py``). Under ``reindexed`` every steady-state window has the same one. (The
        clean pass's positions may differ within a batch: ``batch.py`` splits that pass by them.)"""
        levels = tuple(self._level(b) for b in self.window)
        audio = tuple(b.audio is None for b in self.window)
        ctx = None if self.context is None else tuple(self.context.shape[1:])
        return (id(self.model), self.L, tuple(self.sigmas), self.passes, self.opt, self.scheme, levels,
                self._layout(clean=False), self.kv.temporal_frames,
                audio, ctx, tuple(self.reference.shape[1:]), self.reference.dtype, self.reference.device)

    @torch.no_grad()
    def drain(self) -> list[Tensor]:
        out = []
        while self.window:
            out += self.drain_step()
        return out

    @torch.no_grad()
    def drain_step(self) -> list[Tensor]:
        """One step of ``drain`` (no new block): what it emits; nothing once the window is empty."""
        return self._step() if self.window else []

    @property
    def empty(self) -> bool:
        return not self.window

    # ----------------------------------------------------------------- internals

    def _noise(self, shape) -> Tensor:
        return noise_like(shape, self.gens, self.reference)

    def _level(self, block: Block) -> int:
        """Position index of a block (0 = oldest level s_1)."""
        return self.L - 1 - block.age

    def _layout(self, clean: bool) -> Layout:
        """Positions of this step's window pass (or of the clean pass of its oldest block)."""
        present = self.kv.temporal_frames if self.opt.temporal_anchor else 0
        pick = clean_layout if clean else window_layout
        return pick(self.scheme, self.n_temporal, present, self.window[0].index, self.B)

    def _write_anchor(self, first_audio: Tensor | None) -> None:
        self.dit.anchor(first_audio)
        self.anchor_ready = True
        self.trace.model_calls = self.dit.calls

    def _step(self) -> list[Tensor]:
        layout = self._layout(clean=False)
        self.trace.prefix_offsets.append(layout.offset)
        self.trace.layouts.append(("window", self.window[0].index, layout))
        prefix = self.dit.prefix(layout)
        x = torch.cat([b.x for b in self.window], dim=2)
        audio = None
        if all(b.audio is not None for b in self.window):
            audio = torch.cat([b.audio for b in self.window], dim=1)
        levels = [self._level(b) for b in self.window]
        for p in range(self.passes):
            # sub-level of each block in this pass: from its level towards the next lower one
            sig_b = [self._sub_sigma(lv, p) for lv in levels]
            for b, s in zip(self.window, sig_b):
                self.trace.passes.append((b.index, s))
            sig = torch.tensor(sig_b, device=x.device).repeat_interleave(self.B)
            v = self.dit.window(x, sig, audio, layout, prefix)
            x0 = (x.float() - sig.view(1, 1, -1, 1, 1) * v.float()).to(x.dtype)
            if p < self.passes - 1:
                nxt = torch.tensor([self._sub_sigma(lv, p + 1) for lv in levels], device=x.device)
                nxt = nxt.repeat_interleave(self.B).view(1, 1, -1, 1, 1)
                x = add_noise(x0.float(), self._noise(x.shape).float(), nxt).to(x.dtype)
        self.last_x0, self.last_levels = x0, levels  # the window's prediction (with grad if enabled)
        x0 = x0.detach()
        emitted = []
        blocks = list(self.window)
        x0_blocks = x0.split(self.B, dim=2)
        if levels[0] == 0:
            done = blocks.pop(0)
            emitted.append(x0_blocks[0])
            self.trace.emitted.append(done.index)
            if self.cfg.stream.clean_cache_pass:
                with torch.no_grad():
                    self._clean_pass(x0_blocks[0], done.audio, layout, prefix)
            x0_blocks = x0_blocks[1:]
        for b, x0b in zip(blocks, x0_blocks):
            b.age += 1
            b.x = add_noise(x0b.float(), self._noise(x0b.shape).float(), self.sigmas[self._level(b)]).to(x0b.dtype)
        self.window = blocks
        self.trace.model_calls = self.dit.calls
        return emitted

    def _clean_pass(self, x0: Tensor, audio: Tensor | None, layout: Layout, prefix) -> None:
        """The emitted block (the window's oldest, still in ``self.window``) at t = 0 into the KV buffer."""
        clean = self._layout(clean=True)
        self.trace.layouts.append(("clean", self.window[0].index, clean))
        if clean != layout:
            prefix = self.dit.prefix(clean)
        self.dit.clean(x0, audio, clean, prefix)

    def _sub_sigma(self, level: int, p: int) -> float:
        hi = self.sigmas[level]
        lo = self.sigmas[level - 1] if level > 0 else 0.0
        return hi + (lo - hi) * p / self.passes

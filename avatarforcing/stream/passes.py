"""The passes of one window step, shared by the engine (``window.py``) and the ODE stage's training forward
(``train/stages.py``), so the student is trained on exactly the step it runs.

    anchor pass   reference latent, t = 0, position 0, zero audio   -> its keys: the style anchor (kv.py)
    window pass   [style anchor | temporal anchor] + window blocks   -> velocity of every window frame
    clean pass    an emitted block at t = 0                          -> its last frames: the temporal anchor

Where each pass puts its frames is ``positions.py``'s layout; the keys live in ``kv.py``'s fixed buffer. What
the window holds from step to step (its blocks, their levels, the noise) is ``window.py``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import AvatarDiT
from .kv import KVBuffer
from .options import Options
from .positions import Layout


class Passes:
    """The DiT calls of a window step for N streams (reference [N, C, 1, h, w]) and their KV buffer."""

    def __init__(self, model: AvatarDiT, reference: Tensor, n_temporal: int, num_train_timesteps: int,
                 context: Tensor | None = None, options: Options | None = None, kv=None):
        self.model, self.reference, self.context = model, reference, context  # context: [N, Lt, text_dim]
        self.opt = options or Options()
        self.T = num_train_timesteps
        _, _, _, h, w = reference.shape
        mc = model.cfg
        tpf = (h // mc.patch_size[1]) * (w // mc.patch_size[2])
        # the streams' KV buffer (``batch.py`` passes a stack of several streams' buffers instead)
        self.kv = kv or KVBuffer(mc.num_layers, reference.shape[0], tpf, mc.num_heads, mc.head_dim, n_temporal,
                                 reference.device, reference.dtype)
        self.calls = 0  # DiT calls so far

    def call(self, x: Tensor, sig: Tensor, pos: Tensor, audio: Tensor | None, prefix, is_ref: bool = False,
             return_kv: bool = False):
        """The DiT on frames ``x`` [N, C, f, h, w] at levels ``sig`` [f] and time positions ``pos`` [f]."""
        f = x.shape[2]
        flags = torch.full((f,), is_ref, dtype=torch.bool, device=x.device)
        x_in = self.model.condition(x, self.reference, flags)
        self.calls += 1
        t = (sig.float() * self.T).view(1, f).expand(x.shape[0], f)
        return self.model(x_in, t, pos, audio=audio, context=self.context, prefix=prefix, return_kv=return_kv)

    def prefix(self, layout: Layout):
        """The cached keys a pass with this layout attends to (the anchors the options keep), roped there."""
        use_a, use_t = self.opt.style_anchor, self.opt.temporal_anchor
        frames = ([layout.anchor] if use_a else []) + (list(layout.temporal) if use_t else [])
        if not frames:
            return None
        h, w = self.reference.shape[3:]
        cos, sin = self.model.rope(torch.tensor(frames, device=self.reference.device), h, w)
        return self.kv.prefix(use_a, use_t, cos, sin)

    def anchor(self, first_audio: Tensor | None) -> None:
        """The anchor pass: the reference at t = 0 with zero audio (or, as the ablation, the first block's
        first row) -> the style anchor's keys."""
        audio = None
        if first_audio is not None:
            row = first_audio[:, :1, :1]
            audio = torch.zeros_like(row).expand_as(first_audio[:, :1]) if self.opt.audio_zero_pad \
                else row.expand_as(first_audio[:, :1])
        pos = torch.zeros(1, dtype=torch.long, device=self.reference.device)
        sig = torch.zeros(1, device=self.reference.device)
        _, kv = self.call(self.reference, sig, pos, audio, None, is_ref=True, return_kv=True)
        self.kv.write_anchor(kv)

    def window(self, x: Tensor, sig: Tensor, audio: Tensor | None, layout: Layout, prefix) -> Tensor:
        """The window pass: the velocity of every frame of ``x`` placed from ``layout.start`` on."""
        pos = torch.arange(layout.start, layout.start + x.shape[2], device=x.device)
        return self.call(x, sig, pos, audio, prefix)

    def clean(self, block: Tensor, audio: Tensor | None, layout: Layout, prefix) -> None:
        """The clean pass of an emitted block (t = 0): its last frames become the temporal anchor."""
        b = block.shape[2]
        zero = torch.zeros(b, device=block.device)
        pos = torch.arange(layout.start, layout.start + b, device=block.device)
        _, kv = self.call(block, zero, pos, audio, prefix, return_kv=True)
        self.kv.write_block(kv)

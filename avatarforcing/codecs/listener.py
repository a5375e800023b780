"""The listener: any voice through any microphone -> the audio rows the DiT was trained on.

``mini``'s DiT learned to read log-mel rows of clean synthetic speech. Real speech differs in level,
channel (microphone, room, codec), noise and speaker. The listener sits between the mel front end and
the DiT (``codec.listener: mel-adapter``) and is trained on microphone-augmented speech
(``data/augment.py``) to give back the rows of the clean speech, while two small heads predict the
ground-truth viseme and mouth opening of each frame, which keeps its features phonetic:

    pcm ──MelFrontEnd──> rows x [T, hops * n_mels]            (log-mel, 4 hops of n_mels per video frame)
        ──normalise───> z [T, hops * n_mels]                  per band over the last ``history`` frames,
                                                              shrunk towards the corpus statistics
                                                              (``prior_frames`` pseudo-frames of them)
        ──net─────────> h [T, dim]                            temporal convolutions, ``lookahead`` frames
                                                              of right context, the rest causal
        ──heads───────> rows [T, hops * n_mels]               = z mapped back to corpus scale + correction
                        visemes [T, len(VISEMES)], opening [T] (training targets only)

Every output row is a function of absolute sample positions (zeros before sample 0), so streaming in
any chunking equals offline (tests/test_listener.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CodecConfig
from ..data.visemes import VISEMES
from ..errors import InputError
from .audio import MelFrontEnd, check_pcm


class CausalConv(nn.Conv1d):
    """Conv1d over time with ``right`` frames of look-ahead and kernel - 1 - right frames of history."""

    def __init__(self, c_in: int, c_out: int, kernel: int, right: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, dilation=dilation, groups=groups)
        self.left = (kernel - 1) * dilation - right * dilation
        self.right = right * dilation

    def forward(self, x: Tensor) -> Tensor:  # [N, C, T] -> [N, C', T]
        return super().forward(F.pad(x, (self.left, self.right)))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over channels of [N, C, T], frame by frame (no statistics across time)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.norm = ChannelNorm(dim)
        self.conv = CausalConv(dim, dim, 3, dilation=dilation, groups=dim)
        self.mlp = nn.Sequential(nn.Conv1d(dim, 2 * dim, 1), nn.GELU(), nn.Conv1d(2 * dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.conv(self.norm(x)))


class Listener(nn.Module):
    def __init__(self, row_dim: int, n_mels: int, dim: int = 192, lookahead: int = 2, history: int = 150,
                 prior_frames: float = 25.0, blocks: int = 4):
        super().__init__()
        self.row_dim, self.n_mels, self.hops = row_dim, n_mels, row_dim // n_mels
        self.lookahead, self.history, self.prior_frames = lookahead, history, prior_frames
        self.register_buffer("prior_mean", torch.zeros(n_mels))
        self.register_buffer("prior_std", torch.ones(n_mels))
        self.inp = CausalConv(row_dim, dim, 2 * lookahead + 1, right=lookahead)
        self.blocks = nn.Sequential(*[ResBlock(dim, 2 ** i) for i in range(blocks)])
        self.norm = ChannelNorm(dim)
        self.rows = nn.Conv1d(dim, row_dim, 1)
        self.visemes = nn.Conv1d(dim, len(VISEMES), 1)
        self.opening = nn.Conv1d(dim, 1, 1)
        nn.init.zeros_(self.rows.weight)  # starts as the normalisation alone
        nn.init.zeros_(self.rows.bias)

    @property
    def receptive_left(self) -> int:
        """Frames of history the net reads (beyond the normalisation's)."""
        return self.inp.left + sum(b.conv.left for b in self.blocks)

    def normalise(self, x: Tensor) -> Tensor:
        """x [T, hops * n_mels] -> z: per band, minus the mean over the last ``history`` frames, over their std;
        the corpus statistics count as ``prior_frames`` extra frames (a stream's first frames lean on them)."""
        t = x.shape[0]
        bands = x.double().view(t, self.hops, self.n_mels).mean(1)  # [T, n_mels]: one value per band per frame
        s1 = torch.cumsum(bands, 0)
        s2 = torch.cumsum(bands ** 2, 0)
        cnt = torch.cumsum(torch.ones_like(bands[:, :1]), 0)
        lag = torch.clamp(torch.arange(t) - self.history, min=-1)

        def window(c: Tensor) -> Tensor:
            before = torch.where((lag >= 0)[:, None], c[lag.clamp(min=0)], torch.zeros_like(c[:1]))
            return c - before

        n, s1, s2 = window(cnt), window(s1), window(s2)
        m0, v0, k = self.prior_mean.double(), self.prior_std.double() ** 2, self.prior_frames
        mean = (k * m0 + s1) / (k + n)
        var = (k * (v0 + m0 ** 2) + s2) / (k + n) - mean ** 2
        std = var.clamp(min=1e-4).sqrt()
        z = (x.double().view(t, self.hops, self.n_mels) - mean[:, None]) / std[:, None]
        return z.view(t, -1).float()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw rows x [T, row_dim] -> (rows [T, row_dim], viseme logits [T, V], opening [T])."""
        return self.heads(self.normalise(x))

    def heads(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised rows z [T, row_dim] -> (rows, viseme logits, opening); zero padding before z[0]."""
        h = self.norm(self.blocks(self.inp(z.T[None])))  # [1, dim, T]
        base = z.view(-1, self.hops, self.n_mels) * self.prior_std + self.prior_mean  # z at corpus scale
        rows = base.view(z.shape) + self.rows(h)[0].T
        return rows, self.visemes(h)[0].T, self.opening(h)[0, 0]

    def batch(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training: x [N, T, row_dim] of streams that start at frame 0."""
        outs = [self.forward(xi) for xi in x]
        return tuple(torch.stack(o) for o in zip(*outs))  # type: ignore[return-value]

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], cfg: CodecConfig, source: str = "listener") -> Listener:
        try:
            dim, row_dim = sd["inp.weight"].shape[:2]
            blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        except (KeyError, ValueError):
            raise InputError(f"{source}: not a listener state dict (no inp.weight)") from None
        if row_dim != cfg.n_mels * (cfg.samples_per_frame // (cfg.sample_rate // 100)):
            raise InputError(f"{source}: listener rows have {row_dim} features; this model's mel rows have "
                             f"{cfg.n_mels * (cfg.samples_per_frame // (cfg.sample_rate // 100))}")
        net = cls(row_dim, cfg.n_mels, dim, cfg.listener_lookahead_frames, cfg.listener_history_frames,
                  blocks=blocks)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise InputError(f"{source}: listener weights do not match (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
        return net.eval()


class ListeningFrontEnd:
    """MelFrontEnd rows passed through a Listener; the same streaming contract as the other front ends."""

    chunk_invariant = True

    def __init__(self, cfg: CodecConfig, listener: Listener):
        self.cfg, self.mel, self.net = cfg, MelFrontEnd(cfg), listener
        self.spf = self.mel.spf
        self.dim = self.mel.dim
        self.lookahead_frames = self.mel.lookahead_frames + listener.lookahead
        self.lookahead_samples = self.mel.lookahead_samples + listener.lookahead * self.spf
        self.context_frames = listener.history + listener.receptive_left  # rows a frame depends on, before it

    @classmethod
    def load(cls, cfg: CodecConfig, path: str | Path) -> ListeningFrontEnd:
        from ..checkpoints import read_state_dict

        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: listener weights not found (codec.listener is {cfg.listener!r}, which needs "
                             f"listener.safetensors in the model folder)")
        sd = {k: v.float() for k, v in read_state_dict(p).items()}
        return cls(cfg, Listener.from_state_dict(sd, cfg, str(p)))

    def frames_ready(self, n_samples: int) -> int:
        return max(0, (n_samples - self.lookahead_samples) // self.spf)

    left_context_samples = property(lambda self: self.mel.left_context_samples + self.context_frames * self.spf)

    def streamer(self) -> ListeningStream:
        """A stream's own front end: the same rows, each frame's log-mel computed once (``Session`` uses it)."""
        return ListeningStream(self)

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """Frames [lo, hi) whose log-mel rows the output rows [start, stop) depend on."""
        return max(0, start - self.context_frames), stop + self.net.lookahead

    @torch.no_grad()
    def rows(self, x: Tensor, lo: int, start: int, stop: int) -> Tensor:
        """Output rows [start, stop) from the log-mel rows ``x`` of frames [lo, ``span``'s hi)."""
        z = self.net.normalise(x)  # every frame the net reads below has its full history inside x
        first = max(lo, start - self.net.receptive_left)  # the net reads nothing before this frame
        # the convolutions zero-pad before `first`: before frame 0 that is the offline behaviour, and after it
        # no returned frame reads that far back
        rows, _, _ = self.net.heads(z[first - lo:])
        return rows[start - first: stop - first]

    def features(self, pcm: Tensor, start: int, stop: int, offset: int = 0) -> Tensor:
        if stop <= start:
            return torch.zeros(0, self.dim)
        lo, hi = self.span(start, stop)
        return self.rows(self.mel.features(pcm, lo, hi, offset), lo, start, stop)

    def offline(self, pcm) -> Tensor:
        x = check_pcm(pcm)
        n = -(-len(x) // self.spf)
        return self.features(x, 0, n)


class ListeningStream:
    """One stream's ListeningFrontEnd: keeps the log-mel rows of the frames later blocks still read, so each
    frame's rows are computed once. Rows are requested for frames whose samples have all arrived (or at the
    end of the stream), so a cached row never changes; a request that does not continue the cached span
    starts it afresh."""

    def __init__(self, fe: ListeningFrontEnd):
        self.fe, self.dim, self.spf = fe, fe.dim, fe.spf
        self.lookahead_samples, self.left_context_samples = fe.lookahead_samples, fe.left_context_samples
        self.chunk_invariant = True
        self.first, self.cached = 0, torch.zeros(0, fe.dim)  # log-mel rows of frames [first, first + len)

    def frames_ready(self, n_samples: int) -> int:
        return self.fe.frames_ready(n_samples)

    def features(self, pcm: Tensor, start: int, stop: int, offset: int = 0) -> Tensor:
        if stop <= start:
            return torch.zeros(0, self.dim)
        lo, hi = self.fe.span(start, stop)
        end = self.first + len(self.cached)
        if not self.first <= lo <= end:
            self.first, self.cached, end = lo, self.cached[:0], lo
        self.cached, self.first = self.cached[lo - self.first:], lo
        if hi > end:
            self.cached = torch.cat([self.cached, self.fe.mel.features(pcm, end, hi, offset)])
        return self.fe.rows(self.cached[: hi - lo], lo, start, stop)

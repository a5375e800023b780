"""Audio front ends: speech -> one feature row per video frame (25 fps), streaming or offline.

Both front ends share the row contract of docs/design.md s3: row i belongs to video frame i
(samples [i*spf, (i+1)*spf), spf = sample_rate / fps); ``with_anchor_row`` prepends the all-zero
row of the style anchor; latent frame k >= 1 uses rows 1+4(k-1) .. 4k of that array.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import CodecConfig
from ..errors import InputError


def with_anchor_row(rows: Tensor) -> Tensor:
    """[T, D] -> [1 + T, D] with an all-zero first row (anchor-audio zero padding)."""
    return torch.cat([rows.new_zeros(1, rows.shape[-1]), rows], dim=0)


def latent_rows(rows_with_anchor: Tensor, k: int, pack: int = 4) -> Tensor:
    """Rows of latent frame k from an anchored row array: k=0 -> row 0 repeated; k>=1 -> 1+pack(k-1)..pack*k."""
    if k == 0:
        return rows_with_anchor[:1].expand(pack, -1)
    return rows_with_anchor[1 + pack * (k - 1): 1 + pack * k]


def check_pcm(pcm: np.ndarray | Tensor, name: str = "audio") -> Tensor:
    x = torch.as_tensor(np.asarray(pcm) if not isinstance(pcm, Tensor) else pcm)
    if x.ndim != 1:
        raise InputError(f"{name}: expected mono PCM as a 1-D array, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise InputError(f"{name}: expected float PCM in [-1, 1], got dtype {x.dtype}")
    bad = ~torch.isfinite(x)
    if bad.any():  # one NaN would spread through the features and turn every later frame black
        raise InputError(f"{name}: {int(bad.sum())} of {x.numel()} samples are NaN or infinite "
                         f"(first at sample {int(bad.nonzero()[0, 0])})")
    return x.float()


class MelFrontEnd:
    """Weight-free log-mel features: ``hops`` windows of ``n_fft`` per video frame, n_mels bands each.

    Frame i's window m (m < hops) starts at i*spf + m*hop - (n_fft - hop) // 2 (zeros before sample 0),
    so frame i needs ``lookahead_samples`` (11 ms at 16 kHz) past its end: a look-ahead of one video frame.
    Each row depends only on absolute sample positions, so streaming and offline are identical.
    """

    chunk_invariant = True  # features(pcm, a, c) == cat(features(pcm, a, b), features(pcm, b, c))

    def __init__(self, cfg: CodecConfig):
        self.cfg = cfg
        self.spf = cfg.samples_per_frame
        self.hop = cfg.sample_rate // 100  # 10 ms
        self.hops = self.spf // self.hop
        self.n_fft = int(2 ** math.ceil(math.log2(2.5 * self.hop)))
        self.pad = (self.n_fft - self.hop) // 2
        self.window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64)
        self.mel = _mel_filterbank(cfg.n_mels, self.n_fft, cfg.sample_rate)  # [n_mels, bins]
        self.dim = cfg.n_mels * self.hops
        # samples past a frame's end that its last window reaches
        self.lookahead_samples = max(0, (self.hops - 1) * self.hop - self.pad + self.n_fft - self.spf)
        self.lookahead_frames = math.ceil(self.lookahead_samples / self.spf)

    def frames_ready(self, n_samples: int) -> int:
        """How many frames can be computed from the first ``n_samples`` (the look-ahead respected)."""
        return max(0, (n_samples - self.lookahead_samples) // self.spf)

    def streamer(self) -> MelFrontEnd:
        """The front end a stream uses (stateless here: itself; the listener's keeps per-stream state)."""
        return self

    left_context_samples = property(lambda self: self.pad)

    def features(self, pcm: Tensor, start: int, stop: int, offset: int = 0) -> Tensor:
        """Rows for frames [start, stop); ``pcm`` holds the stream's samples from sample ``offset`` on
        (zeros before sample 0 and past the end)."""
        if stop <= start:
            return torch.zeros(0, self.dim)
        first = start * self.spf - self.pad
        last = stop * self.spf - self.pad + (self.hops - 1) * self.hop + self.n_fft  # exclusive
        seg = _slice_zero_padded(pcm.double(), first - offset, last - offset)
        # windows at offsets m*hop (m over all hops of all frames) within seg
        n_win = (stop - start) * self.hops
        idx = torch.arange(n_win)[:, None] * self.hop + torch.arange(self.n_fft)[None, :]
        frames = seg[idx] * self.window
        power = torch.fft.rfft(frames, dim=-1).abs() ** 2  # [n_win, bins]
        mel = torch.einsum("wb,mb->wm", power, self.mel)
        logmel = (torch.log10(mel + 1e-6) + 4.0) / 2.0  # roughly zero-mean, unit scale for speech
        return logmel.float().reshape(stop - start, self.dim)

    def offline(self, pcm: np.ndarray | Tensor) -> Tensor:
        x = check_pcm(pcm)
        n = math.ceil(len(x) / self.spf)
        return self.features(x, 0, n)


def _slice_zero_padded(x: Tensor, start: int, stop: int) -> Tensor:
    """x[start:stop] with zeros outside [0, len(x))."""
    out = x.new_zeros(stop - start)
    lo, hi = max(start, 0), min(stop, len(x))
    if hi > lo:
        out[lo - start: hi - start] = x[lo:hi]
    return out


def _mel_filterbank(n_mels: int, n_fft: int, rate: int, fmin: float = 40.0, fmax: float | None = None) -> Tensor:
    fmax = fmax or rate / 2

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    pts = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0, None)
        fb[i] *= 2.0 / (hi - lo)  # slaney-style area normalisation
    return torch.from_numpy(fb)


class Wav2Vec2FrontEnd:
    """facebook/wav2vec2-base-960h features (14 x 768 per video frame), loaded from a local folder.

    Offline (``offline``): the whole clip at once, CNN features linearly interpolated to the video frame
    count before the transformer, as OmniAvatar does. Streaming (``features``): each chunk of frames is
    computed from a window with ``audio_left_context_frames`` of left context and ``audio_lookahead_frames``
    of right look-ahead; the transformer sees only that window, so rows differ slightly from offline
    (tests/test_codecs.py states by how much).
    """

    chunk_invariant = False  # a chunk's rows depend on where the chunk starts (its left context)

    def __init__(self, cfg: CodecConfig, model_dir: str | Path, device: str = "cpu"):
        from transformers import Wav2Vec2Model
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a progress bar per load is noise in a CLI's output
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise InputError(f"{d}: not a wav2vec2 model folder (expected config.json and weights)")
        self.cfg = cfg
        self.model = Wav2Vec2Model.from_pretrained(str(d)).to(device).eval()
        self.device = device
        self.spf = cfg.samples_per_frame
        self.lookahead_frames = cfg.audio_lookahead_frames
        self.lookahead_samples = self.lookahead_frames * self.spf
        layers = self.model.config.num_hidden_layers
        self.dim = self.model.config.hidden_size * (layers + 2)

    def frames_ready(self, n_samples: int) -> int:
        return max(0, n_samples // self.spf - self.lookahead_frames)

    def streamer(self) -> Wav2Vec2FrontEnd:
        return self

    @staticmethod
    def normalise(pcm: Tensor) -> Tensor:
        """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation (population variance)."""
        return (pcm - pcm.mean()) / torch.sqrt(pcm.var(correction=0) + 1e-7)

    @torch.no_grad()
    def _encode(self, pcm: Tensor, n_frames: int, normalise: bool = True) -> Tensor:
        x = self.normalise(pcm) if normalise else pcm
        feats = self.model.feature_extractor(x[None].to(self.device))  # [1, C, T']
        feats = torch.nn.functional.interpolate(feats, size=n_frames, mode="linear", align_corners=True)
        hidden, _ = self.model.feature_projection(feats.transpose(1, 2))
        # hidden states as transformers reports them: the input of layer 0, then every layer's output
        states: list[Tensor] = []
        layers = self.model.encoder.layers
        hooks = [layers[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
        hooks += [layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple)
                                                                             else out)) for layer in layers]
        try:
            last = self.model.encoder(hidden).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        rows = torch.cat([last, *states], dim=-1)
        return rows[0].float().cpu()

    def offline(self, pcm: np.ndarray | Tensor) -> Tensor:
        x = check_pcm(pcm)
        n = math.ceil(len(x) / self.spf)
        return self._encode(_slice_zero_padded(x, 0, n * self.spf).float(), n)

    def clip_rows(self, pcm: np.ndarray | Tensor, frames: int) -> Tensor:
        """The release's rows for a whole file: normalised over all of ``pcm``, then cut (or zero-padded) to
        ``frames`` video frames, CNN features interpolated to ``frames`` rows. [frames, dim]"""
        x = self.normalise(check_pcm(pcm))
        return self._encode(_slice_zero_padded(x, 0, frames * self.spf), frames, normalise=False)

    left_context_samples = property(lambda self: self.cfg.audio_left_context_frames * self.spf)

    def features(self, pcm: Tensor, start: int, stop: int, offset: int = 0) -> Tensor:
        left = min(start, self.cfg.audio_left_context_frames)
        right = self.lookahead_frames
        lo, hi = start - left, stop + right
        seg = _slice_zero_padded(pcm, lo * self.spf - offset, hi * self.spf - offset).float()
        rows = self._encode(seg, hi - lo)
        return rows[left: left + (stop - start)]

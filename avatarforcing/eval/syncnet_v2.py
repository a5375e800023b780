"""The public SyncNet (``syncnet_v2.model`` of joonson/syncnet_python) and its LSE-C / LSE-D procedure.

This is the network behind the Sync-C / Sync-D numbers papers report (also called LSE-C / LSE-D). The
weights are not shipped and cannot be downloaded here; point ``--syncnet-v2`` at the file.

* Video: 5 consecutive face crops, 224 x 224, BGR, float 0..255 (no normalisation) -> 1024-d.
* Audio: 13 MFCCs at 100 Hz over the same 0.2 s (20 steps), computed exactly as python_speech_features'
  ``mfcc(int16 samples, 16000)`` (pre-emphasis 0.97, 25 ms rectangular frames every 10 ms, 512-point
  power spectrum, 26 mel filters, orthonormal DCT-II, lifter 22, c0 replaced by log frame energy) -> 1024-d.
* Scores: for audio offsets -15..15 frames, the mean over video windows of the (unnormalised) Euclidean
  distance between the embeddings, audio features zero-padded at the ends; LSE-D = the minimum,
  LSE-C = median - minimum, offset = 15 - argmin.

Our generators' frames are face-centred, so the whole frame is the face crop (resized to 224 x 224).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import load_into, read_state_dict
from ..errors import InputError

SAMPLE_RATE = 16000
MFCC_PER_VIDEO_FRAME = 4  # 100 Hz MFCCs, 25 fps video
WINDOW_FRAMES = 5
CROP = 224


def _block(conv: nn.Module, bn: nn.Module, pool: nn.Module | None = None) -> list[nn.Module]:
    return [conv, bn, nn.ReLU()] + ([pool] if pool is not None else [])


class SyncNetV2(nn.Module):
    """Two streams into one 1024-d space. Module names and indices follow the published state dict."""

    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        # audio [N, 1, 13 MFCC, 20 steps] -> [N, 512, 1, 1]
        self.netcnnaud = nn.Sequential(
            *_block(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.MaxPool2d(1, 1)),
            *_block(nn.Conv2d(64, 192, 3, padding=1), nn.BatchNorm2d(192), nn.MaxPool2d(3, stride=(1, 2))),
            *_block(nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384)),
            *_block(nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256)),
            *_block(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.MaxPool2d(3, stride=2)),
            *_block(nn.Conv2d(256, 512, (5, 4)), nn.BatchNorm2d(512)),
        )
        # video [N, 3, 5 frames, 224, 224] -> [N, 512, 1, 1, 1]
        self.netcnnlip = nn.Sequential(
            *_block(nn.Conv3d(3, 96, (5, 7, 7), stride=(1, 2, 2)), nn.BatchNorm3d(96),
                    nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2))),
            *_block(nn.Conv3d(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(256),
                    nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))),
            *_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256),
                    nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2))),
            *_block(nn.Conv3d(256, 512, (1, 6, 6)), nn.BatchNorm3d(512)),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))

    def embed_audio(self, mfcc: Tensor) -> Tensor:
        """[N, 1, 13, 20] -> [N, 1024]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_video(self, crops: Tensor) -> Tensor:
        """[N, 3, 5, 224, 224] BGR 0..255 -> [N, 1024]."""
        return self.netfclip(self.netcnnlip(crops).flatten(1))


def load_syncnet_v2(path: str | Path, device: str | torch.device = "cpu") -> SyncNetV2:
    """``syncnet_v2.model`` (a torch-saved state dict) -> the network, in eval mode."""
    sd = read_state_dict(path)
    net = SyncNetV2()
    for k, v in net.state_dict().items():  # files saved before BatchNorm counted its batches
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    load_into(net, sd, str(path))
    return net.to(device).eval()


# ---------------------------------------------------------------------------- MFCC (python_speech_features)


def _hz_to_mel(hz):
    return 2595 * np.log10(1 + hz / 700.0)


def _mel_to_hz(mel):
    return 700 * (10 ** (mel / 2595.0) - 1)


def mel_filterbank(n_filters: int = 26, n_fft: int = 512, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangles between FFT bins floor((n_fft + 1) * f / sr) of mel-spaced edge frequencies: [n_filters, bins]."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_filters + 2))
    bins = np.floor((n_fft + 1) * edges / sample_rate)
    k = np.arange(n_fft // 2 + 1)[None, :]
    lo, mid, hi = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    rise = np.where((k >= lo) & (k < mid), (k - lo) / np.maximum(mid - lo, 1e-12), 0.0)
    fall = np.where((k >= mid) & (k < hi), (hi - k) / np.maximum(hi - mid, 1e-12), 0.0)
    return rise + fall


def _dct2_ortho(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n]: y = x @ M.T."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def mfcc(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, n_ceps: int = 13, n_filters: int = 26,
         n_fft: int = 512, preemph: float = 0.97, lifter: int = 22) -> np.ndarray:
    """MFCCs [frames, 13] of int16-scaled samples, 25 ms frames every 10 ms (the last one zero-padded)."""
    x = np.asarray(samples, np.float64)
    x = np.append(x[:1], x[1:] - preemph * x[:-1])
    flen, step = int(0.025 * sample_rate + 0.5), int(0.01 * sample_rate + 0.5)
    n = 1 if len(x) <= flen else 1 + math.ceil((len(x) - flen) / step)
    x = np.concatenate([x, np.zeros((n - 1) * step + flen - len(x))])
    frames = x[np.arange(n)[:, None] * step + np.arange(flen)[None, :]]
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2 / n_fft
    tiny = np.finfo(float).eps
    energy = power.sum(1)
    energy = np.where(energy == 0, tiny, energy)
    feat = power @ mel_filterbank(n_filters, n_fft, sample_rate).T
    feat = np.where(feat == 0, tiny, feat)
    ceps = (np.log(feat) @ _dct2_ortho(n_filters).T)[:, :n_ceps]
    ceps *= 1 + (lifter / 2.0) * np.sin(np.pi * np.arange(n_ceps) / lifter)
    ceps[:, 0] = np.log(energy)
    return ceps


# ---------------------------------------------------------------------------- scores


def offset_distances(video: Tensor, audio: Tensor, vshift: int = 15) -> Tensor:
    """Mean distance per audio offset -vshift..vshift: [2*vshift + 1]. video, audio: [N, D] embeddings of the
    same windows; audio rows beyond the ends count as zeros (as the reference does)."""
    padded = F.pad(audio, (0, 0, vshift, vshift))
    win = padded.unfold(0, 2 * vshift + 1, 1).transpose(1, 2)[: len(video)]  # [N, 2v+1, D]
    return F.pairwise_distance(video[:, None, :].expand_as(win), win, eps=1e-6).mean(0)


@torch.no_grad()
def lse_scores(net: SyncNetV2, frames: np.ndarray, audio: np.ndarray, vshift: int = 15, batch: int = 32) -> dict:
    """LSE-C / LSE-D / offset of a face-centred video (uint8 RGB [T, H, W, 3], 25 fps) and its 16 kHz audio."""
    dev = next(net.parameters()).device
    pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32767), -32768, 32767)
    cc = torch.from_numpy(mfcc(pcm).T.copy()).float()  # [13, steps]
    n = min(len(frames), len(pcm) // (SAMPLE_RATE // 25))
    last = n - WINDOW_FRAMES
    if last <= 0:
        raise InputError(f"LSE needs more than {WINDOW_FRAMES} frames of video and audio (got {n})")
    vid, aud = [], []
    for lo in range(0, last, batch):
        idx = range(lo, min(last, lo + batch))
        x = torch.from_numpy(np.asarray(frames[lo:idx[-1] + WINDOW_FRAMES], np.uint8)).to(dev)
        x = x.permute(0, 3, 1, 2).float().flip(1)  # RGB -> BGR, 0..255
        x = F.interpolate(x, size=(CROP, CROP), mode="bilinear", align_corners=False, antialias=True)
        clips = torch.stack([x[i - lo:i - lo + WINDOW_FRAMES] for i in idx]).transpose(1, 2)  # [b, 3, 5, H, W]
        vid.append(net.embed_video(clips))
        a = torch.stack([cc[:, MFCC_PER_VIDEO_FRAME * i:MFCC_PER_VIDEO_FRAME * i + 20] for i in idx])
        aud.append(net.embed_audio(a[:, None].to(dev)))
    d = offset_distances(torch.cat(vid), torch.cat(aud), vshift)
    k = int(d.argmin())
    return {"lse_d": float(d[k]), "lse_c": float(d.median() - d[k]), "lse_offset": vshift - k}

"""Distribution distances between generated and real videos, with what they can and cannot say.

* FID: Fréchet distance between per-frame features (``frames``: one row per frame). Frame order does not
  enter it: a video played backwards scores the same.
* FVD: Fréchet distance between per-clip features (``clips``: one row per short window of frames), from a
  network that sees time. The default (``CorpusClips``) is the corpus SyncNet's video stream on 5-frame 32x32
  mouth windows, written FVD*; a true FVD takes a video network with I3D-style input (``TorchScriptClips``:
  [N, 3, T, H, W] in [-1, 1], 16 frames at 224x224 by default, e.g. an I3D traced elsewhere).
* ``frechet_intervals``: both are distances between two samples of clips, so they move with the sample: the
  95% interval comes from resampling clips (basic bootstrap, which corrects the upward bias resampling gives a
  Fréchet distance; the same clip indices for the real set and every mode, so the
  differences against a baseline are paired), and ``real_split`` is the distance between the first and the
  second half of every clip's real render (the same identities and voices at other moments: what a perfect
  generator of these clips would score, at half the frames). A distance near it, or a difference whose
  interval holds 0, is no evidence of anything. (Splitting by clips instead would compare different
  identities: the corpus features are identity features, and that distance is huge.)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..errors import InputError
from .metrics import frames_tensor
from .nets import face_crop, mouth_crop, windows

RESAMPLES = 200  # each resample is a Fréchet distance per mode (covariances and an eigendecomposition)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature samples [N, D]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return _frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _frechet(mu_a, sa, mu_b, sb) -> float:
    """The distance from means and covariances, with the trace of the square root from the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2) (symmetric, so eigh is stable)."""
    mu = mu_a - mu_b
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(mid, 0, None)).sum())


def real_split(real: list[np.ndarray]) -> float | None:
    """The distance between the first and second halves (in time) of every clip's real features: the noise
    floor of a perfect generator of these clips (None when a clip has fewer than 4 rows to split)."""
    if min(len(r) for r in real) < 4:
        return None
    return frechet_distance(np.concatenate([r[: len(r) // 2] for r in real]),
                            np.concatenate([r[len(r) // 2:] for r in real]))


class _Moments:
    """Per-clip row counts, sums and sums of outer products: the mean and covariance of any multiset of clips
    (a bootstrap resample) without concatenating their rows."""

    def __init__(self, clips: list[np.ndarray]):
        self.n = np.array([len(c) for c in clips], np.float64)
        self.s = np.stack([c.astype(np.float64).sum(0) for c in clips])
        self.o = np.stack([c.astype(np.float64).T @ c.astype(np.float64) for c in clips])

    def __call__(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = weights @ self.n
        mu = weights @ self.s / n
        cov = (np.tensordot(weights, self.o, 1) - n * np.outer(mu, mu)) / (n - 1)
        return mu, cov


def frechet_intervals(gen: dict[str, list[np.ndarray]], real: list[np.ndarray], baseline: str | None,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``gen``: per mode, one feature array per clip (clip i of every mode and of ``real`` is the same clip).

    Returns {"value": {mode: d}, "ci95": {mode: [lo, hi]}, "paired": {mode: {"diff", "ci95", "clips"}} against
    ``baseline`` (when it is among the modes), "real_split": ``real_split(real)``, "resamples": n}.
    Intervals: basic bootstrap over clips (``_basic``), one draw of clip indices shared by every mode.
    """
    n = len(real)
    value = {m: frechet_distance(np.concatenate(f), np.concatenate(real)) for m, f in gen.items()}
    moments = {m: _Moments(f) for m, f in gen.items()}
    real_m = _Moments(real)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in gen}
    for _ in range(resamples if n > 1 else 0):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)  # how often each clip
        r = real_m(weights)
        for m in gen:
            draws[m].append(_frechet(*moments[m](weights), *r))
    out: dict = {"value": value, "ci95": {}, "paired": {}, "resamples": resamples if n > 1 else 0,
                 "real_split": real_split(real)}
    for m, d in draws.items():
        if d:
            lo, hi = _basic(value[m], np.array(d))
            out["ci95"][m] = [max(0.0, lo), hi]  # a distance is never negative
            if baseline in draws and m != baseline:
                diff = value[m] - value[baseline]
                out["paired"][m] = {"diff": diff, "ci95": list(_basic(diff, np.array(d) - np.array(draws[baseline]))),
                                    "clips": n}
    return out


def _basic(estimate: float, resampled: np.ndarray) -> tuple[float, float]:
    """The basic bootstrap 95% interval (2 est - q97.5, 2 est - q2.5). A resample repeats clips, which shrinks
    the sample's spread and raises every Fréchet distance: the resampled values sit above the estimate (a
    percentile interval can miss it entirely); reflecting them about the estimate corrects that bias."""
    return float(2 * estimate - np.percentile(resampled, 97.5)), float(2 * estimate - np.percentile(resampled, 2.5))


class Features(Protocol):
    """Frames uint8 [T, H, W, 3] -> features [rows, D]: one row per frame (FID) or per window (FVD)."""

    name: str

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


class _Corpus:
    """An extractor on the corpus-trained eval nets (``load_eval_nets``), run where they live."""

    def __init__(self, nets):
        self.nets = nets
        self.device = next(nets.parameters()).device


class CorpusFrames(_Corpus):
    """FID*'s default: the corpus IdentityNet's trunk on the whole (64x64) portrait."""

    name = "corpus IdentityNet (frames)"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = [self.nets["ident"].body(face_crop(frames_tensor(frames[i:i + 256], self.device)))
               for i in range(0, len(frames), 256)]
        return torch.cat(out).cpu().numpy()


class CorpusClips(_Corpus):
    """FVD*'s default: the corpus SyncNet's video stream on 5-frame mouth windows, every 5th window."""

    name = "corpus SyncNet video stream (5-frame mouth windows)"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        crops = mouth_crop(frames_tensor(frames, self.device))
        return self.nets["sync"].video(windows(crops)[::5].flatten(1, 2)).cpu().numpy()


class TorchScriptFrames:
    """Any TorchScript module mapping [N, 3, size, size] in [-1, 1] to [N, D] (e.g. an Inception traced
    elsewhere): a frame-level distance (FID)."""

    def __init__(self, path: str, size: int = 299):
        self.module = torch.jit.load(path, map_location="cpu").eval()
        self.size = size
        self.name = f"torchscript frames:{path}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = torch.nn.functional.interpolate(frames_tensor(frames), size=(self.size, self.size), mode="bilinear")
        return self.module(x).flatten(1).numpy()


class TorchScriptClips:
    """Any TorchScript video module mapping [N, 3, T, size, size] in [-1, 1] to [N, D] (I3D-style input): the
    video is cut into non-overlapping windows of ``frames`` frames (a shorter tail is dropped), each resized
    to ``size``; a true FVD."""

    def __init__(self, path: str, frames: int = 16, size: int = 224, batch: int = 8):
        self.module = torch.jit.load(path, map_location="cpu").eval()
        self.frames, self.size, self.batch = frames, size, batch
        self.name = f"torchscript clips ({frames} frames at {size}x{size}):{path}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        n = len(frames) // self.frames
        if n == 0:
            raise InputError(f"{len(frames)} frames are fewer than one {self.frames}-frame window")
        x = torch.nn.functional.interpolate(frames_tensor(frames[: n * self.frames]), size=(self.size, self.size),
                                            mode="bilinear")
        x = x.reshape(n, self.frames, 3, self.size, self.size).transpose(1, 2)  # [N, 3, T, H, W]
        return torch.cat([self.module(x[i:i + self.batch]).flatten(1) for i in range(0, n, self.batch)]).numpy()

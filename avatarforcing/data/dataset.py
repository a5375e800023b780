"""Training datasets: aligned (frames, audio, ground truth, reference) windows of any length.

``CorpusDataset`` reads the synthetic corpus's shards (memory-mapped); ``VideoFolderDataset`` reads a
folder of real talking-face MP4s (with audio) the same way, so real data can replace the corpus.
Items: ``frames`` float32 [3, T, H, W] in [-1, 1]; ``audio`` float32 [T * samples_per_frame];
``reference`` float32 [3, H, W]; ``gt`` dict of per-frame arrays (empty for real video); ``start``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames, np.uint8)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


class CorpusDataset(Dataset):
    def __init__(self, root: str | Path, split: str = "train", window_frames: int = 33, stride: int | None = None,
                 samples_per_frame: int = 640):
        root = Path(root)
        shards = sorted((root / "shards").glob(f"{split}-*"))
        if not shards:
            raise InputError(f"{root}: no '{split}' shards (expected {root}/shards/{split}-0000/; "
                             f"run `avatarforcing data synth --out {root} --split {split}`)")
        self.window, self.spf = window_frames, samples_per_frame
        self.shards = []
        self.index: list[tuple[int, int, int]] = []
        stride = stride or window_frames
        for si, d in enumerate(shards):
            frames = np.load(d / "frames.npy", mmap_mode="r")
            audio = np.load(d / "audio.npy", mmap_mode="r")
            refs = np.load(d / "references.npy", mmap_mode="r")
            gt = dict(np.load(d / "gt.npz"))
            names = json.loads((d / "clips.json").read_text())
            self.shards.append((frames, audio, refs, gt, names))
            n_clips, t = frames.shape[:2]
            if t < window_frames:
                raise InputError(f"{d}: clips have {t} frames, fewer than the window of {window_frames}")
            for c in range(n_clips):
                for s in range(0, t - window_frames + 1, stride):
                    self.index.append((si, c, s))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        si, c, s = self.index[i]
        frames, audio, refs, gt, names = self.shards[si]
        e = s + self.window
        return {
            "frames": _to_tensor(frames[c, s:e]),
            "audio": torch.from_numpy(np.array(audio[c, s * self.spf: e * self.spf], np.float32)),
            "reference": _to_tensor(refs[c][None])[:, 0],
            "gt": {k: torch.from_numpy(np.asarray(v[c, s:e])) for k, v in gt.items()},
            "start": s, "clip": names[c],
        }


class VideoFolderDataset(Dataset):
    """Real talking-face videos: every ``*.mp4`` (with an audio track) under ``folder``.

    Frames are centre-cropped to a square and resized to ``size``; the reference is the clip's first frame.
    """

    def __init__(self, folder: str | Path, window_frames: int = 33, size: int = 128, stride: int | None = None,
                 sample_rate: int = 16000, fps: int = 25):
        from .video import read_video

        self.files = sorted(Path(folder).rglob("*.mp4"))
        if not self.files:
            raise InputError(f"{folder}: no .mp4 files found")
        self.window, self.spf = window_frames, sample_rate // fps
        self.clips = []
        self.index = []
        for f in self.files:
            frames, vfps, audio = read_video(f, with_audio=True, sample_rate=sample_rate)
            if audio is None:
                raise InputError(f"{f}: no audio track (talking-face clips need their speech)")
            if abs(vfps - fps) > 0.01:
                raise InputError(f"{f}: {vfps:.2f} fps; expected {fps} fps (re-encode with ffmpeg -r {fps})")
            frames = np.stack([_square(x, size) for x in frames])
            need = len(frames) * self.spf
            audio = np.pad(audio, (0, max(0, need - len(audio))))[:need]
            ci = len(self.clips)
            self.clips.append((frames, audio, f.name))
            for s in range(0, len(frames) - window_frames + 1, stride or window_frames):
                self.index.append((ci, s))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        ci, s = self.index[i]
        frames, audio, name = self.clips[ci]
        e = s + self.window
        return {"frames": _to_tensor(frames[s:e]), "audio": torch.from_numpy(audio[s * self.spf: e * self.spf]),
                "reference": _to_tensor(frames[:1])[:, 0], "gt": {}, "start": s, "clip": name}


def _square(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(frame[top:top + s, left:left + s])
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))

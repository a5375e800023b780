"""Incremental MP4 writer (H.264 yuv420p + AAC) and a reader for tests and evaluation."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import InputError


class VideoWriter:
    """Write frames as they arrive; speech is interleaved so it never runs ahead of the picture.

    ``audio`` (float32 mono at ``sample_rate``) can be given whole up front or appended later with
    ``add_audio``; on ``close`` the audio track is cut or padded to the video's duration, so the two
    streams end together (within one AAC frame of 64 ms at 16 kHz, i.e. within one video frame).
    """

    def __init__(self, path: str | Path, fps: int = 25, audio: np.ndarray | None = None,
                 sample_rate: int = 16000, crf: int = 20, audio_bitrate: int = 96_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.sample_rate, self.crf = fps, sample_rate, crf
        self.container = av.open(str(self.path), mode="w")
        self.video = None  # created on the first frame, when the size is known
        self.audio = self.container.add_stream("aac", rate=sample_rate)
        self.audio.bit_rate = audio_bitrate
        self.audio.layout = "mono"
        self._pcm = np.zeros(0, np.float32)  # audio not yet encoded
        self._audio_written = 0  # samples sent to the encoder
        self._has_audio = False
        self.frames_written = 0
        if audio is not None:
            self.add_audio(audio)

    def add_audio(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        self._pcm = np.concatenate([self._pcm, samples])
        self._has_audio = True

    def write(self, frames: np.ndarray) -> None:
        """frames: uint8 [T, H, W, 3] (or one [H, W, 3])."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"{self.path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if self.video is None:
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:
                raise InputError(f"{self.path}: H.264 yuv420p needs even sides, got {w}x{h}")
            self.video = self.container.add_stream("libx264", rate=self.fps)
            self.video.width, self.video.height = w, h
            self.video.pix_fmt = "yuv420p"
            self.video.options = {"crf": str(self.crf), "preset": "veryfast"}
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.frames_written
            vf.time_base = Fraction(1, self.fps)
            for packet in self.video.encode(vf):
                self.container.mux(packet)
            self.frames_written += 1
        self._flush_audio(upto=self.frames_written * self.sample_rate // self.fps)

    def _flush_audio(self, upto: int, final: bool = False) -> None:
        if not self._has_audio:
            return
        n = upto - self._audio_written
        if n <= 0:
            return
        chunk = self._pcm[:n]
        if len(chunk) < n and final:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), np.float32)])
        if len(chunk) == 0:
            return
        self._pcm = self._pcm[len(chunk):]
        af = av.AudioFrame.from_ndarray(chunk[None, :].astype(np.float32), format="fltp", layout="mono")
        af.sample_rate = self.sample_rate
        af.pts = self._audio_written
        af.time_base = Fraction(1, self.sample_rate)
        for packet in self.audio.encode(af):
            self.container.mux(packet)
        self._audio_written += len(chunk)

    def close(self) -> None:
        if self.container is None:
            return
        self._flush_audio(upto=self.frames_written * self.sample_rate // self.fps, final=True)
        if self.video is not None:
            for packet in self.video.encode(None):
                self.container.mux(packet)
        for packet in self.audio.encode(None):
            self.container.mux(packet)
        self.container.close()
        self.container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str | Path, with_audio: bool = True, sample_rate: int = 16000):
    """Read an MP4: returns (frames uint8 [T, H, W, 3], fps, audio float32 mono or None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise InputError(f"{path}: no video stream")
            vs = c.streams.video[0]
            fps = float(vs.average_rate) if vs.average_rate else 25.0
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(vs)])
    except av.error.FFmpegError as e:
        raise InputError(f"{path}: cannot decode video: {e}") from None
    audio = None
    if with_audio:
        from .audio import load_audio

        try:
            audio = load_audio(path, sample_rate)
        except InputError:
            audio = None
    return frames, fps, audio

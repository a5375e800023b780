"""Audio input: any common file (or bytes) -> float32 mono at the model's rate.

Decoding: soundfile (wav/flac/ogg) first, PyAV (mp3, m4a/aac and anything ffmpeg reads) second.
Resampling: our own polyphase FIR with a Kaiser-windowed sinc (>= 80 dB stopband, pass band to 0.95 of
the lower Nyquist), so the result does not depend on which decoder was used; or ``sinc_hann``, the
algorithm of torchaudio's ``functional.resample`` defaults (Hann-windowed sinc, 6 zero crossings, roll-off
0.99) that the published AvatarForcing code uses, re-implemented here (torchaudio does not work with our torch).
"""

from __future__ import annotations

import io
from functools import lru_cache
from math import gcd
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InputError

AudioSource = str | Path | bytes | bytearray | BinaryIO


RESAMPLERS = ("kaiser", "sinc_hann")


def load_audio(source: AudioSource, sample_rate: int = 16000, resampler: str = "kaiser") -> np.ndarray:
    """Decode ``source`` and return float32 mono samples at ``sample_rate`` (stereo is averaged)."""
    name, data = _read_bytes(source)
    samples, rate = _decode(data, name)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise InputError(f"{name}: the audio is empty (zero samples)")
    bad = ~np.isfinite(samples)
    if bad.any():
        raise InputError(f"{name}: {int(bad.sum())} samples are NaN or infinite (first at "
                         f"{np.argmax(bad) / rate:.3f} s): the file is damaged")
    if resampler == "sinc_hann":
        return resample_sinc_hann(samples.astype(np.float32), rate, sample_rate)
    if resampler != "kaiser":
        raise InputError(f"unknown resampler {resampler!r}; expected one of {RESAMPLERS}")
    return resample(samples.astype(np.float32), rate, sample_rate)


def resample_sinc_hann(x: np.ndarray, rate_in: int, rate_out: int, zero_crossings: int = 6,
                       rolloff: float = 0.99) -> np.ndarray:
    """Band-limited interpolation with a Hann-windowed sinc (torchaudio's default ``resample`` algorithm).

    With the rates reduced by their gcd to ``a`` (in) and ``b`` (out) and the cutoff ``c = min(a, b) *
    rolloff``, output sample m (at time m/b) is

        y[m] = sum_i x[i] * (c/a) * sinc(c (i/a - m/b)) * hann(c (i/a - m/b) / zero_crossings),

    sinc(u) = sin(pi u) / (pi u), hann(v) = cos(pi v / 2)^2 for |v| <= 1 and 0 beyond; zeros outside the
    signal; ceil(len * b / a) output samples. Computed as a strided convolution with one filter per phase.
    """
    if rate_in <= 0 or rate_out <= 0:
        raise InputError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    if rate_in == rate_out:
        return np.asarray(x, dtype=np.float32)
    import torch

    g = gcd(rate_in, rate_out)
    a, b = rate_in // g, rate_out // g
    cut = min(a, b) * rolloff
    half = int(np.ceil(zero_crossings * a / cut))  # filter half-width, in input samples
    offsets = torch.arange(-half, half + a, dtype=torch.float64) / a  # input times relative to phase 0
    u = (offsets[None, :] - torch.arange(b, dtype=torch.float64)[:, None] / b) * cut  # [b phases, taps]
    u = u.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(u * np.pi / zero_crossings / 2) ** 2
    sinc = torch.where(u == 0, torch.ones_like(u), torch.sin(np.pi * u) / (np.pi * u))
    filters = (sinc * window * cut / a).float()[:, None, :]  # [b, 1, taps]
    sig = torch.from_numpy(np.asarray(x, dtype=np.float32))  # float32, as torchaudio on float32 audio
    padded = torch.nn.functional.pad(sig[None, None], (half, half + a))
    y = torch.nn.functional.conv1d(padded, filters, stride=a)  # [1, b, n]: phase j of output block n
    y = y[0].T.reshape(-1)[: -(-len(sig) * b // a)]
    return y.numpy().astype(np.float32)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited polyphase resampling of a 1-D signal (output length round(n * out / in))."""
    if rate_in <= 0 or rate_out <= 0:
        raise InputError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise InputError(f"resample expects a 1-D signal, got shape {x.shape}")
    if rate_in == rate_out:
        return x.astype(np.float32)
    g = gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    phases = _polyphase_filter(up, down)  # [up, taps]: phase p holds h[p + k*up]
    taps = phases.shape[1]
    n_out = int(round(len(x) * up / down))
    half = (taps * up) // 2  # filter centre, in upsampled samples
    out = np.empty(n_out, dtype=np.float64)
    pad = np.concatenate([np.zeros(taps), x, np.zeros(taps)])
    chunk = max(1, 2_000_000 // taps)
    for start in range(0, n_out, chunk):
        n = np.arange(start, min(n_out, start + chunk))
        pos = n * down + half  # position in the upsampled signal, shifted by the filter delay
        base, phase = pos // up, pos % up
        idx = base[:, None] - np.arange(taps)[None, :] + taps  # x[base - k], offset by the pad
        out[n] = np.einsum("nk,nk->n", pad[idx], phases[phase])
    return out.astype(np.float32)


@lru_cache(maxsize=16)
def _polyphase_filter(up: int, down: int, stopband_db: float = 80.0) -> np.ndarray:
    # Design at the upsampled rate: pass below 0.9 of the lower Nyquist, stop above it.
    nyq = 1.0 / max(up, down)  # lower Nyquist, in cycles/sample at the upsampled rate * 2
    cutoff = 0.95 * nyq
    width = 0.1 * nyq  # transition band (normalised to the upsampled Nyquist)
    beta = 0.1102 * (stopband_db - 8.7)
    length = int(np.ceil((stopband_db - 8.0) / (2.285 * np.pi * width)))
    length = (length + up - 1) // up * up  # whole number of taps per phase
    t = np.arange(length) - (length - 1) / 2
    h = cutoff * np.sinc(cutoff * t) * np.kaiser(length, beta) * up
    return h.reshape(-1, up).T.copy()  # [up, taps]


def _read_bytes(source: AudioSource) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "<audio bytes>"
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: audio file not found")
        data, name = path.read_bytes(), str(path)
    elif hasattr(source, "read"):
        data, name = source.read(), getattr(source, "name", "<audio stream>")
    else:
        raise InputError(f"expected a path, bytes or a file-like object for audio, got {type(source).__name__}")
    if not data:
        raise InputError(f"{name}: the audio file is empty (zero bytes)")
    return str(name), data


def _decode(data: bytes, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
        return samples, int(rate)
    except Exception:  # noqa: BLE001 - not a libsndfile format; try ffmpeg via PyAV
        pass
    try:
        return _decode_av(data)
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"{name}: cannot decode audio (expected wav, flac, ogg, mp3 or m4a/aac): {e}"
        ) from None


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        chunks: list[np.ndarray] = []
        rate = stream.codec_context.sample_rate
        for frame in container.decode(stream):
            arr = frame.to_ndarray()
            if frame.format.is_planar:
                arr = arr.T  # [samples, channels]
            else:
                arr = arr.reshape(-1, len(frame.layout.channels))
            if arr.dtype.kind == "i":
                arr = arr.astype(np.float32) / np.iinfo(arr.dtype).max
            chunks.append(arr.astype(np.float32))
            rate = frame.sample_rate
        # the container's duration excludes the encoder's padding of the last frame
        duration = float(stream.duration * stream.time_base) if stream.duration else None
    if not chunks:
        return np.zeros((0,), np.float32), rate
    samples = np.concatenate(chunks, axis=0)
    if duration is not None:
        samples = samples[: max(1, int(round(duration * rate)))]
    return samples, int(rate)

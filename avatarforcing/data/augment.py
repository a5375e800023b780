"""Microphone augmentation: what real voices, rooms, microphones and channels do to clean speech.

``Microphone(rate).apply(pcm, rng, babble)`` draws one random chain from ``rng`` (seeded by the caller, so
every example is reproducible) and applies it to 16 kHz float PCM; each effect has its own probability:

    tempo ........ phase-vocoder time stretch 0.85-1.2x (the only effect that changes the length; the caller
                   retimes its per-frame targets with ``Augmented.tempo``)
    pitch ........ +-4 semitones (stretch, then resample back to the length: pitch and formants move together)
    vocal tract .. formant warp 0.85-1.18: the cepstral envelope moves, harmonics and phases stay
    reverb ....... synthetic room impulse response, RT60 0.15-0.9 s, random direct-to-reverberant ratio
    band ......... telephone (300-3400 Hz), narrow-band (low-pass 3-7 kHz) or radio (band-pass + saturation)
    noise ........ white, pink or babble (other voices, ``babble``) at 5-30 dB SNR
    codec ........ MP3 (16-64 kbit/s) or Opus (8-32 kbit/s) round trip through PyAV, realigned
    level ........ the speech level at -46..-6 dBFS RMS (+-20 dB around -26), then DC offset and clipping

Everything runs on numpy / torch.stft on the CPU, fast enough to run inside the training loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import resample

N_FFT, HOP = 512, 128


@dataclass
class Augmented:
    pcm: np.ndarray  # float32, len = round(len(input) * tempo)
    tempo: float  # output duration / input duration
    effects: list[str] = field(default_factory=list)  # what was applied, for logs and tests


@dataclass
class Microphone:
    rate: int = 16000
    p_tempo: float = 0.3
    p_pitch: float = 0.4
    p_vocal_tract: float = 0.4
    p_reverb: float = 0.4
    p_band: float = 0.3
    p_noise: float = 0.6
    p_codec: float = 0.25
    p_dc: float = 0.1
    p_clip: float = 0.1

    def apply(self, pcm: np.ndarray, rng: np.random.Generator, babble: list[np.ndarray] | None = None) -> Augmented:
        x = np.asarray(pcm, np.float32)
        out = Augmented(x, 1.0)
        if rng.random() < self.p_tempo:
            out.tempo = float(rng.uniform(0.85, 1.2))
            x = time_stretch(x, out.tempo)
            out.effects.append(f"tempo {out.tempo:.2f}")
        if rng.random() < self.p_pitch:
            semitones = float(rng.uniform(-4, 4))
            x = pitch_shift(x, semitones, self.rate)
            out.effects.append(f"pitch {semitones:+.1f} st")
        if rng.random() < self.p_vocal_tract:
            alpha = float(rng.uniform(0.85, 1.18))
            x = formant_warp(x, alpha)
            out.effects.append(f"vocal tract {alpha:.2f}")
        if rng.random() < self.p_reverb:
            rt60 = float(rng.uniform(0.15, 0.9))
            x = reverb(x, room_impulse(rng, rt60, self.rate))
            out.effects.append(f"reverb {rt60:.2f} s")
        if rng.random() < self.p_band:
            kind = ["telephone", "narrow", "radio"][rng.integers(3)]
            x = band_limit(x, kind, rng, self.rate)
            out.effects.append(kind)
        x = set_level(x, -26.0)
        if rng.random() < self.p_noise:
            kinds = ["white", "pink"] + (["babble", "babble"] if babble else [])
            kind = kinds[rng.integers(len(kinds))]
            snr = float(rng.uniform(5, 30))
            x = add_noise(x, noise(kind, len(x), rng, babble), snr)
            out.effects.append(f"{kind} noise {snr:.0f} dB")
        if rng.random() < self.p_codec:
            kind = ["mp3", "opus"][rng.integers(2)]
            kbps = int(rng.choice([16, 24, 32, 48, 64] if kind == "mp3" else [8, 12, 16, 24, 32]))
            x = codec_round_trip(x, kind, kbps, self.rate)
            out.effects.append(f"{kind} {kbps} kbit/s")
        gain_db = float(rng.uniform(-20, 20))
        x = x * 10 ** (gain_db / 20)
        out.effects.append(f"level {gain_db:+.0f} dB")
        if rng.random() < self.p_dc:
            x = x + rng.uniform(-0.05, 0.05)
            out.effects.append("dc")
        if rng.random() < self.p_clip:
            x = x * 10 ** (rng.uniform(3, 12) / 20)
            out.effects.append("clipping")
        out.pcm = np.clip(x, -1.0, 1.0).astype(np.float32)  # what an ADC delivers
        return out


# ------------------------------------------------------------------ effects


def _stft(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, np.float32))
    return torch.stft(t, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)  # [F, T]


def _istft(spec: torch.Tensor, length: int) -> np.ndarray:
    y = torch.istft(spec, N_FFT, HOP, window=torch.hann_window(N_FFT), length=length)
    return y.numpy().astype(np.float32)


def time_stretch(x: np.ndarray, factor: float) -> np.ndarray:
    """Phase vocoder: duration x ``factor`` (> 1 slower), pitch unchanged. len(out) = round(len(x) * factor)."""
    if len(x) < N_FFT or abs(factor - 1) < 1e-6:
        return np.asarray(x, np.float32)
    spec = _stft(x)
    spec = torch.cat([spec, torch.zeros_like(spec[:, :1])], 1)  # one frame past the end to interpolate into
    frames = spec.shape[1] - 1
    steps = torch.arange(0, frames - 1, 1.0 / factor, dtype=torch.float64)
    i0 = steps.floor().long()
    frac = (steps - i0).float()[None]
    a, b = spec[:, i0], spec[:, i0 + 1]
    mag = (1 - frac) * a.abs() + frac * b.abs()
    omega = torch.linspace(0, np.pi * HOP, spec.shape[0])[:, None]  # expected phase advance per hop
    dphi = torch.angle(b) - torch.angle(a) - omega
    dphi = dphi - 2 * np.pi * torch.round(dphi / (2 * np.pi)) + omega
    phase = torch.angle(spec[:, :1]) + torch.cumsum(torch.cat([torch.zeros_like(dphi[:, :1]), dphi[:, :-1]], 1), 1)
    return _istft(torch.polar(mag, phase), int(round(len(x) * factor)))


def pitch_shift(x: np.ndarray, semitones: float, rate: int = 16000) -> np.ndarray:
    """Pitch (and formants) x 2^(semitones/12), duration kept: stretch, then play faster by the same factor."""
    r = 2 ** (semitones / 12)
    step = rate // 160  # rates on a 1/160 grid keep the resampler's polyphase filter small
    rate_in = int(round(rate * r / step)) * step
    y = time_stretch(x, rate_in / rate)
    y = resample(y, rate_in, rate)
    return _fit(y, len(x))


def formant_warp(x: np.ndarray, alpha: float, lifter: int = 30) -> np.ndarray:
    """Vocal-tract-length warp: each STFT frame's spectral envelope (cepstrally smoothed, the first ``lifter``
    quefrencies) moves from frequency f to alpha * f; the harmonics (the fine structure) and phases stay, so
    the formants move and the pitch does not."""
    spec = _stft(x)  # [F, T]
    bins = spec.shape[0]
    log_mag = torch.log(spec.abs() + 1e-7)
    cep = torch.fft.irfft(log_mag, dim=0)  # real cepstrum per frame
    cep[lifter:-lifter + 1] = 0
    envelope = torch.fft.rfft(cep, dim=0).real[:bins]  # smooth log envelope
    src = torch.arange(bins, dtype=torch.float32) / alpha  # output bin k reads the envelope at k / alpha
    i0 = src.floor().long().clamp(0, bins - 1)
    i1 = (i0 + 1).clamp(0, bins - 1)
    frac = (src - i0).clamp(0, 1)[:, None]
    warped = (1 - frac) * envelope[i0] + frac * envelope[i1]
    warped[src > bins - 1] = envelope[-1:].expand(int((src > bins - 1).sum()), -1) - 10.0  # nothing above Nyquist
    mag = torch.exp(log_mag - envelope + warped)
    return _istft(torch.polar(mag, torch.angle(spec)), len(x))


def room_impulse(rng: np.random.Generator, rt60: float, rate: int = 16000) -> np.ndarray:
    """Exponentially decaying noise tail (60 dB down at ``rt60``) after a direct path and early reflections."""
    n = int(rt60 * rate)
    t = np.arange(n) / rate
    h = rng.normal(0, 1, n) * np.exp(-6.9 * t / rt60)
    h[: int(0.002 * rate)] = 0  # the first reflection arrives a few ms after the direct sound
    for _ in range(rng.integers(2, 6)):  # early reflections
        k = int(rng.uniform(0.002, 0.03) * rate)
        h[k] += rng.uniform(-0.8, 0.8) * np.sqrt(n) * 0.05
    h = h / (np.sqrt(np.sum(h ** 2)) + 1e-9)
    drr = 10 ** (rng.uniform(-6, 10) / 20)  # direct-to-reverberant ratio
    h[0] = drr
    return (h / np.sqrt(np.sum(h ** 2))).astype(np.float32)


def reverb(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]
    return y.astype(np.float32)


def _band_mask(freqs: np.ndarray, lo: float, hi: float, ramp: float = 100.0) -> np.ndarray:
    up = np.clip((freqs - lo + ramp) / (2 * ramp), 0, 1) if lo > 0 else np.ones_like(freqs)
    down = np.clip((hi + ramp - freqs) / (2 * ramp), 0, 1)
    return np.sin(np.pi / 2 * up) ** 2 * np.sin(np.pi / 2 * down) ** 2


def band_limit(x: np.ndarray, kind: str, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    """telephone: 300-3400 Hz; narrow: low-pass at 3-7 kHz; radio: 200-5000 Hz band-pass with saturation."""
    lo, hi = {"telephone": (300.0, 3400.0), "narrow": (0.0, float(rng.uniform(3000, 7000))),
              "radio": (200.0, 5000.0)}[kind]
    spec = np.fft.rfft(x)
    y = np.fft.irfft(spec * _band_mask(np.fft.rfftfreq(len(x), 1 / rate), lo, hi), len(x))
    if kind == "radio":
        drive = rng.uniform(2, 6)
        peak = np.abs(y).max() + 1e-9
        y = np.tanh(drive * y / peak) * peak / np.tanh(drive)
    return y.astype(np.float32)


def _active_rms(x: np.ndarray) -> float:
    """RMS over the louder half of 20 ms frames: the speech level, not counting pauses."""
    n = len(x) // 320 * 320
    if n == 0:
        return float(np.sqrt(np.mean(x ** 2) + 1e-12))
    e = np.mean(x[:n].reshape(-1, 320) ** 2, 1)
    return float(np.sqrt(np.mean(e[e >= np.median(e)]) + 1e-12))


def set_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * (10 ** (dbfs / 20) / _active_rms(x))).astype(np.float32)


def noise(kind: str, n: int, rng: np.random.Generator, babble: list[np.ndarray] | None = None) -> np.ndarray:
    if kind == "white":
        return rng.normal(0, 1, n).astype(np.float32)
    if kind == "pink":
        spec = np.fft.rfft(rng.normal(0, 1, n))
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        return np.fft.irfft(spec / np.sqrt(f), n).astype(np.float32)
    if kind == "babble":
        if not babble:
            raise ValueError("babble noise needs other voices (babble=[...])")
        out = np.zeros(n, np.float32)
        for _ in range(rng.integers(3, 7)):
            v = babble[rng.integers(len(babble))]
            start = rng.integers(max(1, len(v) - n)) if len(v) > n else 0
            seg = _fit(v[start:start + n], n)
            out += seg / (_active_rms(seg) + 1e-6)
        return out
    raise ValueError(f"unknown noise {kind!r}")


def add_noise(x: np.ndarray, n: np.ndarray, snr_db: float) -> np.ndarray:
    scale = _active_rms(x) / (np.sqrt(np.mean(n ** 2)) + 1e-12) * 10 ** (-snr_db / 20)
    return (x + scale * n).astype(np.float32)


def codec_round_trip(x: np.ndarray, kind: str, kbps: int, rate: int = 16000) -> np.ndarray:
    """Encode to MP3 / Opus and decode back (PyAV), realigned to the input (encoder delay removed)."""
    import av

    from .audio import _decode_av

    codec, fmt = {"mp3": ("libmp3lame", "mp3"), "opus": ("libopus", "ogg")}[kind]
    buf = io.BytesIO()
    peak = max(1.0, float(np.abs(x).max()))
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        stream.bit_rate = kbps * 1000
        fmt_name = stream.codec_context.codec.audio_formats[0].name
        frame_size = stream.codec_context.frame_size or 1152
        pcm = x / peak
        for i in range(0, len(pcm), frame_size):
            chunk = pcm[i:i + frame_size]
            scale, dtype = {"s16": (32767, np.int16), "s32": (2 ** 31 - 1, np.int32)}.get(fmt_name[:3], (1, np.float32))
            arr = (np.clip(chunk, -1, 1) * scale).astype(dtype)[None]
            frame = av.AudioFrame.from_ndarray(arr, format=fmt_name, layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    y, y_rate = _decode_av(buf.getvalue())
    y = y.mean(1) if y.ndim == 2 else y
    if y_rate != rate:
        y = resample(y, y_rate, rate)
    return _fit(y[_delay(x, y):], len(x)) * peak


def _delay(x: np.ndarray, y: np.ndarray, max_delay: int = 4000) -> int:
    """Lag (samples) of y behind x, by cross-correlation over the first few seconds."""
    n = min(len(x), len(y) - max_delay, 48000)
    if n <= 0:
        return 0
    a, b = x[:n].astype(np.float64), y[: n + max_delay].astype(np.float64)
    size = 1 << (len(b) + n).bit_length()
    corr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)[: max_delay + 1]
    return int(np.argmax(corr))


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


__all__ = ["Microphone", "Augmented", "time_stretch", "pitch_shift", "formant_warp", "room_impulse", "reverb",
           "band_limit", "noise", "add_noise", "set_level", "codec_round_trip"]

"""One stream of the API: audio chunks in, frames out (``Avatar.session``), with its framing and timings.

    push(pcm) -> rows for every block whose audio (and the front end's look-ahead) has arrived
              -> the sampler's step -> the emitted latent blocks -> the streaming VAE decoder -> frames
    close()   -> the last block padded with silence, the window drained, the video trimmed to the audio
    mute(s)   -> everything from sample s that is not on a frame yet becomes silence (a live interrupt)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .codecs.audio import check_pcm
from .data.image import to_uint8
from .errors import InputError
from .stream.options import Options
from .stream.window import Trace, WindowSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



@dataclass(frozen=True)
class Framing:
    """Which frames the video of some audio has (``stream.output``): "aligned", frame i shows audio frame i;
    "release", frame 0 is the reference's reconstruction and the audio's frames follow (docs/design.md s5)."""

    release: bool
    samples_per_frame: int

    @property
    def lead(self) -> int:
        """Frames before the audio's first frame."""
        return 1 if self.release else 0

    def total(self, samples: int) -> int:
        """Frames of the video of ``samples`` samples of audio (a started frame counts)."""
        return self.lead + -(-samples // self.samples_per_frame)


STATS_KEPT = 1000  # step timings a session keeps (the latest): bounded, so a session can run for hours


@dataclass
class Stats:
    steps: int = 0
    dit_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_KEPT))  # the latest steps' timings
    vae_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_KEPT))
    first_frame_ms: float | None = None  # from the first audio pushed to the first frame out (compute)


class Session:
    """One stream of an ``api.Avatar``: audio chunks in, frames out. Not thread-safe; one per client."""

    def __init__(self, avatar, reference: Tensor, seed: int, mode: str, options: Options,
                 context: Tensor | None = None):
        self.avatar, self.cfg = avatar, avatar.cfg
        self.fe = avatar.front_end.streamer()  # this stream's own (a front end may cache per stream)
        self.spf = self.cfg.codec.samples_per_frame
        self.B = self.cfg.stream.block_frames
        self.frames_per_block = self.B * self.cfg.codec.temporal_stride
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ref_latent = avatar.vae.encode_image(reference)  # [1, C, 1, h, w]
            self.decoder = avatar.vae.stream_decoder()
            first = self.decoder.decode(ref_latent)  # primes the causal decoder with latent frame 0
        # stream.output "release": that reconstruction of the reference is the video's frame 0
        self.framing = avatar.framing
        self._pending = [to_uint8(first[0].transpose(0, 1).float().cpu().numpy())] if self.framing.release else []
        self.sampler = avatar.sampler(mode, ref_latent, [gen], options, context)
        self.sampler.trace = Trace(keep=False)  # a session may run for hours: no per-step record
        self.pcm = torch.zeros(0)
        self.offset = 0  # absolute index of self.pcm[0]
        self.received = 0  # samples pushed so far
        self.blocks_in = 0
        self.frames_out = 0
        self.closed = False
        self.stats = Stats()
        self._silence: Tensor | None = None  # one block of silence's rows, made on the first interrupt
        self._t_first_audio: float | None = None
        self._compute_s = 0.0

    # ------------------------------------------------------------------ public

    @property
    def lookahead_ms(self) -> float:
        """Algorithmic latency: audio a frame waits for (the window's future blocks + the front end's)."""
        window = self.sampler.L if isinstance(self.sampler, WindowSampler) else self.sampler.chunk_blocks
        return self.avatar.lookahead_ms(window)

    def latency_budget(self) -> dict:
        steps = list(self.stats.dit_ms)[-100:]
        vae = list(self.stats.vae_ms)[-100:]
        compute = float(np.median(steps) + (np.median(vae) if vae else 0)) if steps else None
        return {"lookahead_ms": self.lookahead_ms, "compute_ms_per_step": compute,
                "total_ms": self.lookahead_ms + (compute or 0.0)}

    def push(self, pcm, sample_rate: int | None = None) -> list[np.ndarray]:
        """Feed float32 mono PCM at the model's rate (16 kHz); returns the frames that became ready."""
        self.feed(pcm, sample_rate)
        return self.run()

    def feed(self, pcm, sample_rate: int | None = None) -> None:
        """Queue PCM without computing: ``run`` (or an ``engine.Engine`` stepping many sessions) makes frames."""
        if self.closed:
            raise InputError("session is closed")
        want = self.cfg.codec.sample_rate
        if sample_rate is not None and sample_rate != want:
            raise InputError(f"audio chunk at {sample_rate} Hz; this model takes {want} Hz mono "
                             f"(resample with avatarforcing.data.audio.resample)")
        x = check_pcm(pcm, "audio chunk")
        if self._t_first_audio is None and len(x):
            self._t_first_audio = time.perf_counter()
            self._compute_s = 0.0
        self.pcm = torch.cat([self.pcm, x])
        self.received += len(x)

    def run(self, final: bool = False) -> list[np.ndarray]:
        """Every block whose audio (and look-ahead) has arrived through the model, alone; the frames made."""
        out = self.take_pending()
        while (rows := self.next_block(final)) is not None:
            t0 = time.perf_counter()
            latents = self.sampler.push(rows)
            self.account(self._elapsed(t0))
            out += self.decode(latents)
        return out

    def next_block(self, final: bool = False) -> Tensor | None:
        """The audio rows of the next block, packed for the sampler [1, B, pack, dim], once its audio and the
        front end's look-ahead have arrived (``final``: the audio is complete, pad with silence); else None."""
        if not self.ready(final):
            return None
        fpb = self.frames_per_block
        a, b = self.blocks_in * fpb, (self.blocks_in + 1) * fpb
        rows = self.fe.features(self.pcm, a, b, offset=self.offset)  # [fpb, D]
        self.blocks_in += 1
        self._trim_pcm()
        return self.avatar.pack_block(rows[None])

    def ready(self, final: bool = False) -> bool:
        """Whether the next block's audio (and the front end's look-ahead) has arrived."""
        fpb = self.frames_per_block
        a, b = self.blocks_in * fpb, (self.blocks_in + 1) * fpb
        return b <= self.fe.frames_ready(self.received) or (final and a < -(-self.received // self.spf))

    def take_pending(self) -> list[np.ndarray]:
        """Frames made before any block (the release framing's frame 0), once."""
        out, self._pending = self._pending, []
        self.frames_out += sum(len(f) for f in out)
        return out

    def close(self) -> list[np.ndarray]:
        """Finish the stream: pad the last block with silence, drain the window, trim to the audio length."""
        out = []
        while not self.closed:
            out += self.close_step()
        return out

    def close_step(self) -> list[np.ndarray]:
        """One model step of ``close`` (the last blocks, padded, one at a time; then the window's drain, one step
        at a time): a server steps a closing stream between the other streams' steps, never all at once.
        ``closed`` once everything has come out."""
        if self.closed:
            return []
        out = self.take_pending()
        t0 = time.perf_counter()
        if (rows := self.next_block(final=True)) is not None:
            latents = self.sampler.push(rows)
        else:
            latents = self.sampler.drain_step()
            self.closed = self.sampler.empty
        self.account(self._elapsed(t0))
        out += self.decode(latents)
        return self._trim(out, self.framing.total(self.received))

    def mute(self, start: int) -> None:
        """Silence everything from sample ``start`` (a block boundary) that has not become frames yet (an
        interrupt): the audio not read into rows yet becomes zeros, and the blocks still in the window are
        conditioned on silence rows from their next pass on. History (anchors, KV buffer) is kept."""
        i = max(start - self.offset, 0)
        if i < len(self.pcm):
            self.pcm[i:] = 0
        first = start // (self.frames_per_block * self.spf)
        rows = self._silence_rows()
        for block in getattr(self.sampler, "window", ()):
            if block.index >= first and block.audio is not None:
                block.audio = rows.expand_as(block.audio)

    def _silence_rows(self) -> Tensor:
        """The audio rows of one block of silence, as a fresh stream of this front end hears it."""
        if self._silence is None:
            fe = self.avatar.front_end.streamer()
            n = self.frames_per_block * self.spf + fe.lookahead_samples + self.spf
            rows = fe.features(torch.zeros(n), 0, self.frames_per_block, offset=0)
            self._silence = rows.view(1, self.B, self.cfg.model.audio_pack, -1).to(self.avatar.device,
                                                                                   self.avatar.dtype)
        return self._silence

    # ------------------------------------------------------------------ internals

    def _trim(self, out: list[np.ndarray], total: int) -> list[np.ndarray]:
        excess = self.frames_out - total
        while excess > 0 and out:
            drop = min(excess, len(out[-1]))
            out[-1] = out[-1][: len(out[-1]) - drop]
            excess -= drop
            self.frames_out -= drop
            if not len(out[-1]):
                out.pop()
        return out

    def _elapsed(self, t0: float) -> float:
        _sync(self.avatar.device)
        return time.perf_counter() - t0

    def account(self, seconds: float) -> None:
        """One model step of this session took ``seconds`` (in a batch: the batch's step)."""
        self.stats.dit_ms.append(1000 * seconds)
        self.stats.steps += 1
        self._compute_s += seconds

    def decode(self, latents: list[Tensor]) -> list[np.ndarray]:
        """Emitted latent blocks -> frames through this session's streaming decoder."""
        out = []
        for z in latents:
            t0 = time.perf_counter()
            out.append(self.decoded(self.decoder.decode(z)[0], t0))
        return out

    def decoded(self, video: Tensor, t0: float) -> np.ndarray:
        """This session's decoded block [3, T, H, W] (decoding began at ``t0``) as uint8 frames [T, H, W, 3]."""
        arr = to_uint8(video.transpose(0, 1).float().cpu().numpy())
        dt = self._elapsed(t0)
        self.stats.vae_ms.append(1000 * dt)
        self._compute_s += dt
        if self.stats.first_frame_ms is None:
            self.stats.first_frame_ms = 1000 * self._compute_s
        self.frames_out += len(arr)
        return arr

    def _trim_pcm(self) -> None:
        """Keep only the samples future blocks can still need (bounded memory for endless streams)."""
        keep_from = self.blocks_in * self.frames_per_block * self.spf - self.fe.left_context_samples
        drop = keep_from - self.offset
        if drop > 0:
            self.pcm = self.pcm[drop:]
            self.offset += drop

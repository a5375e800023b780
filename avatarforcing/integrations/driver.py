"""A live session driven from asyncio, the shape both agent frameworks need.

    push(pcm, rate) / end_segment() / interrupt()   from the event loop, any time: queued as operations
    async for item in driver.run():                 the media clock: every tick the queued operations are
                                                     applied and the clock advanced in a worker thread (the
                                                     model's compute), then its LiveFrames and
                                                     PlaybackFinished events come out, in order
    await driver.close()                            the window drains; its last frames, then the end

The session itself is not thread-safe, so only the worker thread touches it; the event loop only appends to the
inbox. Speech at any sample rate is resampled to the model's rate without seams (``StreamResampler``).

An interrupt takes effect at once for what comes out: frames of a tick that was under way when it came (made
before the session saw it) are yielded without their speech (``speaking=False``, silent PCM) and that tick's
end-of-segment events are dropped, so no frame after ``interrupt()`` carries the dropped speech. (Before, up to
a tick of it still came out: LiveKit's runner then played it, reported a new playback start with no end and
carried its length into the next utterance's position.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from math import gcd

import numpy as np

from ..data.audio import resample
from ..live import LiveFrame, PlaybackFinished

TICK_S = 0.04  # the clock's period (one video frame at 25 fps)


def s16_to_float(audio: bytes, channels: int) -> np.ndarray:
    """Interleaved s16 PCM -> float32 mono in [-1, 1] (channels averaged)."""
    x = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, channels).mean(axis=1) if channels > 1 else x


def float_to_s16(pcm: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> s16 PCM bytes."""
    return np.clip(np.round(np.asarray(pcm, np.float32) * 32768.0), -32768, 32767).astype("<i2").tobytes()


class StreamResampler:
    """Chunked band-limited resampling with no seams: input is cut into whole periods of the rate ratio, each
    resampled with ``context`` input samples of real signal on both sides, and only its own span is kept (the
    right context is waited for; ``flush`` pads the end with silence)."""

    def __init__(self, rate_in: int, rate_out: int, context: int = 256):
        g = gcd(rate_in, rate_out)
        self.a, self.b = rate_in // g, rate_out // g  # a input samples <-> b output samples
        self.rate_in, self.rate_out = rate_in, rate_out
        self.ctx = -(-context // self.a) * self.a  # whole periods
        self.buf = np.zeros(self.ctx, np.float32)  # left context (silence before the start), then pending input

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1)
        if self.a == self.b:
            return x
        self.buf = np.concatenate([self.buf, x])
        ready = (len(self.buf) - 2 * self.ctx) // self.a * self.a  # whole periods with both contexts present
        if ready <= 0:
            return np.zeros(0, np.float32)
        seg = self.buf[: self.ctx + ready + self.ctx]
        y = resample(seg, self.rate_in, self.rate_out)
        lo = self.ctx * self.b // self.a
        out = y[lo: lo + ready * self.b // self.a]
        self.buf = self.buf[ready:]
        return out.astype(np.float32)

    def flush(self) -> np.ndarray:
        """The rest, its right context silence."""
        if self.a == self.b:
            return np.zeros(0, np.float32)
        pending = len(self.buf) - self.ctx
        pad = (-pending) % self.a
        out = self.push(np.zeros(pad + self.ctx, np.float32))
        keep = round(pending * self.b / self.a)
        self.buf = np.zeros(self.ctx, np.float32)
        return out[:keep]


class LiveDriver:
    """One live session of ``avatar`` for an asyncio caller (a Pipecat service, a LiveKit VideoGenerator)."""

    def __init__(self, avatar, image, seed: int = 0, prompt: str | None = None, tick_s: float = TICK_S):
        self.avatar, self.image, self.seed, self.prompt, self.tick_s = avatar, image, seed, prompt, tick_s
        self.rate = avatar.cfg.codec.sample_rate
        self.live = None
        self.inbox: deque = deque()
        self.resamplers: dict[int, StreamResampler] = {}
        self.closing = False
        self.interrupts = 0  # interrupt() calls so far

    # ---------------------------------------------------------------- event loop side

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Speech: float32 mono at ``sample_rate`` (resampled to the model's rate)."""
        r = self.resamplers.setdefault(sample_rate, StreamResampler(sample_rate, self.rate))
        x = r.push(pcm)
        if len(x):
            self.inbox.append(("push", x))

    def end_segment(self) -> None:
        for r in self.resamplers.values():
            tail = r.flush()
            if len(tail):
                self.inbox.append(("push", tail))
        self.inbox.append(("segment_end", None))

    def interrupt(self) -> None:
        self.resamplers.clear()  # what they held belongs to the dropped speech
        self.interrupts += 1
        self.inbox.append(("interrupt", None))

    async def open(self) -> None:
        if self.live is None:
            self.live = await asyncio.to_thread(self.avatar.live, self.image, seed=self.seed, prompt=self.prompt)

    async def run(self) -> AsyncIterator[LiveFrame | PlaybackFinished]:
        """The media clock, from now until ``close``: frames and events as they are made."""
        await self.open()
        t0 = time.monotonic()
        while not self.closing:
            now = time.monotonic() - t0
            async for item in self._out(self._tick, now):
                yield item
            await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - t0 - now)))
        async for item in self._out(self._close):
            yield item

    async def _out(self, step, *args) -> AsyncIterator[LiveFrame | PlaybackFinished]:
        """One step of the session in the worker thread, then its frames and events; those an interrupt overtook
        (it came after the step began) lose their speech."""
        asked = self.interrupts
        frames, events = await asyncio.to_thread(step, *args)
        for f in frames:
            yield f if self.interrupts == asked else f.silenced()
        for e in events:
            if self.interrupts == asked or e.interrupted:
                yield e

    def close(self) -> None:
        """Ask ``run`` to finish: it drains the window, yields the last frames and ends."""
        self.closing = True

    # ---------------------------------------------------------------- worker thread side

    def _apply(self) -> None:
        while self.inbox:
            kind, pcm = self.inbox.popleft()
            if kind == "push":
                self.live.push(pcm)
            elif kind == "segment_end":
                self.live.end_segment()
            else:
                self.live.interrupt()

    def _tick(self, now: float) -> tuple[list[LiveFrame], list[PlaybackFinished]]:
        self._apply()
        frames = self.live.tick(now)
        return frames, self.live.events()

    def _close(self) -> tuple[list[LiveFrame], list[PlaybackFinished]]:
        self._apply()
        frames = self.live.close()
        return frames, self.live.events()

"""A live session as the scheduler sees it, whatever carries it (a WebSocket: live.py; WebRTC: webrtc.py).

    client side (event loop)        push(pcm) / control(kind) -> inbox, checked against the limits at once
    scheduler thread (engine.py)    advance(live, now): the inbox applied in order, the clock advanced to now;
                                    the scheduler then steps the session and puts (frames, events, samples
                                    taken, interrupts applied) -- or the exception it raised -- in the outbox
    transport (event loop)          awaits the outbox, sends, calls ``took(n)``; per frame ``note`` counts it
                                    and gives the 'state' / 'stats' messages both transports send

An ``interrupt`` is counted when it arrives (``asked``) and when the session gets it (``applied``, which each
outbox entry carries): the frames of a step the interrupt overtook (made before the session had it, sent after
the client asked) go out without their speech (``fresh``), so none carries the dropped speech.

``open`` makes the session of a live start request (the portrait decoded off the event loop).

The inbox is bounded in audio (``max_live_queue_seconds`` ahead of the clock, ``max_session_seconds`` in all):
nothing a long session does grows without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np

from ..errors import AvatarForcingError
from .admission import Pool
from .protocol import ClientError, StartRequest
from .spec import Limits

CONTROLS = ("segment_end", "interrupt", "end")


class LiveFeed:
    """One live session's way in and out of the scheduler."""

    def __init__(self, live, limits: Limits, pool: Pool):
        self.live = live  # live.LiveSession
        self.limits, self.pool = limits, pool
        self.rate = live.rate
        self.inbox: deque[tuple[str, np.ndarray | None]] = deque()
        self.outbox: asyncio.Queue = asyncio.Queue()  # what the scheduler made for this session, tick by tick
        self.t_start = 0.0  # the session's media-clock origin (monotonic), set by the transport from the scheduler
        self.received = 0  # samples pushed by the client, in all
        self.buffered = 0  # of those, in the inbox (not yet given to the session)
        self.state, self.sent, self.late = "listening", 0, 0  # what the client was told; frames sent, late
        self.slipped = 0.0  # how far the clock had slipped (live.py) at the last frame sent
        self.asked = self.applied = 0  # interrupts from the client; of those, given to the session

    @classmethod
    async def open(cls, shared, req: StartRequest) -> LiveFeed:
        """The live session of ``req`` (a start request with ``live``) on ``shared``'s model; a bad portrait or
        prompt is the client's error."""
        from .stream import checked_image

        avatar, limits = shared.avatar, shared.limits

        def make():  # in a worker thread: a large upload never stalls the event loop
            image = req.image if isinstance(req.image, np.ndarray) else \
                checked_image(req.image, limits, avatar.cfg.codec.exif_rotate)
            return avatar.live(image, seed=req.seed, prompt=req.prompt)

        try:
            live = await asyncio.get_running_loop().run_in_executor(None, make)
        except AvatarForcingError as e:
            raise ClientError("bad_prompt" if req.prompt and "prompt" in str(e) else "bad_image", str(e)) from None
        return cls(live, limits, shared.pool)

    def note(self, frame, late: bool, metrics, sessions: int) -> tuple[dict | None, dict | None]:
        """One frame sent (``late``: after its due time): counted; the 'state' message to send before it (on a
        change) and the 'stats' message after it (every fps frames), or None."""
        state = "speaking" if frame.speaking else "listening"
        before = None
        if state != self.state:
            self.state = state
            before = {"type": "state", "state": state, "pts": frame.pts}
        self.sent += 1
        self.late += late
        slipped = frame.due_s - frame.pts
        if slipped > self.slipped:
            metrics.add("live_clock_slipped_seconds_total", slipped - self.slipped)
            self.slipped = slipped
        metrics.add("frames_total")
        if late:
            metrics.add("frames_late_total")
        if self.sent % self.live.fps:
            return before, None
        wall = time.monotonic() - self.t_start
        return before, {"type": "stats", "frames": self.sent, "frames_late": self.late, "clock_s": round(wall, 3),
                        "pts": frame.pts, "behind_ms": round(1000 * (wall - frame.due_s), 1),
                        "slipped_ms": round(1000 * (frame.due_s - frame.pts), 1),
                        "lookahead_ms": self.live.lookahead_ms, "sessions": sessions}

    # ------------------------------------------------------------------ the client's side (event loop)

    def push(self, pcm: np.ndarray) -> None:
        """Speech from the client (float32 at the model's rate), checked against the limits before it is kept."""
        ahead = self.buffered + len(pcm) + self.live.queued
        if ahead > self.limits.max_live_queue_seconds * self.rate:  # bounded memory
            raise ClientError("limit", f"more than {self.limits.max_live_queue_seconds:.0f} s of speech "
                                       "queued ahead of the clock")
        if self.received + len(pcm) > self.limits.max_session_seconds * self.rate:
            raise ClientError("limit", f"session exceeded {self.limits.max_session_seconds:.0f} s of audio")
        self.received += len(pcm)
        self._buffer(len(pcm))
        self.inbox.append(("push", pcm))

    def control(self, kind: str) -> None:
        """``segment_end``, ``interrupt`` or ``end`` (the transport ends the session once the inbox is empty)."""
        if kind not in CONTROLS:
            raise ValueError(f"unknown control {kind!r}; expected one of {CONTROLS}")
        self.asked += kind == "interrupt"
        self.inbox.append((kind, None))

    def fresh(self, frame, applied: int):
        """A frame of an outbox entry (made with ``applied`` interrupts given to the session) as it may be sent
        now: without its speech if an interrupt came since."""
        return frame if applied == self.asked else frame.silenced()

    def took(self, n: int) -> None:
        """The scheduler gave ``n`` of the inbox's samples to the session."""
        self._buffer(-n)

    def release(self) -> None:
        """The session ended: its inbox no longer counts in the server's queue."""
        self._buffer(-self.buffered)
        self.inbox.clear()

    def _buffer(self, n: int) -> None:
        self.buffered += n
        self.pool.queued += n

    # ------------------------------------------------------------------ the scheduler's side (its thread)

    def advance(self, live, now: float) -> int:
        """The client's operations in order, then the clock of ``live`` (this feed's session when it was attached)
        to ``now`` (monotonic). Returns the samples taken from the inbox."""
        taken = 0
        while self.inbox:
            kind, pcm = self.inbox.popleft()
            if kind == "push":
                live.push(pcm)
                taken += len(pcm)
            elif kind == "segment_end":
                live.end_segment()
            elif kind == "interrupt":
                live.interrupt()
                self.applied += 1
        live.advance(now - self.t_start)
        return taken


def finished_message(e) -> dict:
    """The 'playback_finished' message of a live.PlaybackFinished."""
    return {"type": "playback_finished", "segment": e.segment, "position_s": round(e.position_s, 6),
            "interrupted": e.interrupted}

"""A live session as the scheduler sees it, whatever carries it (a WebSocket: live.py; WebRTC: webrtc.py).

    client side (event loop)        push(pcm) / control(kind) -> inbox, checked against the limits at once
    scheduler thread (engine.py)    advance(live, now): the inbox applied in order, the clock advanced to now;
                                    the scheduler then steps the session and puts (frames, events, samples
                                    taken) -- or the exception it raised -- in the outbox
    transport (event loop)          awaits the outbox, sends, calls ``took(n)``

The inbox is bounded in audio (``max_live_queue_seconds`` ahead of the clock, ``max_session_seconds`` in all):
nothing a long session does grows without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np

from .admission import Pool
from .protocol import ClientError
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
        self.inbox.append((kind, None))

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
        live.advance(now - self.t_start)
        return taken

"""One live stream (``"live": true`` in 'start', protocol 2): an always-on avatar paced by the server's clock.

    read : socket -> inbox of operations (push PCM, segment_end, interrupt, end); never waits for the model
    run  : attached to the scheduler (engine.py), which every tick applies the inbox, advances the session's
           clock (started on the scheduler's block grid) and steps the due blocks of every live session in one
           batch; this stream sends what lands in its outbox: each frame (index, pts, its PCM, JPEG), 'state' on
           speaking <-> listening, 'playback_finished' per segment, 'stats' every fps frames
    end  : detached, the window drains (in the scheduler thread), 'done', close 1000

A live session is not idle while its client is connected (silence is what it renders); it ends on 'end', a
disconnect, an error or the wall-clock limit (``max_session_seconds``). When compute falls behind the clock
the session catches up (every due block is committed at once and its frames follow in a burst): no frame is
dropped, the late ones are counted (``frames_late`` in 'stats', ``frames_late_total`` in /metrics): a frame is
late when it is sent more than ``late_ms`` after its due time (its pts + the look-ahead + one block).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

import numpy as np

from ..errors import AvatarForcingError
from .connection import Connection, Shared
from .protocol import PROTOCOL, ClientError, StartRequest, decode_pcm, live_frame_message, parse_control
from .stream import Stream


class LiveStream(Stream):
    """A Stream whose pump is the media clock, not the client's audio."""

    def __init__(self, conn: Connection, req: StartRequest, shared: Shared):
        super().__init__(conn, req, shared)
        self.inbox: deque[tuple[str, np.ndarray | None]] = deque()
        self.live = None
        self.ended = asyncio.Event()
        self.state = "listening"
        self.late = 0
        self.outbox: asyncio.Queue = asyncio.Queue()  # what the scheduler made for this stream, tick by tick

    async def open(self) -> None:
        avatar, req, loop = self.shared.avatar, self.req, asyncio.get_running_loop()
        try:  # decoded in the worker: a large upload never stalls the event loop
            self.live = await loop.run_in_executor(None, lambda: avatar.live(self.portrait(), seed=req.seed,
                                                                              prompt=req.prompt))
        except AvatarForcingError as e:
            raise ClientError("bad_prompt" if req.prompt and "prompt" in str(e) else "bad_image", str(e)) from None
        self.session = self.live.session

    async def read(self) -> None:
        """Socket -> inbox. Only the session's wall-clock limit applies: a connected live client is never idle."""
        while True:
            left = self.limits.max_session_seconds - (time.monotonic() - self.t_start)
            msg = await self.conn.receive(left, "limit", f"session reached {self.limits.max_session_seconds:.0f} s")
            if msg.get("bytes") is not None:
                pcm = decode_pcm(msg["bytes"], self.req.fmt)
                self.received += len(pcm)
                ahead = self.buffered + len(pcm) + (self.live.queued if self.live is not None else 0)
                if ahead > self.limits.max_live_queue_seconds * self.codec.sample_rate:  # bounded memory
                    raise ClientError("limit", f"more than {self.limits.max_live_queue_seconds:.0f} s of speech "
                                               "queued ahead of the clock")
                if self.received > self.limits.max_session_seconds * self.codec.sample_rate:
                    raise ClientError("limit", f"session exceeded {self.limits.max_session_seconds:.0f} s of audio")
                self._buffer(len(pcm))
                self.inbox.append(("push", pcm))
                continue
            kind = parse_control(msg["text"], live=True)
            self.inbox.append((kind, None))
            if kind == "end":
                self.ended.set()
                return

    def advance(self, live, now: float) -> int:
        """In the scheduler thread: the client's operations in order, then the clock of ``live`` (this stream's
        session when it was attached) to ``now`` (monotonic). Returns the samples taken from the inbox."""
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

    def _buffer(self, n: int) -> None:
        self.buffered += n
        self.shared.pool.queued += n

    async def run(self) -> None:
        await self.open()
        c = self.codec
        block_ms = 1000 * self.live.block_s
        await self.conn.send(json.dumps({
            "type": "ready", "width": c.width, "height": c.height, "fps": c.fps, "live": True, "protocol": PROTOCOL,
            "lookahead_ms": self.live.lookahead_ms, "block_ms": block_ms, "grace_ms": 1000 * self.live.grace_s,
            "sample_rate": c.sample_rate, "frame_header": "<IdI", **({"replica": self.shared.replica}
                                                                       if self.shared.replica else {})}))
        scheduler = self.shared.scheduler
        self.t_start = scheduler.start_time()  # on the block grid: its blocks fall due with the others'
        due_after = (self.live.lookahead_ms + block_ms + self.limits.late_ms) / 1000
        read_task = asyncio.ensure_future(self.read())
        self.tasks.append(read_task)
        scheduler.attach(self)
        try:
            while True:
                if read_task.done():
                    if read_task.cancelled():
                        return  # the server closed this stream (shutdown)
                    read_task.result()  # the reader failed: raise its error ('end': the outbox follows)
                out = asyncio.ensure_future(self.outbox.get())
                waits = {out} if read_task.done() else {out, read_task}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if out not in done:
                    out.cancel()
                    continue
                result = out.result()
                if isinstance(result, Exception):
                    raise result
                frames, events, taken = result
                self._buffer(-taken)
                for f in frames:
                    await self._send_frame(f, due_after)
                for e in events:
                    await self.conn.send(json.dumps({"type": "playback_finished", "segment": e.segment,
                                                     "position_s": round(e.position_s, 6),
                                                     "interrupted": e.interrupted}))
                if self.ended.is_set() and not self.inbox:
                    scheduler.detach(self)
                    for f in await scheduler.call(self.live.close):
                        await self._send_frame(f, due_after)
                    return await self.finish()
        finally:
            scheduler.detach(self)
            read_task.cancel()
            self.tasks.clear()
            self.session = self.live = None
            self.shared.pool.queued -= self.buffered

    async def _send_frame(self, f, due_after: float) -> None:
        state = "speaking" if f.speaking else "listening"
        if state != self.state:
            self.state = state
            await self.conn.send(json.dumps({"type": "state", "state": state, "pts": f.pts}))
        await self.conn.send(data=live_frame_message(f.index, f.pts, f.pcm, f.image, self.limits.jpeg_quality))
        self.sent += 1
        metrics = self.shared.metrics
        metrics.add("frames_total")
        wall = time.monotonic() - self.t_start
        if wall > f.pts + due_after:
            self.late += 1
            metrics.add("frames_late_total")
        if self.sent % self.codec.fps == 0:
            await self.conn.send(json.dumps({"type": "stats", "frames": self.sent, "frames_late": self.late,
                                             "clock_s": round(wall, 3), "pts": f.pts,
                                             "behind_ms": round(1000 * (wall - f.pts), 1),
                                             "lookahead_ms": self.live.lookahead_ms,
                                             "sessions": self.shared.admission.active}))

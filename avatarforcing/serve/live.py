"""One live stream (``"live": true`` in 'start', protocol 2): an always-on avatar paced by the server's clock.

    read : socket -> inbox of operations (push PCM, segment_end, interrupt, end); never waits for the model
    run  : attached to the scheduler (engine.py), which every tick applies the inbox, advances the session's
           clock (started on the scheduler's block grid) and steps the due blocks of every live session in one
           batch; this stream sends what lands in its outbox: each frame (index, pts, its PCM, JPEG), 'state' on
           speaking <-> listening, 'playback_finished' per segment, 'stats' every fps frames
    end  : detached, the window drains (one model step per scheduler iteration), 'done', close 1000

A live session is not idle while its client is connected (silence is what it renders); it ends on 'end', a
disconnect, an error or the wall-clock limit (``max_session_seconds``). When compute falls behind the clock
the session catches up (every due block is committed at once and its frames follow in a burst), up to one
second; further behind, its clock slips (waits for compute: avatarforcing/live.py), so delay and memory stay
bounded on a machine that cannot keep real time. No frame is dropped; the late ones
are counted (``frames_late`` in 'stats', ``frames_late_total`` in /metrics): a frame is late when it is sent
more than ``late_ms`` after its due time (its ``due_s``, the pts plus the clock's slip, + the look-ahead +
one block). The slip itself is in 'stats' (``slipped_ms``) and /metrics (``live_clock_slipped_seconds_total``).
"""

from __future__ import annotations

import asyncio
import json
import time

from .connection import Connection, Shared
from .feed import LiveFeed, finished_message
from .protocol import PROTOCOL, StartRequest, decode_pcm, live_frame_message, parse_control
from .stream import Stream


class LiveStream(Stream):
    """A Stream whose pump is the media clock, not the client's audio."""

    def __init__(self, conn: Connection, req: StartRequest, shared: Shared):
        super().__init__(conn, req, shared)
        self.live = None
        self.feed: LiveFeed | None = None  # what the scheduler steps (feed.py)
        self.ended = asyncio.Event()

    async def open(self) -> None:
        self.feed = await LiveFeed.open(self.shared, self.req)
        self.live = self.feed.live
        self.session = self.live.session

    async def read(self) -> None:
        """Socket -> the feed's inbox. Only the session's wall-clock limit applies: a connected live client is
        never idle."""
        while True:
            left = self.limits.max_session_seconds - (time.monotonic() - self.t_start)
            msg = await self.conn.receive(left, "limit", f"session reached {self.limits.max_session_seconds:.0f} s")
            if msg.get("bytes") is not None:
                self.feed.push(decode_pcm(msg["bytes"], self.req.fmt))
                continue
            kind = parse_control(msg["text"], live=True)
            self.feed.control(kind)
            if kind == "end":
                self.ended.set()
                return

    async def run(self) -> None:
        await self.open()
        c = self.codec
        block_ms = 1000 * self.live.block_s
        await self.conn.send(json.dumps({
            "type": "ready", "width": c.width, "height": c.height, "fps": c.fps, "live": True, "protocol": PROTOCOL,
            "lookahead_ms": self.live.lookahead_ms, "block_ms": block_ms, "grace_ms": 1000 * self.live.grace_s,
            "sample_rate": c.sample_rate, "frame_header": "<IdI", **({"replica": self.shared.replica}
                                                                       if self.shared.replica else {})}))
        scheduler, feed = self.shared.scheduler, self.feed
        self.t_start = feed.t_start = scheduler.start_time()  # on the block grid: due with the others' blocks
        due_after = (self.live.lookahead_ms + block_ms + self.limits.late_ms) / 1000
        read_task = asyncio.ensure_future(self.read())
        self.tasks.append(read_task)
        scheduler.attach(feed)
        try:
            while True:
                if read_task.done():
                    if read_task.cancelled():
                        return  # the server closed this stream (shutdown)
                    read_task.result()  # the reader failed: raise its error ('end': the outbox follows)
                out = asyncio.ensure_future(feed.outbox.get())
                waits = {out} if read_task.done() else {out, read_task}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if out not in done:
                    out.cancel()
                    continue
                result = out.result()
                if isinstance(result, Exception):
                    raise result
                frames, events, taken, applied = result
                feed.took(taken)
                for f in frames:
                    await self._send_frame(feed.fresh(f, applied), due_after)
                for e in events:
                    await self.conn.send(json.dumps(finished_message(e)))
                if self.ended.is_set() and not feed.inbox:
                    scheduler.detach(feed)
                    for f in await scheduler.drain(self.live):
                        await self._send_frame(f, due_after)
                    return await self.finish()
        finally:
            scheduler.detach(feed)
            read_task.cancel()
            if read_task.done() and not read_task.cancelled():
                read_task.exception()  # seen: a client gone while frames were being sent ends the stream here
            self.tasks.clear()
            self.session = self.live = None
            feed.release()

    async def _send_frame(self, f, due_after: float) -> None:
        late = time.monotonic() - self.t_start > f.due_s + due_after
        before, after = self.feed.note(f, late, self.shared.metrics, self.shared.admission.active)
        if before:
            await self.conn.send(json.dumps(before))
        await self.conn.send(data=live_frame_message(f.index, f.pts, f.pcm, f.image, self.limits.jpeg_quality))
        self.sent = self.feed.sent
        if after:
            await self.conn.send(json.dumps(after))

"""One started stream, from 'start' to 'done': the per-stream pump (the ``/ws`` route admits it, app.py).

    Stream.run: open (session, prompt, recording) -> 'ready', then
        read : socket -> queue of PCM  (up to max_buffered_seconds ahead of the model; then it waits)
        run  : queue -> the scheduler (at most push_seconds a push; its blocks batched with every other
               stream's, engine.py) -> emit
        emit : frames -> JPEG messages (each send bounded: slow_consumer), stats every fps frames
    -> 'done' (+ recording) and close 1000; or 'error' and its close code (fail)

A session holds its slot only while it streams. A session whose audio falls ``idle_timeout_s`` behind the
wall clock, or that runs past ``max_session_seconds``, is closed; a client that stops reading frames for
``send_timeout_s`` is closed (backpressure). Nothing of a stream outlives its connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque

import numpy as np

from ..errors import AvatarForcingError
from .connection import Connection, Shared
from .protocol import ClientError, StartRequest, bounded, decode_pcm, frame_message, parse_control
from .spec import Limits

log = logging.getLogger("avatarforcing.serve")


class Stream:
    """One started stream: ``run`` opens the session and pumps audio into frames until 'end' or an error."""

    def __init__(self, conn: Connection, req: StartRequest, shared: Shared):
        self.conn, self.req, self.shared, self.limits = conn, req, shared, shared.limits
        self.codec = shared.avatar.cfg.codec
        self.closing = False  # the server is closing this stream (shutdown): later failures are not errors
        self.tasks: list[asyncio.Task] = []
        self.queue: asyncio.Queue = asyncio.Queue()  # PCM chunks, then None for 'end'
        self.room = asyncio.Event()  # set while the queue has room (backpressure on the reader)
        self.room.set()
        self.received = self.buffered = self.sent = 0  # samples read, samples queued, frames sent
        # wall time at which the audio of each frame arrived, from frame `arrived_at` on (older ones are dropped
        # once used: bounded however long the stream)
        self.arrived: deque[float] = deque()
        self.arrived_at = 0
        self.session = None
        self.writer, self.token, self.path = None, None, None  # the recording, if asked for
        self.t_start = 0.0
        self.paused_s = 0.0  # the reader's time paused by backpressure
        self.rendered = 0  # samples handed to the model

    async def close(self, code: str, message: str) -> None:
        """Closed by the server (shutdown): the error frame, then stop the reader."""
        if self.closing:
            return
        self.closing = True
        await self.conn.close_with_error(code, message)
        for t in self.tasks:
            t.cancel()

    async def fail(self, e: Exception) -> None:
        """The stream ended by an error: the client gets its code (a reference for internal faults)."""
        if self.closing:
            return  # the server closed this stream (shutdown): what failed after that is not an error
        await self.close(*failure(e, self.shared.metrics))

    async def open(self) -> None:
        """The session (and the prompt's context, and the recording) for the 'start' request."""
        avatar, req, loop = self.shared.avatar, self.req, asyncio.get_running_loop()
        if req.prompt is not None:
            try:
                await loop.run_in_executor(None, lambda: avatar.context(req.prompt))
            except AvatarForcingError as e:
                raise ClientError("bad_prompt", str(e)) from None
        try:  # the image is decoded in the worker too: a large upload never stalls the event loop
            self.session = await loop.run_in_executor(None, lambda: avatar.session(
                self.portrait(), seed=req.seed, prompt=req.prompt))
        except AvatarForcingError as e:
            raise ClientError("bad_image", str(e)) from None
        if req.record:
            from ..data.video import VideoWriter

            self.token, self.path = self.shared.recordings.new_path()
            self.writer = VideoWriter(self.path, fps=self.codec.fps, sample_rate=self.codec.sample_rate)

    def portrait(self):
        """The start request's portrait as pixels (an upload is checked from its header, then decoded)."""
        if isinstance(self.req.image, np.ndarray):
            return self.req.image
        return checked_image(self.req.image, self.limits, self.codec.exif_rotate)

    async def read(self) -> None:
        """Drain the socket into the queue: keepalive pings keep being answered whatever the client sends."""
        limits, rate = self.limits, self.codec.sample_rate
        while True:
            wall = time.monotonic() - self.t_start
            # idle means the client sent nothing: time the reader spent paused by backpressure (the server
            # behind, the client's audio waiting in the socket) does not count
            idle_in = self.t_start + self.paused_s + self.received / rate + limits.idle_timeout_s - time.monotonic()
            limit_in = limits.max_session_seconds - wall
            code, why = ("idle_timeout", f"no audio for {limits.idle_timeout_s:.0f} s (the stream's audio fell "
                                         f"that far behind real time)") if idle_in < limit_in else \
                ("limit", f"session reached {limits.max_session_seconds:.0f} s")
            msg = await self.conn.receive(min(idle_in, limit_in), code, why)
            if msg.get("bytes") is None:
                parse_control(msg["text"])  # 'end'
                self.queue.put_nowait(None)
                return
            pcm = decode_pcm(msg["bytes"], self.req.fmt)
            if not len(pcm):
                continue  # no work, no credit: an empty message does not keep a session alive
            self.received += len(pcm)
            if self.received > limits.max_session_seconds * rate:
                raise ClientError("limit", f"session exceeded {limits.max_session_seconds:.0f} s of audio")
            now = time.monotonic()
            known = self.arrived_at + len(self.arrived)
            self.arrived.extend([now] * (self.received // self.codec.samples_per_frame - known))
            self._buffer(len(pcm))
            self.queue.put_nowait(pcm)
            if self.buffered > limits.max_buffered_seconds * rate:
                self.room.clear()
                paused = time.monotonic()
                await self.room.wait()  # backpressure: the processor catches up (faster than real time)
                self.paused_s += time.monotonic() - paused

    def _buffer(self, n: int) -> None:
        """``n`` samples enter the queue (negative: leave it)."""
        self.buffered += n
        self.shared.pool.queued += n
        if self.buffered <= self.limits.max_buffered_seconds * self.codec.sample_rate:
            self.room.set()

    async def next_audio(self, read_task: asyncio.Task) -> tuple[np.ndarray, bool] | None:
        """Queued audio up to ``push_seconds`` and whether 'end' came with it; None if the server closed the
        stream. A failed reader raises its error here."""
        while True:
            if read_task.done() and not read_task.cancelled() and read_task.exception() is not None:
                raise read_task.exception()  # the client left or erred: no more pushes for it
            getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({getter, read_task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                break
            getter.cancel()
            if read_task.cancelled():
                return None  # the server closed this stream (shutdown)
            read_task.result()  # the reader failed: raise its error
        items = [getter.result()]
        while not self.queue.empty() and items[-1] is not None and \
                sum(len(x) for x in items) < self.limits.push_seconds * self.codec.sample_rate:
            items.append(self.queue.get_nowait())
        pcm = np.concatenate([x for x in items if x is not None] or [np.zeros(0, np.float32)])
        self._buffer(-len(pcm))
        return pcm, items[-1] is None

    async def pace(self, samples: int) -> None:
        """At most ``max_speedup`` x real time: a client sending a long file at once waits its turn rather than
        taking the CPU from the real-time streams beside it."""
        self.rendered += samples
        ahead = self.rendered / self.codec.sample_rate / self.limits.max_speedup - (time.monotonic() - self.t_start)
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def emit(self, batches: list[np.ndarray]) -> None:
        c, metrics = self.codec, self.shared.metrics
        ahead = int(self.session.lookahead_ms * c.fps / 1000)  # frames of audio a frame waits for
        for frames in batches:
            if self.writer is not None:
                self.writer.write(frames)
            for f in frames:
                n = self.sent
                await self.conn.send(data=frame_message(n, c.fps, f, self.limits.jpeg_quality))
                self.sent = n + 1
                metrics.add("frames_total")
                need = n + ahead
                while self.arrived and self.arrived_at < need:  # frames before this one's need are done with
                    self.arrived.popleft()
                    self.arrived_at += 1
                lat = 1000 * (time.monotonic() - self.arrived[0]) if self.arrived and self.arrived_at == need \
                    else None
                if lat is not None and lat > self.limits.late_ms:
                    metrics.add("frames_late_total")
                if (n + 1) % c.fps == 0:
                    await self.conn.send(json.dumps({"type": "stats", "frames": n + 1, "latency_ms": lat,
                                                     "fps": (n + 1) / (time.monotonic() - self.t_start),
                                                     "lookahead_ms": self.session.lookahead_ms,
                                                     "sessions": self.shared.admission.active}))

    async def run(self) -> None:
        await self.open()
        c, session = self.codec, self.session
        ready = {"type": "ready", "width": c.width, "height": c.height, "fps": c.fps,
                 "lookahead_ms": session.lookahead_ms, "frame_header": "<Id"}
        if self.shared.replica is not None:
            ready["replica"] = self.shared.replica
        await self.conn.send(json.dumps(ready))
        self.t_start = time.monotonic()
        read_task = asyncio.ensure_future(self.read())
        self.tasks.append(read_task)
        try:
            while True:
                got = await self.next_audio(read_task)
                if got is None:
                    return
                pcm, final = got
                if self.writer is not None:
                    self.writer.add_audio(pcm)
                await self.pace(len(pcm))
                out = await self.shared.scheduler.push(session, pcm, self.t_start,  # batched with the others' blocks
                                                       lambda: self.received / self.codec.sample_rate)
                if final:
                    out += await self.shared.scheduler.drain(session)  # one step per iteration
                await self.emit(out)
                if final:
                    return await self.finish()
        finally:
            read_task.cancel()
            self.tasks.clear()
            self.session = None  # the model state goes now, not when a collector finds this stream's cycles
            self.shared.pool.queued -= self.buffered  # what this stream left unprocessed
            if self.writer is not None:  # an unfinished recording is not kept
                try:
                    self.writer.close()
                finally:
                    self.path.unlink(missing_ok=True)

    async def finish(self) -> None:
        done = {"type": "done", "frames": self.sent}
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.shared.recordings.add(self.token, self.path)
            done["recording"] = f"/recordings/{self.token}.mp4"
        await self.conn.send(json.dumps(done))
        await asyncio.wait_for(self.conn.ws.close(1000), timeout=1.0)


def failure(e: Exception, metrics) -> tuple[str, str]:
    """A stream's end by an error, counted and logged: the (code, message) its client gets. A client's mistake is
    named; an internal fault gets a reference (the log has the traceback), never internals."""
    metrics.add("errors_total")
    if isinstance(e, ClientError):
        log.info("client error: %s %s", e.code, bounded(e, 120))
        return e.code, str(e)
    metrics.add("internal_errors_total")
    ref = secrets.token_hex(4)
    log.error("internal error in a stream (ref %s)", ref, exc_info=e)
    return "internal", f"internal server error (ref {ref}, logged)"


def checked_image(data: bytes, limits: Limits, exif_rotate: bool = True):
    """An uploaded portrait, its size checked from the header before decoding."""
    from ..data.image import load_image

    return load_image(data, max_pixels=limits.max_image_pixels, exif_rotate=exif_rotate)

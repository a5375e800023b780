"""WebRTC: ``POST /offer`` (SDP offer in, answer out, WHIP-like) -> a live session over a peer connection
(aiortc, the ``[webrtc]`` extra).

    request   {"type": "offer", "sdp": ..., "start": {what a live WebSocket 'start' carries: identity or
              image, seed, prompt, format}}; the same Origin rule, admission and limits as ``/ws``
    answer    {"type": "answer", "sdp": ..., "session": id}   (ICE candidates gathered: no trickle)
    media     server -> peer: a video track (VP8) and an audio track (Opus), the avatar and its voice, on the
              live session's media clock (rtc_media.py); peer -> server: optionally its microphone, which is
              pushed as speech (resampled from whatever it sends)
    "control" the peer's data channel: binary messages are PCM (the start's format, the model's rate, as on the
              WebSocket); text: {"type": "segment_end" | "interrupt" | "end"}. The server sends 'ready',
              'state', 'playback_finished', 'stats', 'error' and 'done' (the WebSocket's messages, no frames)

Lifetime: the slot is taken at the offer; the session's clock starts when the peer connects (not before:
frames made before the media flows would be sent in a burst). It ends on 'end' (the window drains, 'done'),
the peer's connection failing or closing, not connecting within ``start_timeout_s``, an error, the server
shutting down, or ``max_session_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from .connection import Shared
from .feed import LiveFeed, finished_message
from .ice import rtc_configuration
from .protocol import ClientError, StartRequest, bounded, decode_pcm, error_message, parse_control, parse_start
from .rtc_media import MediaClock, avatar_track, discard, read_microphone
from .stream import failure

MAX_SDP_CHARS = 64 * 1024


def available() -> bool:
    """Whether the WebRTC extra (aiortc) is installed."""
    try:
        import aiortc  # noqa: F401
    except ImportError:
        return False
    return True


def parse_offer(body: object, sample_rate: int, height: int) -> tuple[str, StartRequest]:
    """The /offer request -> (SDP, the live session's start request); every problem names its field."""
    if not isinstance(body, dict) or body.get("type") != "offer":
        raise ClientError("protocol", 'expected {"type": "offer", "sdp": ..., "start": {...}}')
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or len(sdp) > MAX_SDP_CHARS:
        raise ClientError("protocol", f"'sdp' must be an SDP offer (starting 'v=0', at most {MAX_SDP_CHARS} chars)")
    start = body.get("start", {})
    if not isinstance(start, dict):
        raise ClientError("protocol", "'start' must be an object (identity or image, seed, prompt, format)")
    return sdp, parse_start(json.dumps({**start, "type": "start", "live": True}), sample_rate, height)


class RtcPeer:
    """One WebRTC peer and its live session, from the offer to its end."""

    def __init__(self, shared: Shared, req: StartRequest):
        from aiortc import RTCPeerConnection

        self.shared, self.req, self.limits = shared, req, shared.limits
        c = shared.avatar.cfg.codec
        self.fps, self.rate = c.fps, c.sample_rate
        self.id = secrets.token_urlsafe(9)
        self.pc = RTCPeerConnection(rtc_configuration(self.limits.ice_servers))
        self.clock = MediaClock(c.fps, c.sample_rate)
        self.live = self.feed = self.channel = None
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()  # the peer's connection failed or closed, or the session must end
        self.ended = False  # the peer sent 'end': drain, 'done', close
        self.closing = False
        self.tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ offer -> answer (the /offer request)

    async def answer(self, sdp: str) -> dict:
        from aiortc import RTCSessionDescription

        self.feed = await LiveFeed.open(self.shared, self.req)
        self.live = self.feed.live
        pc = self.pc
        pc.on("datachannel", self._on_channel)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)
        try:  # negotiation depends only on the offer: any failure of it is the offer's
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            offered = {t.kind for t in pc.getTransceivers()}
            if "video" not in offered:
                raise ClientError("protocol", "the offer must receive video (a video m-line, recvonly or sendrecv)")
            for kind in ("video", "audio"):
                if kind in offered:  # an offer without audio gets the video alone
                    pc.addTrack(avatar_track(self.clock, kind))
            await pc.setLocalDescription(await pc.createAnswer())
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ClientError("protocol", f"the SDP offer could not be used: {bounded(e, 120)}") from None
        return {"type": "answer", "sdp": pc.localDescription.sdp, "session": self.id}

    # ------------------------------------------------------------------ the session (a task of its own)

    async def run(self) -> None:
        """From the answer to the end: wait for the peer, then stream until something ends the session."""
        scheduler, feed = self.shared.scheduler, self.feed
        try:
            waits = [asyncio.ensure_future(e.wait()) for e in (self.connected, self.finished)]
            await asyncio.wait(waits, timeout=self.limits.start_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self.finished.is_set():
                return  # the connection failed or closed before it was up: nothing to stream
            if not self.connected.is_set():
                raise ClientError("start_timeout", f"the peer did not connect within "
                                                   f"{self.limits.start_timeout_s:.0f} s")
            feed.t_start = scheduler.start_time()
            first = self.live.lookahead_ms / 1000 + self.live.block_s  # when a frame can exist, at the earliest
            self.clock.origin = feed.t_start + first + self.limits.rtc_margin_ms / 1000
            scheduler.attach(feed)
            limit = asyncio.ensure_future(asyncio.sleep(self.limits.max_session_seconds))
            gone = asyncio.ensure_future(self.finished.wait())
            self.tasks += [limit, gone]
            while True:
                out = asyncio.ensure_future(feed.outbox.get())
                done, _ = await asyncio.wait({out, gone, limit}, return_when=asyncio.FIRST_COMPLETED)
                if limit in done:
                    raise ClientError("limit", f"session reached {self.limits.max_session_seconds:.0f} s")
                if out not in done:
                    out.cancel()
                    return  # the peer went away (or the server closed this session)
                result = out.result()
                if isinstance(result, Exception):
                    raise result
                frames, events, taken, applied = result
                feed.took(taken)
                self._emit([feed.fresh(f, applied) for f in frames], events)
                if self.ended and not feed.inbox:
                    scheduler.detach(feed)
                    self._emit(await scheduler.drain(self.live), [])
                    self._send({"type": "done", "frames": self.feed.sent})
                    await self._drain_media()
                    return
        except Exception as e:  # noqa: BLE001 - the session's end by an error: the peer gets its code
            self._fail(e)
        finally:
            scheduler.detach(feed)
            feed.release()
            await self.close_peer()

    def _emit(self, frames, events) -> None:
        for f in frames:
            late = time.monotonic() > self.clock.origin + self.clock.shift + f.pts  # made after its send time
            before, after = self.feed.note(f, late, self.shared.metrics, self.shared.admission.active)
            if before:
                self._send(before)
            self.clock.put(f.index, f.image, f.pcm)
            if after:
                self._send(after)
        for e in events:
            self._send(finished_message(e))

    async def _drain_media(self) -> None:
        """After 'end': the queued media goes out (bounded by its length) before the connection closes."""
        left = max(len(self.clock.video) / self.fps, 0.0) + 0.5
        deadline = time.monotonic() + min(left, 10.0)
        while (self.clock.video or self.clock.audio) and time.monotonic() < deadline and not self.finished.is_set():
            await asyncio.sleep(0.05)

    def _fail(self, e: Exception) -> None:
        self._send(json.loads(error_message(*failure(e, self.shared.metrics))))

    # ------------------------------------------------------------------ the peer's events

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed"):
            self.finished.set()

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self.tasks.append(asyncio.ensure_future(read_microphone(track, self.rate, self._push)))
        else:
            self.tasks.append(asyncio.ensure_future(discard(track)))

    def _on_channel(self, channel) -> None:
        if self.channel is not None:
            return  # one control channel; others are ignored
        self.channel = channel
        c = self.shared.avatar.cfg.codec
        channel.on("message", self._on_message)
        ready = {"type": "ready", "width": c.width, "height": c.height, "fps": c.fps, "live": True,
                 "webrtc": True, "lookahead_ms": self.live.lookahead_ms, "block_ms": 1000 * self.live.block_s,
                 "sample_rate": c.sample_rate, "session": self.id}
        if channel.readyState == "open":
            self._send(ready)
        else:
            channel.on("open", lambda: self._send(ready))

    def _on_message(self, message) -> None:
        try:
            if isinstance(message, bytes):
                if len(message) > self.limits.max_message_bytes:
                    raise ClientError("too_large", f"message of {len(message)} bytes exceeds the limit of "
                                                   f"{self.limits.max_message_bytes}")
                self._push(decode_pcm(message, self.req.fmt))
                return
            kind = parse_control(message, live=True)
            self.feed.control(kind)
            if kind == "interrupt":
                self.clock.mute()  # the speech already queued on the tracks is not sent either
            self.ended = self.ended or kind == "end"
        except ClientError as e:
            self._fail(e)
            self.finished.set()

    def _push(self, pcm) -> None:
        if self.ended or self.finished.is_set():
            return
        try:
            self.feed.push(pcm)
        except ClientError as e:
            self._fail(e)
            self.finished.set()

    # ------------------------------------------------------------------ out

    def _send(self, msg: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(json.dumps(msg))

    async def close(self, code: str, message: str) -> None:
        """Closed by the server (shutdown): the error message, then the connection."""
        if self.closing:
            return
        self._send(json.loads(error_message(code, message)))
        self.finished.set()
        await self.close_peer()

    async def close_peer(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.channel is not None and self.channel.bufferedAmount:
            await asyncio.sleep(0.2)  # the last messages ('done', an error) leave before the connection closes
        self.clock.close()
        for t in self.tasks:
            t.cancel()
        self.tasks.clear()
        self.live = None
        try:
            await asyncio.wait_for(self.pc.close(), timeout=2.0)
        except Exception:  # noqa: BLE001 - closing is all that is left
            pass

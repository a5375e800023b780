"""``POST /offer``: the HTTP side of a WebRTC session (the session itself: webrtc.py).

The same gates as ``/ws``: the Origin rule, a session slot (503 ``busy`` when none is free; taken with no await
between the check and the taking), the body bounded by the largest start message, the start fields checked by
the WebSocket's own parser. The slot is held by the session's task, not by the request: it is released when the
session ends however it ends. Without the ``[webrtc]`` extra the route answers 503 ``unavailable``.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .admission import origin_allowed
from .connection import Shared
from .protocol import ClientError, parse_json, show
from .webrtc import MAX_SDP_CHARS, RtcPeer, available, parse_offer

log = logging.getLogger("avatarforcing.serve")


def add_offer_route(app: FastAPI, shared: Shared, read_body) -> None:
    limits, admission, metrics = shared.limits, shared.admission, shared.metrics
    sessions: set[asyncio.Task] = set()  # running WebRTC sessions (a reference keeps each task alive)

    @app.post("/offer")
    async def offer(request: Request):
        if not available():
            raise ClientError("unavailable", "WebRTC needs the webrtc extra: pip install 'avatarforcing[webrtc]'")
        if not origin_allowed(request.headers, limits.allow_origins):
            log.info("refused an offer from origin %s", show(request.headers.get("origin"), 80))
            return JSONResponse({"error": "forbidden", "message": "origin not allowed"}, 403)
        body = await read_body(request, 2 * limits.max_message_bytes + MAX_SDP_CHARS)  # base64 image + SDP
        codec = shared.avatar.cfg.codec
        sdp, req = parse_offer(parse_json(body.decode("utf-8", "replace")), codec.sample_rate, codec.height)
        if admission.full():
            metrics.add("sessions_rejected_total")
            raise ClientError("busy", admission.refusal())
        slot = admission.session()
        slot.__enter__()  # held until the session ends (below), whatever ends it
        peer = RtcPeer(shared, req)
        try:
            answer = await peer.answer(sdp)
        except BaseException:
            await peer.close_peer()
            slot.__exit__(None, None, None)
            raise
        metrics.add("sessions_total")
        shared.pool.streams.add(peer)

        async def lifetime():
            try:
                await peer.run()
            finally:
                shared.pool.streams.discard(peer)
                slot.__exit__(None, None, None)

        task = asyncio.ensure_future(lifetime())
        sessions.add(task)
        task.add_done_callback(sessions.discard)
        return JSONResponse(answer)

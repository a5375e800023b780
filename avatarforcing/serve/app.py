"""The server's routes: FastAPI, one WebSocket per stream and the page's HTTP endpoints.

    /ws: Origin check -> accept -> admission (admission.py) -> 'start' (protocol.py) -> Stream.run (stream.py)
    /offer: WebRTC, the same checks -> a live session over a peer connection (rtc_route.py, webrtc.py)
    /healthz /metrics /model /identities /prepare /speak /sample.wav /recordings/TOKEN.mp4 /

The wire format is protocol.py (prose: docs/protocol.md).

Weights are loaded once (one ``Avatar``) and shared; every connection gets its own ``Session`` (its own
window, KV buffer, decoder state and noise), so no session can see another's frames. Compute runs in a
thread pool so the event loop keeps serving health checks, metrics and other clients. ``http.py`` runs the
app under uvicorn with the limits a public server needs; ``ray.py`` replicates it.
"""

from __future__ import annotations

import asyncio
import io
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from ..errors import AvatarForcingError
from ..identities import IDENTITIES, identity_image
from .admission import Gate, HostAllowList, origin_allowed
from .connection import Connection, Shared
from .ice import for_browsers
from .live import LiveStream
from .metrics import Metrics
from .protocol import HTTP_STATUS, ClientError, bounded, parse_json, parse_start, show
from .recordings import Recordings
from .rtc_route import add_offer_route
from .spec import Limits
from .stream import Stream
from .webrtc import available as webrtc_available
from .workers import Workers, prepared_png, speak_wav

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("avatarforcing.serve")


def create_app(avatar, limits: Limits | None = None, replica: str | None = None,
               metrics_source=None, recordings: Recordings | None = None) -> FastAPI:
    """The server's app for one ``api.Avatar``. ``replica``: a name sent in 'ready' (a replicated deployment);
    ``metrics_source``: an async callable returning {replica: Metrics snapshot} for /metrics (default: this
    process's own); ``recordings``: where recorded sessions are kept (default: a temporary folder)."""
    limits = limits or Limits()
    shared = Shared(avatar, limits, recordings=recordings, replica=replica)
    admission, metrics = shared.admission, shared.metrics
    speech_gate = Gate(1, 4, "speech synthesis")
    prepare_gate = Gate(2, 8, "portrait preparation")
    workers = Workers(limits.job_timeout_s)  # /speak and /prepare: one low-priority process

    async def notify_shutdown() -> None:
        """Tell every open stream ('shutdown' frame) and close it; bounded, so a stuck client cannot delay it."""
        admission.shutting_down = True
        await shared.pool.close_all("shutdown", "server is shutting down")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        expiring = asyncio.ensure_future(shared.recordings.expire_forever())
        await shared.scheduler.warm_up(avatar, limits.max_sessions)
        yield
        expiring.cancel()
        await notify_shutdown()
        shared.recordings.close()
        shared.scheduler.close()
        workers.close()

    docs = {} if limits.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="avatarforcing", lifespan=lifespan, **docs)
    if limits.allow_hosts:
        app.add_middleware(HostAllowList, hosts=limits.allow_hosts)
    app.state.metrics, app.state.limits, app.state.avatar = metrics, limits, avatar
    app.state.notify_shutdown, app.state.recordings = notify_shutdown, shared.recordings

    def snapshot() -> dict:
        """This process's metrics, with the gauges read from the live state."""
        metrics.values["sessions_active"], metrics.values["sessions_pending"] = admission.active, admission.pending
        metrics.values["queue_seconds"] = shared.pool.queued / avatar.cfg.codec.sample_rate
        return metrics.snapshot()

    app.state.snapshot = snapshot

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        return JSONResponse({"error": e.code, "message": bounded(e)}, status_code=HTTP_STATUS.get(e.code, 400))

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        health = {"status": "shutting_down" if admission.shutting_down else "ok",
                  "sessions": admission.active, "max_sessions": limits.max_sessions}
        if metrics_source is not None:  # a replicated deployment: its totals beside this replica's own
            snaps = await metrics_source()
            health["deployment"] = {"replicas": len(snaps), "max_sessions": len(snaps) * limits.max_sessions,
                                    "sessions": int(sum(x["values"].get("sessions_active", 0)
                                                        for x in snaps.values()))}
        return JSONResponse(health)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prom():
        own = {"": snapshot()}
        text = Metrics.render(await metrics_source() if metrics_source is not None else own)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.api_route("/identities", methods=["GET", "HEAD"])
    async def identities():
        return JSONResponse(sorted(IDENTITIES))

    @app.api_route("/identities/{name}.png", methods=["GET", "HEAD"])
    async def identity_png(name: str):
        if name not in IDENTITIES:
            return JSONResponse({"error": "not_found", "message": f"unknown identity {show(name)}"}, 404)
        return Response(_png(identity_image(name, avatar.cfg.codec.height)), media_type="image/png")

    @app.api_route("/model", methods=["GET", "HEAD"])
    async def model_info():
        c = avatar.cfg
        return JSONResponse({"name": c.name, "width": c.codec.width, "height": c.codec.height, "fps": c.codec.fps,
                             "text": bool(c.model.text_dim), "lookahead_ms": avatar.lookahead_ms(),
                             "about": about(c.name), "webrtc": webrtc_available(),
                             "ice_servers": for_browsers(limits.ice_servers), "max_sessions": limits.max_sessions})

    @app.post("/prepare")
    async def prepare(request: Request):
        """An uploaded portrait -> PNG of the reference the model will use (after its crop and resize)."""
        data = await read_body(request, limits.max_message_bytes)
        c = avatar.cfg.codec
        async with prepare_gate():  # decoded in the low-priority worker process: never on the event loop
            try:
                png = await workers.run(prepared_png, data, limits.max_image_pixels, c.exif_rotate, c.height,
                                        c.width, avatar.image_fit, c.image_filter)
            except AvatarForcingError as e:
                raise ClientError("bad_image", str(e)) from None
        return Response(png, media_type="image/png")

    @app.post("/speak")
    async def speak(request: Request):
        """Text -> 16 kHz WAV, synthesised with libespeak-ng (the corpus's synthesiser)."""
        body = parse_json((await read_body(request, 16 * 1024)).decode("utf-8", "replace"))
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ClientError("bad_text", "expected {\"text\": \"a sentence\"}")
        if len(text) > limits.max_text_chars:
            raise ClientError("bad_text", f"text of {len(text)} characters; at most {limits.max_text_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ClientError("bad_text", "the text is not valid Unicode (a lone surrogate)") from None
        async with speech_gate():
            try:
                wav = await workers.run(speak_wav, text, avatar.cfg.codec.sample_rate, limits.max_speech_seconds)
            except AvatarForcingError as e:
                raise ClientError("unavailable", f"speech synthesis unavailable: {e}") from None
        return Response(wav, media_type="audio/wav")

    @app.api_route("/sample.wav", methods=["GET", "HEAD"])
    async def sample():
        return FileResponse(Path(__file__).parent.parent / "assets" / "demo" / "utterance.wav", media_type="audio/wav")

    @app.api_route("/recordings/{token}.mp4", methods=["GET", "HEAD"])
    async def recording(token: str):
        headers = {"content-disposition": 'attachment; filename="avatarforcing.mp4"'}
        path = shared.recordings.get(token)
        if path is not None and path.is_file():  # streamed from disk, not read into memory
            return FileResponse(path, media_type="video/mp4", headers=headers)
        data = await shared.recordings.fetch(token)  # a replicated deployment: another replica's, from the hub
        if data is None:
            return JSONResponse({"error": "not_found", "message": "no such recording (they expire)"}, 404)
        return Response(data, media_type="video/mp4", headers=headers)

    add_offer_route(app, shared, read_body)  # WebRTC (rtc_route.py, webrtc.py)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.api_route("/rtc.js", methods=["GET", "HEAD"])
    async def rtc_js():
        return FileResponse(STATIC / "rtc.js", media_type="text/javascript")

    @app.websocket("/ws")
    async def stream(ws: WebSocket):
        if not origin_allowed(ws.headers, limits.allow_origins):
            log.info("refused a WebSocket from origin %s", show(ws.headers.get("origin"), 80))
            await ws.close(1008)  # before accept: the handshake is answered 403
            return
        await ws.accept()
        conn = Connection(ws, limits)
        who = ws.client.host if ws.client else "?"
        if admission.crowded(who):
            return await refuse(conn, "too many connections are waiting to start a stream; retry in a moment")
        if admission.full():
            return await refuse(conn)
        codec = avatar.cfg.codec
        with admission.waiting(who):  # no session slot yet, for at most start_timeout_s
            try:
                msg = await conn.receive(limits.start_timeout_s, "start_timeout",
                                         f"no 'start' message within {limits.start_timeout_s:.0f} s")
                req = parse_start(msg.get("text"), codec.sample_rate, codec.height)
            except WebSocketDisconnect:
                return
            except ClientError as e:
                metrics.add("errors_total")
                log.info("client error before start: %s %s", e.code, bounded(e, 120))
                return await conn.close_with_error(e.code, str(e))
        if admission.full():  # another connection may have taken the last slot meanwhile
            return await refuse(conn)
        with admission.session():
            metrics.add("sessions_total")
            live = (LiveStream if req.live else Stream)(conn, req, shared)
            shared.pool.streams.add(live)
            try:
                await live.run()
            except WebSocketDisconnect:
                pass  # the client left: the session and its buffers go with this frame
            except Exception as e:  # noqa: BLE001 - never take the server down for one stream
                await live.fail(e)
            finally:
                shared.pool.streams.discard(live)

    async def refuse(conn: Connection, why: str | None = None) -> None:
        metrics.add("sessions_rejected_total")
        await conn.close_with_error("busy", why or admission.refusal())

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, before buffering more."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError("too_large", f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def about(name: str) -> str:
    """What a model was trained on and what to expect from it, for the page."""
    if name == "mini":
        return ("mini: a 6M-parameter model trained for minutes on synthetic cartoon faces speaking espeak-ng "
                "speech (128x128). The built-in identities are what it knows; an uploaded real photo becomes a "
                "blurry, barely moving copy. Synthetic voices (typed text, the sample) move the mouth best; a "
                "real voice through a microphone (cleaned up by its listener) moves it with its loudness, less "
                "precisely.")
    return f"{name}: see the model's documentation for what it was trained on."



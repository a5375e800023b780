"""Real-time server: FastAPI + one WebSocket per stream. Protocol: docs/protocol.md.

Weights are loaded once (one ``Avatar``) and shared; every connection gets its own ``Session`` (its own
window, KV buffer, decoder state and noise), so no session can see another's frames. Compute runs in a
thread pool so the event loop keeps serving health checks, metrics and other clients.

A stream is two coroutines: a reader that always drains the socket into a queue (up to
``max_buffered_seconds`` of audio ahead of the model, so a client sending faster than real time is read
promptly and its keepalive pongs are not stuck behind its audio) and a processor that turns queued audio
into frames, at most ``push_seconds`` per push, and sends them, every send bounded in time. A session
holds its slot only while it does work: a connection has ``start_timeout_s`` to send a valid ``start``
before it takes a slot, and a session whose audio falls ``idle_timeout_s`` behind the wall clock, or that
runs past ``max_session_seconds``, is closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import secrets
import shutil
import struct
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from ..api import Avatar
from ..errors import AvatarForcingError
from ..identities import IDENTITIES, identity_image
from .admission import Admission

STATIC = Path(__file__).parent / "static"
FRAME_HEADER = struct.Struct("<Id")  # frame index (uint32), audio time of the frame in seconds (float64)
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
MAX_SEED = 2**63 - 1
log = logging.getLogger("avatarforcing.serve")


@dataclass
class Limits:
    max_sessions: int = 4
    max_pending: int = 16  # connections that have not sent a valid 'start' yet (they hold no session slot)
    max_pending_per_client: int = 8  # of those, from one client address
    start_timeout_s: float = 10.0  # a connection must send 'start' within this
    max_message_bytes: int = 1 << 20  # per WebSocket message (an image or an audio chunk)
    max_session_seconds: float = 3600.0  # wall-clock length of a session, and of audio per session
    idle_timeout_s: float = 30.0  # a session whose audio falls this far behind the wall clock is closed
    send_timeout_s: float = 10.0  # a client that stops reading for this long is closed (backpressure)
    max_buffered_seconds: float = 60.0  # audio read from the socket but not processed yet (then backpressure)
    push_seconds: float = 1.0  # at most this much audio per model push, so frames flow while a backlog drains
    max_image_pixels: int = 25_000_000  # checked from the image header, before decoding
    max_text_chars: int = 500  # /speak
    jpeg_quality: int = 85
    late_ms: float = 500.0  # a frame later than this beyond its look-ahead counts in frames_late_total
    allow_origins: tuple[str, ...] = ()  # besides same-host pages and clients sending no Origin; "*": any
    docs: bool = False  # /docs, /redoc, /openapi.json
    recordings: int = 8  # MP4 recordings kept for download (oldest deleted first)
    recording_ttl_s: float = 600.0


class Metrics:
    """Counters of one server process; ``render`` turns snapshots of one or several replicas into Prometheus
    text (totals, plus a ``replica``-labelled series per replica when there are several)."""

    HELP = {
        "sessions_active": ("gauge", "Streams open now."),
        "sessions_pending": ("gauge", "Connections that have not started a stream yet."),
        "sessions_total": ("counter", "Streams started."),
        "sessions_rejected_total": ("counter", "Connections refused: all session slots busy, or shutting down."),
        "frames_total": ("counter", "Video frames sent."),
        "frames_late_total": ("counter", "Frames sent more than late_ms after the audio they needed arrived "
                                         "(beyond the look-ahead)."),
        "queue_seconds": ("gauge", "Audio received and not yet processed, seconds, over all streams."),
        "steps_per_second": ("gauge", "Model pushes per second over the last 10 s."),
        "errors_total": ("counter", "Streams ended by an error (client mistakes and internal errors)."),
        "internal_errors_total": ("counter", "Streams ended by a server fault (logged with a traceback)."),
    }
    WINDOW_S = 10.0

    def __init__(self):
        self.values = dict.fromkeys(self.HELP, 0)
        self.step_counts = [0] * (len(BUCKETS) + 1)
        self.step_sum = 0.0
        self.step_n = 0
        self.recent: list[float] = []  # times of the steps of the last WINDOW_S seconds

    def add(self, name: str, n: float = 1) -> None:
        self.values[name] += n

    def observe_step(self, seconds: float) -> None:
        """One push that ran the model (pushes that only buffer audio are not steps)."""
        i = next((k for k, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
        self.step_counts[i] += 1
        self.step_sum += seconds
        self.step_n += 1
        self.recent.append(time.monotonic())

    def snapshot(self) -> dict:
        now = time.monotonic()
        self.recent = [t for t in self.recent if now - t <= self.WINDOW_S]
        self.values["steps_per_second"] = len(self.recent) / self.WINDOW_S
        return {"values": dict(self.values), "step_counts": list(self.step_counts), "step_sum": self.step_sum,
                "step_n": self.step_n}

    @classmethod
    def render(cls, snapshots: dict[str, dict]) -> str:
        lines = []
        for name, (kind, help_text) in cls.HELP.items():
            total = sum(snap["values"].get(name, 0) for snap in snapshots.values())
            lines += [f"# HELP avatarforcing_{name} {help_text}", f"# TYPE avatarforcing_{name} {kind}",
                      f"avatarforcing_{name} {total:g}"]
        if len(snapshots) > 1 or "" not in snapshots:
            for name, (kind, help_text) in cls.HELP.items():
                lines += [f"# HELP avatarforcing_replica_{name} {help_text} Per replica.",
                          f"# TYPE avatarforcing_replica_{name} {kind}"]
                lines += [f'avatarforcing_replica_{name}{{replica="{r}"}} {snap["values"].get(name, 0):g}'
                          for r, snap in sorted(snapshots.items())]
        lines += ["# HELP avatarforcing_step_latency_seconds Compute time of a push that ran the model "
                  "(model steps + decode).", "# TYPE avatarforcing_step_latency_seconds histogram"]
        counts = [sum(snap["step_counts"][i] for snap in snapshots.values()) for i in range(len(BUCKETS) + 1)]
        acc = 0
        for b, c in zip(BUCKETS, counts):
            acc += c
            lines.append(f'avatarforcing_step_latency_seconds_bucket{{le="{b}"}} {acc}')
        n = sum(snap["step_n"] for snap in snapshots.values())
        lines.append(f'avatarforcing_step_latency_seconds_bucket{{le="+Inf"}} {n}')
        lines.append(f"avatarforcing_step_latency_seconds_sum {sum(s['step_sum'] for s in snapshots.values())}")
        lines.append(f"avatarforcing_step_latency_seconds_count {n}")
        return "\n".join(lines) + "\n"


class ClientError(Exception):
    """A client's mistake or a limit: reported to that client with its code, never as 'internal'."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def show(value, limit: int = 40) -> str:
    """A client-supplied value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def bounded(message: str, limit: int = 300) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[:limit] + "..."


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _decode_pcm(data: bytes, fmt: str) -> np.ndarray:
    width = 2 if fmt == "s16le" else 4
    if len(data) % width:
        raise ClientError("bad_audio", f"audio message of {len(data)} bytes is not a whole number of {fmt} samples")
    if fmt == "s16le":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    pcm = np.frombuffer(data, "<f4").astype(np.float32)
    if not np.isfinite(pcm).all():
        raise ClientError("bad_audio", "f32le audio contains NaN or infinite samples")
    return pcm


def parse_json(text: str) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        raise ClientError("protocol", "JSON nested too deeply") from None
    except ValueError as e:
        raise ClientError("protocol", f"malformed JSON: {bounded(e, 100)}") from None


@dataclass
class StartRequest:
    image: bytes | np.ndarray
    seed: int
    fmt: str
    prompt: str | None
    record: bool


def parse_start(text: str | None, avatar: Avatar) -> StartRequest:
    """Validate the 'start' message; every problem is a ClientError naming the field."""
    if text is None:
        raise ClientError("protocol", "the first message must be a JSON 'start' message")
    start = parse_json(text)
    if not isinstance(start, dict) or start.get("type") != "start":
        raise ClientError("protocol", "expected {\"type\": \"start\", ...} first")
    want = avatar.cfg.codec.sample_rate
    rate = start.get("sample_rate", want)
    if type(rate) is not int or rate != want:
        raise ClientError("bad_audio", f"sample_rate {show(rate)}: this model takes {want} Hz mono PCM")
    fmt = start.get("format", "f32le")
    if fmt not in ("f32le", "s16le"):
        raise ClientError("bad_audio", f"format {show(fmt)}: expected 'f32le' or 's16le'")
    if "image" in start:
        if not isinstance(start["image"], str):
            raise ClientError("bad_image", "'image' must be a base64 string of a jpg/png/webp file")
        try:
            image = base64.b64decode(start["image"], validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("bad_image", "'image' must be base64 of a jpg/png/webp file") from None
    elif "identity" in start:
        name = start["identity"]
        if not isinstance(name, str) or name not in IDENTITIES:
            raise ClientError("bad_image", f"unknown identity {show(name)}; see /identities")
        image = identity_image(name, avatar.cfg.codec.height)
    else:
        raise ClientError("protocol", "the start message needs 'image' (base64) or 'identity'")
    seed = start.get("seed", 0)
    if type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise ClientError("protocol", f"'seed' must be an integer in [0, 2^63 - 1], got {show(seed)}")
    prompt = start.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 4000):
        raise ClientError("bad_prompt", "'prompt' must be a string of at most 4000 characters")
    record = start.get("record", False)
    if type(record) is not bool:
        raise ClientError("protocol", f"'record' must be true or false, got {show(record)}")
    return StartRequest(image, seed, fmt, prompt, record)


@dataclass(eq=False)
class Live:
    """One open stream, as the server sees it (for shutdown and metrics)."""

    ws: WebSocket
    tasks: list[asyncio.Task] = field(default_factory=list)
    closing: bool = False


class Recordings:
    """MP4s of recorded sessions, downloadable once ready; bounded in count and age."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.dir: Path | None = None
        self.ready: dict[str, tuple[Path, float]] = {}

    def new_path(self) -> tuple[str, Path]:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="avatarforcing-rec-"))
        token = secrets.token_urlsafe(16)
        return token, self.dir / f"{token}.mp4"

    def add(self, token: str, path: Path) -> None:
        self.ready[token] = (path, time.monotonic())
        self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        for token, (path, t) in sorted(self.ready.items(), key=lambda kv: kv[1][1]):
            if now - t > self.limits.recording_ttl_s or len(self.ready) > self.limits.recordings:
                self.ready.pop(token)
                path.unlink(missing_ok=True)

    def get(self, token: str) -> Path | None:
        self.sweep()
        item = self.ready.get(token)
        return item[0] if item else None

    async def fetch(self, token: str) -> bytes | None:
        """The MP4's bytes (a replicated deployment also looks in its shared store)."""
        path = self.get(token)
        return path.read_bytes() if path is not None and path.is_file() else None

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class Gate:
    """At most ``active`` jobs at once and ``waiting`` in line; the next is refused (503), so a flood of
    requests cannot queue unbounded CPU work behind the streams."""

    def __init__(self, active: int, waiting: int, what: str):
        self.sem, self.waiting, self.what, self.queued = asyncio.Semaphore(active), waiting, what, 0

    @asynccontextmanager
    async def __call__(self):
        if self.queued >= self.waiting:
            raise ClientError("unavailable", f"{self.what} is busy; retry in a moment")
        self.queued += 1
        try:
            async with self.sem:
                yield
        finally:
            self.queued -= 1


def origin_allowed(ws: WebSocket, limits: Limits) -> bool:
    """No Origin (not a browser), the page's own host, or an origin on the allow-list."""
    origin = ws.headers.get("origin")
    if origin is None or "*" in limits.allow_origins or origin in limits.allow_origins:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, before buffering more."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError("too_large", f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(avatar: Avatar, limits: Limits | None = None, replica: str | None = None,
               metrics_source=None, recordings: Recordings | None = None) -> FastAPI:
    """The server's app. ``replica``: a name sent in 'ready' (a replicated deployment); ``metrics_source``: an
    async callable returning {replica: Metrics snapshot} for /metrics (default: this process's own);
    ``recordings``: where recorded sessions are kept (default: this process's temporary folder)."""
    limits = limits or Limits()
    metrics = Metrics()
    admission = Admission(limits.max_sessions, limits.max_pending, limits.max_pending_per_client)
    state = {"queued": 0}  # samples read from the sockets and not processed yet, all streams
    live: set[Live] = set()
    recordings = recordings or Recordings(limits)
    speech_gate = Gate(1, 4, "speech synthesis")  # one libespeak-ng per process
    prepare_gate = Gate(2, 8, "portrait preparation")

    async def notify_shutdown() -> None:
        """Tell every open stream ('shutdown' frame) and close it; bounded, so a stuck client cannot delay it."""
        admission.shutting_down = True
        await asyncio.gather(*(_close_live(item, "shutdown", "server is shutting down", 1001) for item in list(live)))

    async def _close_live(item: Live, code: str, message: str, close_code: int) -> None:
        if item.closing:
            return
        item.closing = True
        await _close_with_error(item.ws, code, message, close_code)
        for t in item.tasks:
            t.cancel()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await notify_shutdown()
        recordings.close()

    docs = {} if limits.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="avatarforcing", lifespan=lifespan, **docs)
    app.state.metrics, app.state.limits, app.state.avatar = metrics, limits, avatar
    app.state.notify_shutdown = notify_shutdown

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        status = {"too_large": 413, "unavailable": 503}.get(e.code, 400)
        return JSONResponse({"error": e.code, "message": bounded(e)}, status_code=status)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return JSONResponse({"status": "shutting_down" if admission.shutting_down else "ok",
                             "sessions": admission.active, "max_sessions": limits.max_sessions})

    def snapshot() -> dict:
        """This process's metrics, with the gauges read from the live state."""
        metrics.values["sessions_active"], metrics.values["sessions_pending"] = admission.active, admission.pending
        metrics.values["queue_seconds"] = state["queued"] / avatar.cfg.codec.sample_rate
        return metrics.snapshot()

    app.state.snapshot = snapshot

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
                             "about": about(c.name),
                             "max_sessions": limits.max_sessions})

    @app.post("/prepare")
    async def prepare(request: Request):
        """An uploaded portrait -> PNG of the reference the model will use (after its crop and resize)."""
        data = await read_body(request, limits.max_message_bytes)
        loop = asyncio.get_running_loop()
        async with prepare_gate():
            try:
                ref = await loop.run_in_executor(None, lambda: avatar.prepare_reference(_checked_image(data, limits)))
            except AvatarForcingError as e:
                raise ClientError("bad_image", str(e)) from None
        from ..data.image import to_uint8

        return Response(_png(to_uint8(ref[0].float().cpu().numpy())), media_type="image/png")

    @app.post("/speak")
    async def speak(request: Request):
        """Text -> 16 kHz WAV, synthesised with libespeak-ng (the corpus's synthesiser)."""
        body = parse_json((await read_body(request, 16 * 1024)).decode("utf-8", "replace"))
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ClientError("bad_text", "expected {\"text\": \"a sentence\"}")
        if len(text) > limits.max_text_chars:
            raise ClientError("bad_text", f"text of {len(text)} characters; at most {limits.max_text_chars}")
        loop = asyncio.get_running_loop()
        async with speech_gate():
            try:
                wav = await loop.run_in_executor(None, lambda: _speak(text, avatar.cfg.codec.sample_rate))
            except AvatarForcingError as e:
                raise ClientError("unavailable", f"speech synthesis unavailable: {e}") from None
        return Response(wav, media_type="audio/wav")

    @app.api_route("/sample.wav", methods=["GET", "HEAD"])
    async def sample():
        return FileResponse(Path(__file__).parent.parent / "assets" / "demo" / "utterance.wav", media_type="audio/wav")

    @app.api_route("/recordings/{token}.mp4", methods=["GET", "HEAD"])
    async def recording(token: str):
        data = await recordings.fetch(token)
        if data is None:
            return JSONResponse({"error": "not_found", "message": "no such recording (they expire)"}, 404)
        return Response(data, media_type="video/mp4",
                        headers={"content-disposition": 'attachment; filename="avatarforcing.mp4"'})

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.websocket("/ws")
    async def stream(ws: WebSocket):
        if not origin_allowed(ws, limits):
            log.info("refused a WebSocket from origin %s", show(ws.headers.get("origin"), 80))
            await ws.close(1008)  # before accept: the handshake is answered 403
            return
        await ws.accept()
        who = ws.client.host if ws.client else "?"
        if admission.crowded(who):
            await _refuse(ws, "too many connections are waiting to start a stream; retry in a moment")
            return
        if admission.full():
            await _refuse(ws)
            return
        with admission.waiting(who):
            try:
                msg = await _receive(ws, limits.start_timeout_s, "start_timeout",
                                     f"no 'start' message within {limits.start_timeout_s:.0f} s")
                req = parse_start(msg.get("text"), avatar)
            except WebSocketDisconnect:
                return
            except ClientError as e:
                metrics.add("errors_total")
                log.info("client error before start: %s %s", e.code, bounded(e, 120))
                await _close_with_error(ws, e.code, str(e))
                return
        if admission.full():
            await _refuse(ws)
            return
        with admission.session():
            metrics.add("sessions_total")
            item = Live(ws)
            live.add(item)
            try:
                await _serve(ws, req, item)
            except WebSocketDisconnect:
                pass  # the client left: the session and its buffers go with this frame
            except Exception as e:  # noqa: BLE001 - never take the server down for one stream
                await _report(item, e)
            finally:
                live.discard(item)

    async def _report(item: Live, e: Exception) -> None:
        if item.closing:
            return  # the server closed this stream (shutdown): what failed after that is not an error
        metrics.add("errors_total")
        if isinstance(e, ClientError):
            log.info("client error: %s %s", e.code, bounded(e, 120))
            await _close_live(item, e.code, str(e), 1008)
        else:  # the client gets a reference, not internals; the log gets the traceback
            metrics.add("internal_errors_total")
            ref = secrets.token_hex(4)
            log.error("internal error in a stream (ref %s)", ref, exc_info=e)
            await _close_live(item, "internal", f"internal server error (ref {ref}, logged)", 1011)

    async def _refuse(ws: WebSocket, why: str | None = None) -> None:
        metrics.add("sessions_rejected_total")
        why = why or admission.refusal()
        await _close_with_error(ws, "busy", why, 1013)

    async def _close_with_error(ws: WebSocket, code: str, message: str, close_code: int | None = None) -> None:
        """Send the error frame and close, each bounded: a client that does not read cannot hold this up."""
        close_code = close_code or (1011 if code == "internal" else 1008)
        try:
            await asyncio.wait_for(ws.send_text(json.dumps({"type": "error", "code": code,
                                                            "message": bounded(message)})), timeout=1.0)
        except Exception:  # noqa: BLE001 - gone or not reading: closing is all that is left
            pass
        try:
            await asyncio.wait_for(ws.close(close_code), timeout=1.0)
        except Exception:  # noqa: BLE001
            pass

    async def _receive(ws: WebSocket, timeout: float, code: str, why: str) -> dict:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=max(timeout, 0.0))
        except TimeoutError:
            raise ClientError(code, why) from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        size = len(msg.get("bytes") or b"") + len(msg.get("text") or "")
        if size > limits.max_message_bytes:
            raise ClientError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
        return msg

    async def _serve(ws: WebSocket, req: StartRequest, item: Live) -> None:
        loop = asyncio.get_running_loop()
        if req.prompt is not None:
            try:
                await loop.run_in_executor(None, lambda: avatar.context(req.prompt))
            except AvatarForcingError as e:
                raise ClientError("bad_prompt", str(e)) from None
        try:
            image = req.image if isinstance(req.image, np.ndarray) else _checked_image(req.image, limits)
            session = await loop.run_in_executor(None, lambda: avatar.session(image, seed=req.seed,
                                                                               prompt=req.prompt))
        except AvatarForcingError as e:
            raise ClientError("bad_image", str(e)) from None
        c = avatar.cfg.codec
        writer, token = None, None
        if req.record:
            from ..data.video import VideoWriter

            token, path = recordings.new_path()
            writer = VideoWriter(path, fps=c.fps, sample_rate=c.sample_rate)

        async def send(text: str | None = None, data: bytes | None = None) -> None:
            try:
                coro = ws.send_text(text) if text is not None else ws.send_bytes(data)
                await asyncio.wait_for(coro, timeout=limits.send_timeout_s)
            except TimeoutError:
                raise ClientError("slow_consumer", "client stopped reading frames") from None

        ready = {"type": "ready", "width": c.width, "height": c.height, "fps": c.fps,
                 "lookahead_ms": session.lookahead_ms, "frame_header": "<Id"}
        if replica is not None:
            ready["replica"] = replica
        await send(json.dumps(ready))
        t_start = time.monotonic()
        rate = c.sample_rate
        queue: asyncio.Queue = asyncio.Queue()
        room = asyncio.Event()
        room.set()
        counts = {"received": 0, "buffered": 0, "sent": 0}
        arrived: list[float] = []  # wall time at which audio up to each frame arrived

        async def reader() -> None:
            """Drain the socket into the queue: keepalive pings keep being answered whatever the client sends."""
            while True:
                wall = time.monotonic() - t_start
                idle_in = t_start + counts["received"] / rate + limits.idle_timeout_s - time.monotonic()
                limit_in = limits.max_session_seconds - wall
                code, why = ("idle_timeout", f"no audio for {limits.idle_timeout_s:.0f} s (the stream's audio fell "
                                             f"that far behind real time)") if idle_in < limit_in else \
                    ("limit", f"session reached {limits.max_session_seconds:.0f} s")
                msg = await _receive(ws, min(idle_in, limit_in), code, why)
                if msg.get("bytes") is not None:
                    pcm = _decode_pcm(msg["bytes"], req.fmt)
                    if not len(pcm):
                        continue  # no work, no credit: an empty message does not keep a session alive
                    counts["received"] += len(pcm)
                    if counts["received"] > limits.max_session_seconds * rate:
                        raise ClientError("limit", f"session exceeded {limits.max_session_seconds:.0f} s of audio")
                    now = time.monotonic()
                    arrived.extend([now] * (counts["received"] // c.samples_per_frame - len(arrived)))
                    counts["buffered"] += len(pcm)
                    state["queued"] += len(pcm)
                    queue.put_nowait(pcm)
                    if counts["buffered"] > limits.max_buffered_seconds * rate:
                        room.clear()
                        await room.wait()  # backpressure: the processor catches up (faster than real time)
                    continue
                ctrl = parse_json(msg["text"])
                if not isinstance(ctrl, dict) or ctrl.get("type") != "end":
                    raise ClientError("protocol", f"unexpected message {show(ctrl)}; expected audio or 'end'")
                queue.put_nowait(None)
                return

        async def emit(batches: list[np.ndarray]) -> None:
            for frames in batches:
                if writer is not None:
                    writer.write(frames)
                for f in frames:
                    n = counts["sent"]
                    await send(data=FRAME_HEADER.pack(n, n / c.fps) + _encode_jpeg(f, limits.jpeg_quality))
                    counts["sent"] = n + 1
                    metrics.add("frames_total")
                    need = n + int(session.lookahead_ms * c.fps / 1000)
                    lat = 1000 * (time.monotonic() - arrived[need]) if need < len(arrived) else None
                    if lat is not None and lat > limits.late_ms:
                        metrics.add("frames_late_total")
                    if (n + 1) % c.fps == 0:
                        await send(json.dumps({"type": "stats", "frames": n + 1, "latency_ms": lat,
                                               "fps": (n + 1) / (time.monotonic() - t_start),
                                               "lookahead_ms": session.lookahead_ms,
                                               "sessions": admission.active}))

        read_task = asyncio.ensure_future(reader())
        item.tasks.append(read_task)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, read_task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if read_task.cancelled():
                        return  # the server closed this stream (shutdown)
                    read_task.result()  # the reader failed: raise its error
                    continue
                items = [getter.result()]
                while not queue.empty() and items[-1] is not None and \
                        sum(len(x) for x in items) < limits.push_seconds * rate:
                    items.append(queue.get_nowait())
                final = items[-1] is None
                pcm = np.concatenate([x for x in items if x is not None] or [np.zeros(0, np.float32)])
                counts["buffered"] -= len(pcm)
                state["queued"] -= len(pcm)
                if counts["buffered"] <= limits.max_buffered_seconds * rate:
                    room.set()
                if writer is not None:
                    writer.add_audio(pcm)
                steps = session.stats.steps
                t0 = time.perf_counter()
                out = await loop.run_in_executor(None, session.push, pcm)
                if final:
                    out += await loop.run_in_executor(None, session.close)
                if session.stats.steps > steps:
                    metrics.observe_step(time.perf_counter() - t0)
                await emit(out)
                if final:
                    done_msg = {"type": "done", "frames": counts["sent"]}
                    if writer is not None:
                        writer.close()
                        writer = None
                        recordings.add(token, path)
                        done_msg["recording"] = f"/recordings/{token}.mp4"
                    await send(json.dumps(done_msg))
                    await asyncio.wait_for(ws.close(1000), timeout=1.0)
                    return
        finally:
            read_task.cancel()
            state["queued"] -= counts["buffered"]  # what this stream left unprocessed
            if writer is not None:  # an unfinished recording is not kept
                try:
                    writer.close()
                finally:
                    path.unlink(missing_ok=True)

    return app


def _checked_image(data: bytes, limits: Limits):
    from ..data.image import load_image

    return load_image(data, max_pixels=limits.max_image_pixels)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _speak(text: str, rate: int) -> bytes:
    import soundfile as sf

    from ..data.audio import resample
    from ..data.speech import synthesize

    sp = synthesize(text)
    buf = io.BytesIO()
    sf.write(buf, resample(sp.samples, sp.rate, rate), rate, format="WAV", subtype="PCM_16")
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


def serve(model: str = "mini", host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 4,
          device: str = "cpu", dtype: str | None = None, prompt: str | None = None, prompt_embeds=None,
          allow_origins: tuple[str, ...] = (), docs: bool = False, engine: str | None = None) -> None:
    from .http import run

    avatar = Avatar.load(model, device, dtype=dtype, engine=engine)
    avatar.prompts.set_default(prompt, prompt_embeds)  # what sessions get when their start message has no prompt
    limits = Limits(max_sessions=max_sessions, allow_origins=tuple(allow_origins), docs=docs)
    run(create_app(avatar, limits), host, port, limits)

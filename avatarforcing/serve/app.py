"""Real-time server: FastAPI + one WebSocket per stream. Protocol: docs/protocol.md.

Weights are loaded once (one ``Avatar``) and shared; every connection gets its own ``Session`` (its own
window, KV buffer, decoder state and noise), so no session can see another's frames. Compute runs in a
thread pool so the event loop keeps serving health checks, metrics and other clients.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from ..api import Avatar
from ..errors import AvatarForcingError
from ..identities import IDENTITIES, identity_image

STATIC = Path(__file__).parent / "static"
FRAME_HEADER = struct.Struct("<Id")  # frame index (uint32), audio time of the frame in seconds (float64)
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


@dataclass
class Limits:
    max_sessions: int = 4
    max_message_bytes: int = 1 << 20  # per WebSocket message (an image or an audio chunk)
    max_session_seconds: float = 3600.0  # of audio per session
    idle_timeout_s: float = 30.0  # no message from the client for this long closes the session
    send_timeout_s: float = 10.0  # a client that stops reading for this long is closed (backpressure)
    jpeg_quality: int = 85


class Metrics:
    def __init__(self):
        self.sessions = 0
        self.sessions_total = 0
        self.rejected_total = 0
        self.frames_total = 0
        self.errors_total = 0
        self.step_counts = [0] * (len(BUCKETS) + 1)
        self.step_sum = 0.0
        self.step_n = 0

    def observe_step(self, seconds: float) -> None:
        i = next((k for k, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
        self.step_counts[i] += 1
        self.step_sum += seconds
        self.step_n += 1

    def text(self) -> str:
        lines = [
            "# HELP avatarforcing_sessions_active Streams open now.", "# TYPE avatarforcing_sessions_active gauge",
            f"avatarforcing_sessions_active {self.sessions}",
            "# TYPE avatarforcing_sessions_total counter", f"avatarforcing_sessions_total {self.sessions_total}",
            "# TYPE avatarforcing_sessions_rejected_total counter",
            f"avatarforcing_sessions_rejected_total {self.rejected_total}",
            "# TYPE avatarforcing_frames_total counter", f"avatarforcing_frames_total {self.frames_total}",
            "# TYPE avatarforcing_errors_total counter", f"avatarforcing_errors_total {self.errors_total}",
            "# HELP avatarforcing_step_latency_seconds Compute time of one push (model steps + decode).",
            "# TYPE avatarforcing_step_latency_seconds histogram",
        ]
        acc = 0
        for b, c in zip(BUCKETS, self.step_counts):
            acc += c
            lines.append(f'avatarforcing_step_latency_seconds_bucket{{le="{b}"}} {acc}')
        lines.append(f'avatarforcing_step_latency_seconds_bucket{{le="+Inf"}} {self.step_n}')
        lines.append(f"avatarforcing_step_latency_seconds_sum {self.step_sum}")
        lines.append(f"avatarforcing_step_latency_seconds_count {self.step_n}")
        return "\n".join(lines) + "\n"


class ClientError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


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


def create_app(avatar: Avatar, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    metrics = Metrics()
    state = {"shutting_down": False, "active": set()}
    slots = asyncio.Semaphore(limits.max_sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state["shutting_down"] = True  # graceful shutdown: tell every open stream, then close it
        for ws in list(state["active"]):
            try:
                await ws.send_text(json.dumps({"type": "error", "code": "shutdown",
                                               "message": "server is shutting down"}))
                await ws.close(1001)
            except Exception:  # noqa: BLE001 - already gone
                pass

    app = FastAPI(title="avatarforcing", lifespan=lifespan)
    app.state.metrics, app.state.limits, app.state.avatar = metrics, limits, avatar

    @app.get("/healthz")
    async def healthz():
        return JSONResponse({"status": "shutting_down" if state["shutting_down"] else "ok",
                             "sessions": metrics.sessions, "max_sessions": limits.max_sessions})

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/identities")
    async def identities():
        return JSONResponse(sorted(IDENTITIES))

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.websocket("/ws")
    async def stream(ws: WebSocket):
        await ws.accept()
        if state["shutting_down"] or slots.locked():
            metrics.rejected_total += 1
            await ws.send_text(json.dumps({"type": "error", "code": "busy",
                                           "message": f"all {limits.max_sessions} sessions are in use; retry later"}))
            await ws.close(1013)
            return
        async with slots:
            metrics.sessions += 1
            metrics.sessions_total += 1
            state["active"].add(ws)
            try:
                await _serve(ws)
            except WebSocketDisconnect:
                pass  # the client left: the session and its buffers go with this frame
            except ClientError as e:
                metrics.errors_total += 1
                await _close_with_error(ws, e.code, str(e))
            except Exception as e:  # noqa: BLE001 - never take the server down for one stream
                metrics.errors_total += 1
                await _close_with_error(ws, "internal", f"{type(e).__name__}: {e}")
            finally:
                state["active"].discard(ws)
                metrics.sessions -= 1

    async def _close_with_error(ws: WebSocket, code: str, message: str) -> None:
        try:
            await ws.send_text(json.dumps({"type": "error", "code": code, "message": message}))
            await ws.close(1008 if code != "internal" else 1011)
        except Exception:  # noqa: BLE001
            pass

    async def _receive(ws: WebSocket) -> dict:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=limits.idle_timeout_s)
        except TimeoutError:
            raise ClientError("idle_timeout", f"no message for {limits.idle_timeout_s:.0f} s") from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        size = len(msg.get("bytes") or b"") + len((msg.get("text") or "").encode())
        if size > limits.max_message_bytes:
            raise ClientError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
        return msg

    async def _serve(ws: WebSocket) -> None:
        loop = asyncio.get_running_loop()
        first = await _receive(ws)
        if first.get("text") is None:
            raise ClientError("protocol", "the first message must be a JSON 'start' message")
        try:
            start = json.loads(first["text"])
        except json.JSONDecodeError as e:
            raise ClientError("protocol", f"malformed JSON: {e}") from None
        if not isinstance(start, dict) or start.get("type") != "start":
            raise ClientError("protocol", "expected {\"type\": \"start\", ...} first")
        rate = start.get("sample_rate", 16000)
        want = avatar.cfg.codec.sample_rate
        if rate != want:
            raise ClientError("bad_audio", f"sample_rate {rate}: this model takes {want} Hz mono PCM")
        fmt = start.get("format", "f32le")
        if fmt not in ("f32le", "s16le"):
            raise ClientError("bad_audio", f"format {fmt!r}: expected 'f32le' or 's16le'")
        if "image" in start:
            try:
                image = base64.b64decode(start["image"], validate=True)
            except Exception:  # noqa: BLE001
                raise ClientError("bad_image", "'image' must be base64 of a jpg/png/webp file") from None
        elif "identity" in start:
            if start["identity"] not in IDENTITIES:
                raise ClientError("bad_image", f"unknown identity {start['identity']!r}; see /identities")
            image = identity_image(start["identity"], avatar.cfg.codec.height)
        else:
            raise ClientError("protocol", "the start message needs 'image' (base64) or 'identity'")
        seed = start.get("seed", 0)
        if not isinstance(seed, int):
            raise ClientError("protocol", "'seed' must be an integer")
        prompt = start.get("prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or len(prompt) > 4000:
                raise ClientError("bad_prompt", "'prompt' must be a string of at most 4000 characters")
            try:
                await loop.run_in_executor(None, lambda: avatar.context(prompt))
            except AvatarForcingError as e:
                raise ClientError("bad_prompt", str(e)) from None
        try:
            session = await loop.run_in_executor(None, lambda: avatar.session(image, seed=seed, prompt=prompt))
        except AvatarForcingError as e:
            raise ClientError("bad_image", str(e)) from None
        c = avatar.cfg.codec
        await ws.send_text(json.dumps({"type": "ready", "width": c.width, "height": c.height, "fps": c.fps,
                                       "lookahead_ms": session.lookahead_ms, "frame_header": "<Id"}))
        sent, received, t_start = 0, 0, time.perf_counter()
        send_times: list[float] = []  # wall time at which audio up to each frame (incl. look-ahead) arrived

        async def emit(batches: list[np.ndarray]) -> None:
            nonlocal sent
            for frames in batches:
                for f in frames:
                    payload = FRAME_HEADER.pack(sent, sent / c.fps) + _encode_jpeg(f, limits.jpeg_quality)
                    try:
                        await asyncio.wait_for(ws.send_bytes(payload), timeout=limits.send_timeout_s)
                    except TimeoutError:
                        raise ClientError("slow_consumer", "client stopped reading frames") from None
                    sent += 1
                    metrics.frames_total += 1
                    if sent % c.fps == 0:
                        lat = None
                        need = sent - 1 + int(session.lookahead_ms * c.fps / 1000)
                        if need < len(send_times):
                            lat = 1000 * (time.perf_counter() - send_times[need])
                        await ws.send_text(json.dumps({"type": "stats", "frames": sent,
                                                       "fps": sent / (time.perf_counter() - t_start),
                                                       "latency_ms": lat}))

        while True:
            msg = await _receive(ws)
            if msg.get("bytes") is not None:
                pcm = _decode_pcm(msg["bytes"], fmt)
                received += len(pcm)
                if received > limits.max_session_seconds * want:
                    raise ClientError("limit", f"session exceeded {limits.max_session_seconds:.0f} s of audio")
                now = time.perf_counter()
                while len(send_times) < received // c.samples_per_frame:
                    send_times.append(now)
                t0 = time.perf_counter()
                out = await loop.run_in_executor(None, session.push, pcm)
                metrics.observe_step(time.perf_counter() - t0)
                await emit(out)
            else:
                try:
                    ctrl = json.loads(msg["text"])
                except json.JSONDecodeError as e:
                    raise ClientError("protocol", f"malformed JSON: {e}") from None
                if not isinstance(ctrl, dict) or ctrl.get("type") != "end":
                    raise ClientError("protocol", f"unexpected message {str(ctrl)[:80]!r}; expected audio or 'end'")
                out = await loop.run_in_executor(None, session.close)
                await emit(out)
                await ws.send_text(json.dumps({"type": "done", "frames": sent}))
                await ws.close(1000)
                return

    return app


def serve(model: str = "mini", host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 4,
          device: str = "cpu", dtype: str | None = None, prompt: str | None = None, prompt_embeds=None) -> None:
    import uvicorn

    avatar = Avatar.load(model, device, dtype=dtype)
    avatar.prompts.set_default(prompt, prompt_embeds)  # what sessions get when their start message has no prompt
    uvicorn.run(create_app(avatar, Limits(max_sessions=max_sessions)), host=host, port=port,
                timeout_graceful_shutdown=10)

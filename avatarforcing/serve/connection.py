"""``Connection``: a WebSocket with the server's bounds on every receive, send and close; ``Shared``: what
every stream of one serving process shares (the model and its scheduler, limits, metrics, admission, open streams,
recordings).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed

from .admission import Admission, Pool
from .engine import Scheduler
from .metrics import Metrics
from .protocol import ClientError, close_code, error_message
from .recordings import Recordings
from .spec import Limits


@dataclass
class Shared:
    """What every stream of one serving process shares."""

    avatar: object  # api.Avatar
    limits: Limits
    metrics: Metrics = field(default_factory=Metrics)
    pool: Pool = field(default_factory=Pool)
    recordings: Recordings | None = None
    replica: str | None = None  # a replicated deployment's name for this process, sent in 'ready'

    def __post_init__(self):
        self.admission = Admission(self.limits.max_sessions, self.limits.max_pending,
                                   self.limits.max_pending_per_client)
        self.recordings = self.recordings or Recordings(self.limits)
        self.scheduler = Scheduler(self.avatar, self.limits, self.metrics)  # the model's compute, batched


class Connection:
    """A WebSocket with the server's bounds on every receive, send and close."""

    def __init__(self, ws: WebSocket, limits: Limits):
        self.ws, self.limits = ws, limits

    async def receive(self, timeout: float, code: str, why: str) -> dict:
        try:
            msg = await asyncio.wait_for(self.ws.receive(), timeout=max(timeout, 0.0))
        except TimeoutError:
            raise ClientError(code, why) from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        size = len(msg.get("bytes") or b"") + len(msg.get("text") or "")
        if size > self.limits.max_message_bytes:
            raise ClientError("too_large", f"message of {size} bytes exceeds the limit of "
                                           f"{self.limits.max_message_bytes}")
        return msg

    async def send(self, text: str | None = None, data: bytes | None = None) -> None:
        try:
            coro = self.ws.send_text(text) if text is not None else self.ws.send_bytes(data)
            await asyncio.wait_for(coro, timeout=self.limits.send_timeout_s)
        except TimeoutError:
            raise ClientError("slow_consumer", "client stopped reading frames") from None
        except (OSError, RuntimeError, ConnectionClosed) as e:
            # the client went away (reset, closed, or the server side already closed): a disconnect, not a
            # server fault; anything else propagates
            if isinstance(e, RuntimeError) and "close" not in str(e) and "disconnect" not in str(e).lower():
                raise
            raise WebSocketDisconnect(1006) from None

    async def close_with_error(self, code: str, message: str) -> None:
        """Send the error frame and close, each bounded: a client that does not read cannot hold this up."""
        try:
            await asyncio.wait_for(self.ws.send_text(error_message(code, message)), timeout=1.0)
        except Exception:  # noqa: BLE001 - gone or not reading: closing is all that is left
            pass
        try:
            await asyncio.wait_for(self.ws.close(close_code(code)), timeout=1.0)
        except Exception:  # noqa: BLE001
            pass

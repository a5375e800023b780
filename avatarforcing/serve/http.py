"""The HTTP side of ``avatarforcing serve``: uvicorn with limits a public server needs.

* h11 with a 16 KiB cap on a request's head (no 64 MiB headers), and a deadline for it: a connection that
  has not sent a complete request head ``header_timeout_s`` after connecting (or after its last response)
  is closed — a slow-loris client cannot hold a connection open;
* at most ``limit_concurrency`` connections that have sent a request (503 beyond; silent sockets do not count);
* WebSocket messages capped near the stream's message limit at the protocol level (nothing larger is
  buffered), no per-message compression (no inflation bombs); pings every 20 s keep proxies from dropping
  the connection, but a late pong does not close a stream: behind a client's buffered audio a pong can be
  late on a healthy connection, and dead or idle clients are closed by the stream's own idle and send
  timeouts (stream.py);
* on SIGTERM / SIGINT open streams get the documented ``shutdown`` frame before uvicorn closes sockets.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .spec import Limits, ServingSpec

HEAD_LIMIT = 16 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head (slowloris)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:  # noqa: D102
        super().connection_made(transport)
        # a connection counts towards limit_concurrency once it sends something: sockets that connect and stay
        # silent (half-open, until the head deadline closes them) cannot make every route answer 503
        self.connections.discard(self)
        self._counted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if not self._counted:
            self._counted = True
            self.connections.add(self)
        super().data_received(data)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
        if waiting and self.transport.get_protocol() is self and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:  # noqa: D102
        super().handle_events()
        upgraded = self.transport.get_protocol() is not self  # a WebSocket took over the connection
        if upgraded or (self.cycle is not None and not self.cycle.response_complete):
            self._disarm()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:  # noqa: D102
        self._disarm()
        super().connection_lost(exc)


class HeaderLimit:
    """ASGI wrapper: headers totalling more than ``limit`` bytes get 431. (h11 refuses a head that arrives in
    pieces once it passes the limit; this catches one that arrives whole in a single read.)"""

    def __init__(self, app, limit: int = HEAD_LIMIT):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and \
                sum(len(k) + len(v) for k, v in scope.get("headers", ())) > self.limit:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 431,
                        "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b"request header fields too large\n"})
            return
        await self.app(scope, receive, send)


class Server(uvicorn.Server):
    """Sends every open stream its ``shutdown`` frame before uvicorn's own shutdown closes the sockets."""

    def __init__(self, config: uvicorn.Config, notify_shutdown):
        super().__init__(config)
        self.notify_shutdown = notify_shutdown

    async def shutdown(self, sockets=None) -> None:  # noqa: D102
        try:
            await asyncio.wait_for(self.notify_shutdown(), timeout=5.0)
        except Exception:  # noqa: BLE001 - shutting down regardless
            pass
        await super().shutdown(sockets)


def connection_limit(limits: Limits) -> int:
    """Connections that have sent a request, at most (503 beyond): every slot, every pending start, and room."""
    return limits.max_sessions + limits.max_pending + 64


def free_port() -> int:
    """A free TCP port on loopback (an internal listener, a test or benchmark server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(app, host: str, port: int, limits: Limits, header_timeout_s: float = 10.0,
           ping_interval_s: float = 20.0, ping_timeout_s: float | None = None,
           log_level: str = "info") -> uvicorn.Config:
    protocol = type("Guarded", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(
        HeaderLimit(app), host=host, port=port, log_level=log_level, http=protocol, ws="websockets",
        h11_max_incomplete_event_size=HEAD_LIMIT, timeout_keep_alive=5, timeout_graceful_shutdown=10,
        limit_concurrency=connection_limit(limits),
        ws_max_size=limits.max_message_bytes + 64 * 1024, ws_per_message_deflate=False,
        ws_ping_interval=ping_interval_s, ws_ping_timeout=ping_timeout_s, server_header=False)


def server(app, host: str, port: int, limits: Limits, **kw) -> Server:
    """``app`` from ``create_app``; ``kw``: ``config``'s timeouts."""
    return Server(config(app, host, port, limits, **kw), app.state.notify_shutdown)


def log_to_stderr() -> None:
    """uvicorn configures its own loggers only: the server's (client errors at INFO) go to stderr here."""
    log = logging.getLogger("avatarforcing")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def run(app, host: str, port: int, limits: Limits) -> None:
    log_to_stderr()
    server(app, host, port, limits).run()


def serve(spec: ServingSpec) -> None:
    """``avatarforcing serve``: the model loaded once, the app, uvicorn; until SIGINT / SIGTERM."""
    run(create_app(spec.load_avatar(), spec.limits), spec.host, spec.port, spec.limits)

"""Who may hold a connection and a session slot: the server's admission state in one object.

A WebSocket passes two gates. While it has not sent a valid ``start`` it is *pending*: at most
``max_pending`` such connections in all and ``max_pending_per_client`` from one address, so idle sockets
cannot crowd out real streams; a pending connection holds no session slot. Then it is *active*: at most
``max_sessions`` at once, checked before the connection may wait and again when its ``start`` arrives
(another connection may have taken the last slot meanwhile). After shutdown begins nobody is admitted.

Besides: ``Pool``, the open streams (for shutdown and the queue gauge); ``Gate``, a bounded line for the
HTTP jobs that run the CPU (``/speak``, ``/prepare``); ``origin_allowed``, the WebSocket Origin rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit

from .protocol import ClientError


class Admission:
    def __init__(self, max_sessions: int, max_pending: int, max_pending_per_client: int):
        self.max_sessions, self.max_pending, self.max_pending_per_client = max_sessions, max_pending, \
            max_pending_per_client
        self.active = 0  # sessions streaming
        self.pending = 0  # connections that have not sent 'start' yet
        self.pending_by_client: dict[str, int] = {}  # of those, per client address (no entry at 0)
        self.shutting_down = False

    def crowded(self, who: str) -> bool:
        """Too many connections wait to start, in all or from ``who``: this one may not wait."""
        return self.pending_by_client.get(who, 0) >= self.max_pending_per_client or self.pending >= self.max_pending

    def full(self) -> bool:
        """No session slot is free (or the server is shutting down)."""
        return self.shutting_down or self.active >= self.max_sessions

    def refusal(self) -> str:
        """Why a connection is refused when ``full()``."""
        if self.shutting_down:
            return "server is shutting down"
        return f"all {self.max_sessions} sessions are in use; retry later"

    @contextmanager
    def waiting(self, who: str) -> Iterator[None]:
        """Count ``who``'s connection as pending while it waits for its 'start'."""
        self.pending += 1
        self.pending_by_client[who] = self.pending_by_client.get(who, 0) + 1
        try:
            yield
        finally:
            self.pending -= 1
            self.pending_by_client[who] -= 1
            if not self.pending_by_client[who]:
                del self.pending_by_client[who]

    @contextmanager
    def session(self) -> Iterator[None]:
        """Hold one session slot (the caller checked ``full()`` first, with no await in between)."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class Pool:
    """The open streams of one serving process, and the audio they have read but not processed yet."""

    def __init__(self):
        self.streams: set = set()  # objects with ``async close(code, message)``
        self.queued = 0  # samples read from the sockets and not processed yet, all streams

    async def close_all(self, code: str, message: str) -> None:
        await asyncio.gather(*(s.close(code, message) for s in list(self.streams)))


class Gate:
    """At most ``waiting`` jobs admitted (running or in line), ``active`` of them running at once; the next is
    refused (503), so a flood of requests cannot queue unbounded CPU work behind the streams."""

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


def origin_allowed(headers: Mapping[str, str], allow_origins: tuple[str, ...]) -> bool:
    """No Origin (not a browser), the page's own host, or an origin on the allow-list ('*': any)."""
    origin = headers.get("origin")
    if origin is None or "*" in allow_origins or origin in allow_origins:
        return True
    return urlsplit(origin).netloc == headers.get("host")


def host_name(host: str) -> str:
    """The name part of a Host header value: ``example.org:8000`` -> ``example.org``, ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostAllowList:
    """ASGI wrapper: requests and WebSockets whose Host header names a host outside ``hosts`` are refused (400;
    a WebSocket is closed 1008 before it is accepted). A page served from a rebinding DNS name carries that
    name in Host, so same-origin checks cannot be fooled by it."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, set(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers", ())).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.hosts:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body",
                            "body": b'{"error": "bad_host", "message": "this server does not serve that host name"}'})
                return
        await self.app(scope, receive, send)

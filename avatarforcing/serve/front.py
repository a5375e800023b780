"""The front door of ``serve --ray``: the single-process server's HTTP hardening in front of Ray Serve's proxy.

    clients --http / ws--> front door: uvicorn with serve/http.py's settings (16 KiB request heads and their
                           deadline, silent sockets not counted against the connection limit, no per-message
                           deflate, messages capped at the protocol level, the ``shutdown`` frame)
            --relay over loopback--> Ray Serve's proxy (127.0.0.1, its own port) --> a replica (ray.py)

Ray's proxy terminates the connections and cannot be configured from a replica: it takes any request head,
keeps a slow one open, negotiates per-message deflate and buffers a whole message before the replica can
refuse it. So under ``--ray`` it listens on loopback only, and clients reach this front door instead.

The relay tells the replica who the client is and which host it asked for (``X-Forwarded-For`` and
``X-Forwarded-Host``, always overwritten), and a replica's ``FromFront`` puts them back into the request, so the
Host allow-list, the Origin rule and the per-client limits see the client, not the relay. "Who the client is" is
the peer the front door's uvicorn saw, or, as the single server does, the ``X-Forwarded-For`` of a reverse proxy
on this machine (uvicorn trusts ``127.0.0.1``); a remote client cannot choose it. Only replicas trust the
headers, and only the front door (on the same machine) can reach Ray's proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace

from .spec import ServingSpec

log = logging.getLogger("avatarforcing.serve")

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
              b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
FORWARDED_FOR, FORWARDED_HOST = b"x-forwarded-for", b"x-forwarded-host"
SET_BY_THE_RELAY = {b"host", FORWARDED_FOR, FORWARDED_HOST, b"content-length"}
SET_BY_THE_SERVER = {b"date", b"server"}  # the front door's uvicorn writes its own
RELAY_QUEUE = 16  # messages the relay holds from the replica while the client is slow to read (then backpressure)


def upstream_headers(scope) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers (a WebSocket handshake's own are the relay's to make), plus who the client
    is and which host it asked for (overwritten)."""
    headers = [(k, v) for k, v in scope.get("headers", ())
               if k not in HOP_BY_HOP and k not in SET_BY_THE_RELAY and not k.startswith(b"sec-websocket-")]
    host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
    client = (scope.get("client") or ("",))[0]
    return headers + [(FORWARDED_FOR, client.encode("latin-1")), (FORWARDED_HOST, host)]


class FromFront:
    """ASGI wrapper of a replica's app: the client address and Host header the front door forwarded replace the
    relay's own (the app then sees the client as it does in a single process)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            got = dict(scope.get("headers", ()))
            if FORWARDED_FOR in got:
                scope = dict(scope)
                scope["client"] = (got[FORWARDED_FOR].decode("latin-1"), 0)
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + \
                    [(b"host", got.get(FORWARDED_HOST, b""))]
        await self.app(scope, receive, send)


class FrontDoor:
    """The ASGI app of the front door: every request and WebSocket relayed to Ray's proxy at ``upstream``."""

    def __init__(self, upstream_port: int, connections: int):
        import httpx

        self.base = f"127.0.0.1:{upstream_port}"
        self.http = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=32))
        self.relays: set[asyncio.Task] = set()  # open WebSocket relays

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self.relay_http(scope, receive, send)
        elif scope["type"] == "websocket":
            task = asyncio.current_task()
            self.relays.add(task)
            try:
                await self.relay_websocket(scope, receive, send)
            finally:
                self.relays.discard(task)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.http.aclose()
            await send({"type": "lifespan.shutdown.complete"})

    async def drained(self, timeout_s: float) -> None:
        """Until every WebSocket relay has ended (the replicas closed their streams), at most ``timeout_s``."""
        if self.relays:
            await asyncio.wait(list(self.relays), timeout=timeout_s)

    # ------------------------------------------------------------------ HTTP
    async def relay_http(self, scope, receive, send) -> None:
        import httpx

        async def body():
            while True:
                m = await receive()
                if m["type"] == "http.disconnect":
                    raise ConnectionResetError("the client left mid-request")
                yield m.get("body", b"")
                if not m.get("more_body"):
                    return

        length = [(b"content-length", v) for k, v in scope.get("headers", ()) if k == b"content-length"]
        target = _target(scope)  # verbatim: a path such as //host/x stays a path on the upstream
        url = httpx.URL(f"http://{self.base}").copy_with(raw_path=target)
        request = self.http.build_request(scope["method"], url, headers=upstream_headers(scope) + length,
                                          content=body())
        try:
            response = await self.http.send(request, stream=True)
        except (httpx.HTTPError, OSError):
            await _answer(send, 502, {"error": "unavailable", "message": "no replica could be reached"})
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.lower(), v) for k, v in response.headers.raw
                                    if k.lower() not in HOP_BY_HOP and k.lower() not in SET_BY_THE_SERVER]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except (httpx.HTTPError, OSError):
            pass  # the replica or the client went away mid-response: uvicorn closes the connection
        finally:
            await response.aclose()

    # ------------------------------------------------------------------ WebSocket
    async def relay_websocket(self, scope, receive, send) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        if (await receive())["type"] != "websocket.connect":
            return
        url = f"ws://{self.base}{_target(scope).decode('latin-1')}"
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream_headers(scope)]
        try:  # the client's Origin and User-Agent pass as they are (the relay adds neither)
            upstream = await connect(url, additional_headers=headers,
                                     user_agent_header=None, subprotocols=scope.get("subprotocols") or None,
                                     compression=None, max_size=None, max_queue=RELAY_QUEUE, ping_interval=None,
                                     open_timeout=30)
        except InvalidStatus as e:  # refused by the replica before accepting (Origin, Host): the same answer
            await _refuse(send, e.response.status_code, bytes(e.response.body or b""))
            return
        except Exception as e:  # noqa: BLE001 - no replica answered: the client is refused (502)
            log.warning("front door: no replica took a WebSocket: %s", type(e).__name__)
            await _refuse(send, 502, b"no replica could be reached\n")
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def client_to_replica():
            while True:
                m = await receive()
                if m["type"] == "websocket.disconnect":
                    return m.get("code", 1000)
                await upstream.send(m["bytes"] if m.get("bytes") is not None else m["text"])

        async def replica_to_client():
            try:
                async for data in upstream:
                    key = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", key: data})
            except ConnectionClosed:
                pass

        to_replica = asyncio.ensure_future(client_to_replica())
        to_client = asyncio.ensure_future(replica_to_client())
        try:
            await asyncio.wait({to_replica, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_replica, to_client):
                task.cancel()
            await asyncio.gather(to_replica, to_client, return_exceptions=True)
        closed = upstream.protocol.close_rcvd  # the replica's close frame, when it closed first
        if to_replica.done() and not to_replica.cancelled() and to_replica.exception() is None:
            code = to_replica.result()  # the client left (or sent too much: 1009): tell the replica
            await upstream.close(code if code in (1000, 1001, 1008, 1009) else 1001)
            return
        await upstream.close()
        code, reason = (closed.code, closed.reason) if closed and closed.code not in (1005, 1006) else \
            (1011, "the replica went away")
        try:
            await send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # noqa: BLE001 - the client is already gone
            pass


def _target(scope) -> bytes:
    """The request target as the client sent it: raw path and query."""
    path = scope.get("raw_path") or scope["path"].encode()
    return path + (b"?" + scope["query_string"] if scope.get("query_string") else b"")


async def _refuse(send, status: int, body: bytes) -> None:
    """A WebSocket refused before it is accepted, with an HTTP status."""
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "websocket.http.response.body", "body": body})


async def _answer(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def front_server(spec: ServingSpec, upstream_port: int, notify_shutdown, **kw):
    """The front door under uvicorn with the single process's limits (serve/http.py), sized for the deployment's
    slots; ``notify_shutdown``: a coroutine function that has every replica tell its streams (ray.py)."""
    from .http import Server, config, connection_limit

    r, limits = spec.ray, spec.limits
    replicas = (r.autoscale[1] if r.autoscale else r.replicas) if r else 1
    deployment = replace(limits, max_sessions=limits.max_sessions * replicas,
                         max_pending=limits.max_pending * replicas)
    app = FrontDoor(upstream_port, connections=connection_limit(deployment))

    async def tell_then_drain() -> None:
        await notify_shutdown()
        await app.drained(timeout_s=2.0)  # the replicas' shutdown frames pass through before uvicorn closes

    return Server(config(app, spec.host, spec.port, deployment, **kw), tell_then_drain)

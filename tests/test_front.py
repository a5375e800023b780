"""`serve --ray`'s front door (serve/front.py) as a relay, against a small upstream app (no Ray needed): requests,
bodies, WebSocket messages, close codes and refusals pass unchanged; who the client is comes from the relay."""

import json
import threading
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from .conftest import free_port  # noqa: E402


async def upstream(scope, receive, send):
    """Echoes what it was sent: HTTP -> JSON of the request; WebSocket -> each message back, 'close' -> 4001."""
    if scope["type"] == "http":
        size = 0
        while True:
            m = await receive()
            size += len(m.get("body", b""))
            if not m.get("more_body"):
                break
        body = json.dumps({"raw_path": scope["raw_path"].decode(), "query": scope["query_string"].decode(),
                           "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                           "body": size}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()
        if scope["path"] == "/refuse":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                return
            if m.get("text") == "close":
                await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
                return
            await send({"type": "websocket.send", **{k: m[k] for k in ("bytes", "text") if m.get(k) is not None}})


def _serve(server):
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return thread


@pytest.fixture(scope="module")
def front():
    import uvicorn

    from avatarforcing.serve.front import FrontDoor
    from avatarforcing.serve.http import Server, config
    from avatarforcing.serve.spec import Limits

    up_port, port = free_port(), free_port()
    up = uvicorn.Server(uvicorn.Config(upstream, host="127.0.0.1", port=up_port, log_level="warning"))
    _serve(up)

    async def nothing():
        pass

    door = Server(config(FrontDoor(up_port, 100), "127.0.0.1", port, Limits(), log_level="warning"), nothing)
    _serve(door)
    yield port, up
    door.should_exit = up.should_exit = True


def _get(port, target: str, headers: dict | None = None, method="GET", body=None) -> tuple[int, dict | bytes]:
    """One request, its target sent verbatim (http.client does not normalise it)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, target, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def test_requests_pass_verbatim_and_the_client_is_the_relays_word(front):
    port, _ = front
    status, seen = _get(port, "//elsewhere.example/x?a=1&b=%20", {
        "Host": "avatar.example", "X-Forwarded-Host": "evil.example"})
    assert status == 200 and seen["raw_path"] == "//elsewhere.example/x" and seen["query"] == "a=1&b=%20"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"  # the peer the front door saw
    assert seen["headers"]["x-forwarded-host"] == "avatar.example"  # the Host it was asked for, not the claim
    # a proxy on this machine (uvicorn trusts 127.0.0.1, as it does for the single server) may name the client
    status, seen = _get(port, "/x", {"X-Forwarded-For": "203.0.113.9"})
    assert seen["headers"]["x-forwarded-for"] == "203.0.113.9"
    body = b"x" * 300_000
    status, seen = _get(port, "/prepare", {"Content-Type": "image/png"}, "POST", body)
    assert status == 200 and seen["body"] == len(body)


def test_websocket_messages_close_codes_and_refusals_pass_unchanged(front):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    port, _ = front
    with connect(f"ws://127.0.0.1:{port}/ws?x=1") as ws:
        assert ws.protocol.extensions == []
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=10) == b"\x00\x01"
        ws.send("close")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/refuse")
    assert refused.value.response.status_code == 403


def test_no_upstream_is_a_502():
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from avatarforcing.serve.front import FrontDoor
    from avatarforcing.serve.http import Server, config
    from avatarforcing.serve.spec import Limits

    async def nothing():
        pass

    port = free_port()
    door = Server(config(FrontDoor(free_port(), 100), "127.0.0.1", port, Limits(), log_level="critical"), nothing)
    _serve(door)
    try:
        status, body = _get(port, "/healthz")
        assert status == 502 and body["error"] == "unavailable"
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{port}/ws")
        assert refused.value.response.status_code == 502
    finally:
        door.should_exit = True

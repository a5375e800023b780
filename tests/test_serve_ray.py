"""`serve --ray`: the server replicated by Ray Serve on a local 2-replica cluster (the `ray` extra)."""

import json
import os
import socket
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is an extra: pip install -e '.[ray]' (CI installs it)")

from avatarforcing.serve.client import AvatarClient, start_message  # noqa: E402

from .conftest import free_port, speech  # noqa: E402
from .test_browser import needs_browser, run_flow  # noqa: E402

K = 2  # sessions per replica


@pytest.fixture(scope="module")
def deployment():
    """The deployment as `serve --ray` runs it: Ray's proxy on loopback, the front door on the public port."""
    from avatarforcing.serve import ray as afray
    from avatarforcing.serve.spec import Limits, RayOptions, ServingSpec

    port = free_port()
    spec = ServingSpec(port=port, limits=Limits(max_sessions=K, allow_hosts=("127.0.0.1", "localhost")),
                       ray=RayOptions(replicas=2, num_cpus=2))
    with afray.running(spec, header_timeout_s=1.0, log_level="warning") as front:
        yield port, front


@pytest.fixture
def cluster(deployment):
    return deployment[0]


def _open(port):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws = connect(f"ws://127.0.0.1:{port}/ws")
    try:
        ws.send(start_message(identity="demo"))
    except ConnectionClosed:
        pass  # refused at once: the busy frame arrived before the close
    return ws, json.loads(ws.recv(timeout=60))


def _finish(ws, seconds=0.5):
    """Send audio and 'end'; return (frames, the last text message)."""
    ws.send(speech(seconds).tobytes())
    ws.send(json.dumps({"type": "end"}))
    frames = 0
    while True:
        m = ws.recv(timeout=60)
        if isinstance(m, bytes):
            frames += 1
            continue
        msg = json.loads(m)
        if msg["type"] in ("done", "error"):
            return frames, msg


def _replica_actor(replica_name: str):
    """The Ray actor of the replica that calls itself ``host:pid``."""
    import ray

    pid = int(replica_name.rsplit(":", 1)[1])
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA::"):
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            if ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) == pid:
                return actor
    raise LookupError(replica_name)


def _metric(port, name):
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(f"avatarforcing_{name}")}


def test_spread_admission_metrics_and_a_dying_replica(cluster):
    import ray
    from websockets.exceptions import ConnectionClosed

    port = cluster
    opened = [_open(port) for _ in range(2 * K)]
    by_replica: dict[str, list] = {}
    for ws, ready in opened:
        assert ready["type"] == "ready"
        by_replica.setdefault(ready["replica"], []).append(ws)
    assert sorted(len(v) for v in by_replica.values()) == [K, K]  # spread over both replicas
    extra, msg = _open(port)
    assert msg["type"] == "error" and msg["code"] == "busy"  # the 2K+1-th session is refused
    extra.close()
    time.sleep(1.5)  # replicas report every second
    import urllib.request

    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read())
    assert health["deployment"] == {"replicas": 2, "max_sessions": 2 * K, "sessions": 2 * K}
    active = _metric(port, "replica_sessions_active")
    assert sorted(active.values()) == [K, K] and _metric(port, "sessions_active") == {
        "avatarforcing_sessions_active": 2 * K}

    dead, alive = sorted(by_replica)
    ray.kill(_replica_actor(dead), no_restart=True)
    for ws in by_replica[dead]:  # the dead replica's streams end ...
        with pytest.raises((ConnectionClosed, TimeoutError)):
            _finish(ws)
    for ws in by_replica[alive]:  # ... the survivor's go on to the end
        frames, msg = _finish(ws)
        assert msg == {"type": "done", "frames": 13} and frames == 13
        ws.close()
    ws, ready = _open(port)  # and new sessions are served: by the survivor (or Ray's replacement), never the dead
    assert ready["type"] == "ready" and ready["replica"] != dead
    assert _finish(ws)[1]["type"] == "done"
    ws.close()


def test_python_client_unchanged(cluster):
    pcm = speech(1.2)
    cl = AvatarClient(f"ws://127.0.0.1:{cluster}/ws")
    frames = list(cl.stream((pcm[i:i + 3200] for i in range(0, len(pcm), 3200)), identity="demo"))
    assert [f.index for f in frames] == list(range(30)) and cl.done["frames"] == 30


@needs_browser
def test_page_unchanged(cluster, tmp_path):
    out = run_flow(f"http://127.0.0.1:{cluster}/", "say", tmp_path)
    assert out["frames"] >= 25 and np.isfinite(out["motion"]["mouth"])


def test_front_door_has_the_single_process_limits(cluster):
    """Ray's own proxy takes any head, keeps slow ones, negotiates deflate and buffers whole messages: clients
    reach the front door instead, which refuses all of these as the single-process server does."""
    from websockets.sync.client import connect

    from .test_serve_hardening import _raw, errors_of

    p = cluster
    big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert _raw(p, big)[0].startswith(b"HTTP/1.1 431")
    out, took = _raw(p, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200, slow=0.05,
                     read_timeout=10)
    assert took < 6 and b"200 OK" not in out  # a slow-loris head is cut at the deadline (1 s here)
    silent = [socket.create_connection(("127.0.0.1", p)) for _ in range(150)]  # half-open sockets
    try:
        out, _ = _raw(p, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and b'"deployment"' in out
    finally:
        for s in silent:
            s.close()
    with connect(f"ws://127.0.0.1:{p}/ws", max_size=None) as ws:
        assert ws.protocol.extensions == []  # no permessage-deflate
        ws.send(start_message(identity="demo"))
        assert json.loads(ws.recv(timeout=60))["type"] == "ready"
        ws.send(b"\x00" * 3_000_000)  # far over the 1 MiB limit: refused at the front door without buffering it
        errs, code = errors_of(ws)
    assert code == 1009
    with connect(f"ws://127.0.0.1:{p}/ws", max_size=None) as ws:
        ws.send(start_message(identity="demo"))
        assert json.loads(ws.recv(timeout=60))["type"] == "ready"
        ws.send(b"\x00" * 1_060_000)  # over the stream's limit, under the front door's: the replica's frame
        errs, code = errors_of(ws)
    assert [e["code"] for e in errs] == ["too_large"] and code == 1008


def test_replicas_see_the_clients_host_and_origin(cluster):
    """The Host allow-list and the Origin rule run in the replica, on what the client sent (not on the relay's
    own loopback address): the front door forwards both and the replica puts them back."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from .test_serve_hardening import _raw

    p = cluster
    ask = b"GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
    assert _raw(p, ask % b"localhost")[0].startswith(b"HTTP/1.1 200")
    assert _raw(p, ask % b"rebound.example")[0].startswith(b"HTTP/1.1 400")  # DNS rebinding
    with connect(f"ws://localhost:{p}/ws", origin=f"http://localhost:{p}") as ws:  # the page's own host: same origin
        ws.send(start_message(identity="demo"))
        assert json.loads(ws.recv(timeout=60))["type"] == "ready"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{p}/ws", origin="http://elsewhere.example")
    assert refused.value.response.status_code == 403


def test_forwarded_headers_are_the_front_doors_own():
    """A client cannot choose the address or host a replica sees: the front door overwrites both."""
    from avatarforcing.serve.front import FromFront, upstream_headers

    scope = {"type": "http", "client": ("203.0.113.7", 5555),
             "headers": [(b"host", b"avatar.example"), (b"x-forwarded-for", b"10.0.0.1"),
                         (b"x-forwarded-host", b"evil.example"), (b"connection", b"keep-alive"), (b"accept", b"*/*")]}
    sent = upstream_headers(scope)
    assert sent == [(b"accept", b"*/*"), (b"x-forwarded-for", b"203.0.113.7"),
                    (b"x-forwarded-host", b"avatar.example")]
    seen = {}

    async def app(scope, receive, send):
        seen.update(client=scope["client"], headers=dict(scope["headers"]))

    import asyncio

    asyncio.run(FromFront(app)({"type": "http", "client": ("127.0.0.1", 1),
                                "headers": [(b"host", b"127.0.0.1:9")] + sent}, None, None))
    assert seen["client"][0] == "203.0.113.7" and seen["headers"][b"host"] == b"avatar.example"


def test_taking_the_deployment_down_tells_open_streams_first(deployment):
    """Ray's proxy would just cut the sockets: on SIGTERM the front door first has every replica send its streams
    the protocol's `shutdown` error frame and close them (1001), and relays both, as the single-process server
    does. Runs last: the front door is down afterwards."""
    port, front = deployment
    ws, ready = _open(port)
    assert ready["type"] == "ready"
    ws.send(speech(0.5).tobytes())
    front.should_exit = True  # what uvicorn's SIGTERM handler does
    while True:
        m = ws.recv(timeout=30)
        if isinstance(m, str):
            msg = json.loads(m)
            if msg["type"] == "error":
                break
    assert msg["code"] == "shutdown"
    from websockets.exceptions import ConnectionClosed

    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1001

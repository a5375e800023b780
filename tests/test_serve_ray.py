"""`serve --ray`: the server replicated by Ray Serve on a local 2-replica cluster (the `ray` extra)."""

import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is an extra: pip install -e '.[ray]' (CI installs it)")

from avatarforcing.serve.client import AvatarClient, start_message  # noqa: E402

from .conftest import free_port, speech  # noqa: E402
from .test_browser import needs_browser, run_flow  # noqa: E402

K = 2  # sessions per replica


@pytest.fixture(scope="module")
def cluster():
    from avatarforcing.serve import ray as afray
    from avatarforcing.serve.spec import Limits, RayOptions, ServingSpec

    port = free_port()
    afray.start(ServingSpec(port=port, limits=Limits(max_sessions=K), ray=RayOptions(replicas=2, num_cpus=2)))
    yield port
    afray.stop()


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


def test_taking_the_deployment_down_tells_open_streams_first(cluster):
    """Ray's proxy would just cut the sockets: `stop()` first has every replica send its streams the protocol's
    `shutdown` error frame and close them (1001), as the single-process server does on SIGTERM. Runs last: the
    deployment refuses new streams afterwards."""
    from avatarforcing.serve import ray as afray

    ws, ready = _open(cluster)
    assert ready["type"] == "ready"
    ws.send(speech(0.5).tobytes())
    assert afray.announce_shutdown() == []  # every replica that reports has told its streams
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

import base64
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from avatarforcing.api import Avatar
from avatarforcing.serve.app import create_app
from avatarforcing.serve.client import AvatarClient, parse_frame, start_message
from avatarforcing.serve.spec import Limits

from .conftest import free_port, rss_mb, speech


@pytest.fixture(scope="module")
def avatar():
    return Avatar.load("mini")


def client(avatar, **limits):
    return TestClient(create_app(avatar, Limits(**limits)))


def run_stream(ws, pcm, chunk=5000):
    ws.send_text(start_message(identity="demo"))
    ready = json.loads(ws.receive_text())
    assert ready["type"] == "ready"
    frames, texts = [], []
    for i in range(0, len(pcm), chunk):
        ws.send_bytes(pcm[i:i + chunk].tobytes())
    ws.send_text(json.dumps({"type": "end"}))
    while True:
        msg = ws.receive()
        if msg.get("bytes") is not None:
            frames.append(parse_frame(msg["bytes"]))
        elif msg.get("text") is not None:
            m = json.loads(msg["text"])
            texts.append(m)
            if m["type"] in ("done", "error"):
                break
        else:
            break
    return ready, frames, texts


def test_protocol_round_trip(avatar):
    with client(avatar) as c, c.websocket_connect("/ws") as ws:
        ready, frames, texts = run_stream(ws, speech(2.0))
    assert [f.index for f in frames] == list(range(50))
    assert frames[10].time_s == pytest.approx(10 / 25)
    assert frames[0].image().shape == (128, 128, 3)
    assert texts[-1] == {"type": "done", "frames": 50}
    assert any(t["type"] == "stats" for t in texts)


def _expect_error(c, first, code, then=None, **_):
    with c.websocket_connect("/ws") as ws:
        if isinstance(first, bytes):
            ws.send_bytes(first)
        else:
            ws.send_text(first)
        if then is not None:
            assert json.loads(ws.receive_text())["type"] == "ready"
            ws.send_bytes(then) if isinstance(then, bytes) else ws.send_text(then)
        while True:
            m = ws.receive()
            if m.get("text"):
                msg = json.loads(m["text"])
                if msg["type"] == "error":
                    assert msg["code"] == code, msg
                    return msg
            elif m.get("bytes") is None:
                pytest.fail(f"closed without the {code!r} error")


def test_bad_inputs_get_clear_errors_and_server_keeps_serving(avatar):
    with client(avatar, max_message_bytes=50_000) as c:
        _expect_error(c, "{not json", "protocol")
        _expect_error(c, b"\x00\x01", "protocol")
        _expect_error(c, json.dumps({"type": "hello"}), "protocol")
        _expect_error(c, json.dumps({"type": "start", "image": base64.b64encode(b"not an image").decode()}),
                      "bad_image")
        _expect_error(c, json.dumps({"type": "start", "image": "%%%"}), "bad_image")
        _expect_error(c, json.dumps({"type": "start", "identity": "nobody"}), "bad_image")
        _expect_error(c, json.dumps({"type": "start", "identity": "demo", "sample_rate": 44100}), "bad_audio")
        _expect_error(c, json.dumps({"type": "start", "identity": "demo", "format": "mp3"}), "bad_audio")
        _expect_error(c, start_message(identity="demo"), "bad_audio", then=b"\x00\x01\x02")
        _expect_error(c, start_message(identity="demo"), "too_large", then=b"\x00" * 60_000)
        _expect_error(c, start_message(identity="demo"), "protocol", then=json.dumps({"type": "dance"}))
        with c.websocket_connect("/ws") as ws:  # still serving
            _, frames, _ = run_stream(ws, speech(0.5))
        assert len(frames) == 13
        assert "avatarforcing_errors_total 11" in c.get("/metrics").text


def test_admission_control(avatar):
    with client(avatar, max_sessions=1) as c:
        with c.websocket_connect("/ws") as ws1:
            ws1.send_text(start_message(identity="demo"))
            assert json.loads(ws1.receive_text())["type"] == "ready"
            with c.websocket_connect("/ws") as ws2:
                msg = json.loads(ws2.receive_text())
                assert msg["code"] == "busy" and "1 sessions" in msg["message"]
            assert c.get("/healthz").json()["sessions"] == 1
        assert "avatarforcing_sessions_rejected_total 1" in c.get("/metrics").text


def test_disconnect_mid_stream_frees_session_and_memory(avatar):
    pcm = speech(0.6)
    with client(avatar) as c:
        def cycle():
            with c.websocket_connect("/ws") as ws:
                ws.send_text(start_message(identity="demo"))
                ws.receive_text()
                ws.send_bytes(pcm.tobytes())
            # leaving the block closes the socket mid-stream

        for _ in range(20):
            cycle()
        time.sleep(0.2)
        base = rss_mb()
        for _ in range(200):
            cycle()
        deadline = time.time() + 5
        while c.get("/healthz").json()["sessions"] and time.time() < deadline:
            time.sleep(0.05)
        assert c.get("/healthz").json()["sessions"] == 0
        assert rss_mb() - base < 40, (base, rss_mb())


def test_metrics_and_health(avatar):
    with client(avatar) as c:
        with c.websocket_connect("/ws") as ws:
            run_stream(ws, speech(0.4))
        text = c.get("/metrics").text
        assert 'avatarforcing_step_latency_seconds_bucket{le="+Inf"}' in text
        assert "avatarforcing_frames_total 10" in text
        assert c.get("/healthz").json()["status"] == "ok"
        assert "<canvas" in c.get("/").text and "demo" in c.get("/identities").json()


def test_python_client_against_a_real_server(avatar):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(avatar), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        pcm = speech(1.2)
        cl = AvatarClient(f"ws://127.0.0.1:{port}/ws")
        frames = list(cl.stream((pcm[i:i + 3200] for i in range(0, len(pcm), 3200)), identity="demo"))
        assert [f.index for f in frames] == list(range(30))
        assert cl.ready["lookahead_ms"] > 0
    finally:
        server.should_exit = True
        th.join(10)

"""WebRTC (POST /offer, serve/webrtc.py): a Python peer (aiortc) drives the contract; headless Chromium with fake
media devices measures what a browser presents: frames, the voice, the A/V offset and the interrupt latency.
Needs the webrtc extra (aiortc); the browser test also needs chromium and `npm install` in tests/browser."""

import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import free_port, speech
from .test_browser import CHROMIUM, HERE, needs_browser

aiortc = pytest.importorskip("aiortc", reason="needs the webrtc extra: pip install 'avatarforcing[webrtc]'")
httpx = pytest.importorskip("httpx")


class Server:
    """The app under uvicorn in a thread; every frame the server hands its WebRTC tracks is recorded."""

    def __init__(self, limits=None):
        import uvicorn

        from avatarforcing.api import Avatar
        from avatarforcing.serve import rtc_media
        from avatarforcing.serve.app import create_app

        self.sent = []  # (index, image, pcm) as put on the tracks
        put = rtc_media.MediaClock.put

        def recording_put(clock, index, image, pcm):
            self.sent.append((index, image, np.array(pcm)))
            put(clock, index, image, pcm)

        self.patch = (rtc_media.MediaClock, put)
        rtc_media.MediaClock.put = recording_put
        self.port = free_port()
        self.srv = uvicorn.Server(uvicorn.Config(create_app(Avatar.load("mini"), limits), host="127.0.0.1",
                                                 port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        while not self.srv.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.srv.should_exit = True
        self.thread.join(10)
        cls, put = self.patch
        cls.put = put


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


# ---------------------------------------------------------------- a Python peer


async def connect(url, start=None, mic=None, headers=None):
    """A peer receiving video + audio, with the control channel (and ``mic``: a track it sends)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    if mic is not None:
        pc.addTrack(mic)
    else:
        pc.addTransceiver("audio", direction="recvonly")
    channel = pc.createDataChannel("control")
    got = {"video": [], "audio": [], "messages": []}
    channel.on("message", lambda m: got["messages"].append(json.loads(m)))

    async def read(track):
        while True:
            try:
                frame = await track.recv()
            except Exception:  # noqa: BLE001 - the track ended
                return
            got[track.kind].append(frame)

    pc.on("track", lambda t: asyncio.ensure_future(read(t)))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{url}/offer", json={"type": "offer", "sdp": pc.localDescription.sdp,
                                               "start": start or {"identity": "demo"}},
                         headers=headers or {}, timeout=30)
    if r.status_code != 200:
        await pc.close()
        return r, None, None, got
    await pc.setRemoteDescription(RTCSessionDescription(sdp=r.json()["sdp"], type="answer"))
    return r, pc, channel, got


async def wait_for(cond, timeout=20.0):
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        await asyncio.sleep(0.05)


async def health(url):
    async with httpx.AsyncClient() as c:
        return (await c.get(f"{url}/healthz")).json()


def test_a_peer_gets_video_and_the_voice_speaks_interrupts_and_ends(server):
    async def go():
        r, pc, ch, got = await connect(server.url)
        assert r.status_code == 200 and r.json()["type"] == "answer" and r.json()["session"]
        msgs = got["messages"]
        await wait_for(lambda: any(m["type"] == "ready" for m in msgs))
        ready = next(m for m in msgs if m["type"] == "ready")
        assert ready["webrtc"] and ready["live"] and ready["fps"] == 25 and ready["sample_rate"] == 16000
        assert (await health(server.url))["sessions"] == 1
        await wait_for(lambda: len(got["video"]) >= 10 and len(got["audio"]) >= 10)
        v = got["video"][-1]
        assert (v.width, v.height) == (128, 128)
        pcm = speech(3.0).astype("<f4")
        for i in range(0, len(pcm), 4000):  # the page's message size: 0.25 s
            ch.send(pcm[i:i + 4000].tobytes())
        await wait_for(lambda: any(m["type"] == "state" and m["state"] == "speaking" for m in msgs))
        await asyncio.sleep(0.5)
        ch.send(json.dumps({"type": "interrupt"}))
        await wait_for(lambda: any(m["type"] == "playback_finished" for m in msgs))
        fin = next(m for m in msgs if m["type"] == "playback_finished")
        assert fin["interrupted"] and 0 < fin["position_s"] < 3.0
        ch.send(json.dumps({"type": "end"}))
        await wait_for(lambda: any(m["type"] == "done" for m in msgs))
        done = next(m for m in msgs if m["type"] == "done")
        assert done["frames"] >= len(got["video"]) > 0
        await pc.close()
        t = time.monotonic()
        while (await health(server.url))["sessions"] and time.monotonic() - t < 10:
            await asyncio.sleep(0.1)
        assert (await health(server.url))["sessions"] == 0  # the slot is released

    asyncio.run(go())
    # what went out: every frame once, in order, each with its 40 ms of PCM; the speech is on them
    idx = [i for i, _, _ in server.sent]
    assert idx == sorted(set(idx)) and all(len(p) == 640 for _, _, p in server.sent)
    assert max(np.abs(p).max() for _, _, p in server.sent) > 0.05


def test_the_microphone_track_is_the_voice(server):
    """The peer's audio track (48 kHz stereo Opus from a browser) is resampled and spoken."""
    from aiortc.mediastreams import AudioStreamTrack

    class Tone(AudioStreamTrack):  # aiortc's paced 20 ms frames, a 300 Hz tone instead of silence
        async def recv(self):
            frame = await super().recv()
            n = frame.samples
            t = (frame.pts + np.arange(n)) / frame.sample_rate
            frame.planes[0].update((0.3 * 32767 * np.sin(2 * np.pi * 300 * t)).astype(np.int16).tobytes())
            return frame

    async def go():
        first = len(server.sent)
        r, pc, ch, got = await connect(server.url, mic=Tone())
        assert r.status_code == 200
        await wait_for(lambda: any(m["type"] == "state" and m["state"] == "speaking" for m in got["messages"]))
        await wait_for(lambda: len(server.sent) - first > 40)
        await pc.close()
        return first

    first = asyncio.run(go())
    pcm = np.concatenate([p for _, _, p in server.sent[first:]])
    spectrum = np.abs(np.fft.rfft(pcm[-8000:]))
    assert abs(np.argmax(spectrum) * 16000 / 8000 - 300) < 10  # the tone, at the model's rate


def test_offers_are_checked_like_websocket_starts(server):
    async def go():
        async with httpx.AsyncClient() as c:
            post = lambda body, **kw: c.post(f"{server.url}/offer", json=body, timeout=10, **kw)  # noqa: E731
            r = await post({"type": "offer"})
            assert r.status_code == 400 and r.json()["error"] == "protocol" and "sdp" in r.json()["message"]
            r = await post({"type": "offer", "sdp": "v=0\r\n", "start": {"identity": "nobody"}})
            assert r.status_code == 400 and r.json()["error"] == "bad_image"
            r = await post({"type": "offer", "sdp": "v=0\r\n", "start": {"identity": "demo", "seed": -1}})
            assert r.status_code == 400 and "seed" in r.json()["message"]
            r = await post({"type": "offer", "sdp": "v=0\r\nnot sdp", "start": {"identity": "demo"}})
            assert r.status_code == 400 and r.json()["error"] == "protocol"
            audio_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
            r = await post({"type": "offer", "sdp": audio_only, "start": {"identity": "demo"}})
            assert r.status_code == 400 and "video" in r.json()["message"]
            r = await post({"type": "offer", "sdp": "v=0"}, headers={"origin": "http://evil.example"})
            assert r.status_code == 403
        assert (await health(server.url))["sessions"] == 0  # no refused offer holds a slot

    asyncio.run(go())


def test_busy_and_a_peer_that_never_connects_releases_its_slot():
    from avatarforcing.serve.spec import Limits

    s = Server(Limits(max_sessions=1, start_timeout_s=1.0))
    try:
        async def go():
            from aiortc import RTCPeerConnection

            pc = RTCPeerConnection()  # an offer whose peer never answers the connectivity checks
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            sdp = pc.localDescription.sdp
            async with httpx.AsyncClient() as c:
                body = {"type": "offer", "sdp": sdp, "start": {"identity": "demo"}}
                first = await c.post(f"{s.url}/offer", json=body, timeout=10)
                assert first.status_code == 200, first.text
                busy = await c.post(f"{s.url}/offer", json=body, timeout=10)
                assert busy.status_code == 503 and busy.json()["error"] == "busy"
                await asyncio.sleep(2.0)  # past start_timeout_s
                assert (await health(s.url))["sessions"] == 0
            await pc.close()

        asyncio.run(go())
    finally:
        s.close()


# ---------------------------------------------------------------- a browser


def onsets(first_loud_ms, quiet_ms=1000.0):
    """Times of the first loud sample after at least ``quiet_ms`` without one."""
    out, last = [], -np.inf
    for t in first_loud_ms:
        if t - last > quiet_ms:
            out.append(t)
        last = t
    return out


def mouth_onset(times_ms, cells, at_ms):
    """The first frame around ``at_ms`` whose mouth region (8x7 luma cells) leaves where it rested: more than
    halfway from the resting variation to the largest change of the next 600 ms."""
    times_ms, cells = np.asarray(times_ms), np.asarray(cells, float)
    rest = cells[(times_ms > at_ms - 1200) & (times_ms < at_ms - 400)]
    base = rest.mean(0)
    noise = np.abs(rest - base).mean(1).max()
    near = (times_ms > at_ms - 600) & (times_ms < at_ms + 600)
    d = np.abs(cells[near] - base).mean(1)
    peak = np.abs(cells[(times_ms >= at_ms) & (times_ms < at_ms + 600)] - base).mean(1).max()
    return float(times_ms[near][np.argmax(d > noise + 0.5 * (peak - noise))])


def shown(times_ms, cells, new, old, expected_ms, search_ms=400.0):
    """When the browser first showed the server's frame ``new`` (the one after ``old``): the first presented
    frame within ``search_ms`` of ``expected_ms`` that is closer to ``new`` than to ``old``. Both sides then refer
    to the same frame, whatever a detector would make of the browser's (compressed, sometimes dropped) frames."""
    for t, c in zip(times_ms, cells):
        if abs(t - expected_ms) <= search_ms and np.abs(np.subtract(c, new)).sum() < np.abs(np.subtract(c, old)).sum():
            return float(t)
    raise AssertionError(f"the server's frame at {expected_ms:.0f} ms was never shown")


def mouth_cells(image):
    """The browser recorder's features of one frame: luma of the region x 48-79, y 62-89 in 4x4 cells."""
    y = image[62:90, 48:80].astype(float) @ np.array([0.299, 0.587, 0.114])
    return y.reshape(7, 4, 8, 4).mean((1, 3)).reshape(-1)


# below this the machine did not keep real time (CPU: the model on one thread makes ~22 fps here, and aiortc's VP8
# and Chromium share the other core): the browser then shows video late by up to 240 ms (seen at 13.8-16 fps, on a
# CI host and here with a busy loop beside it); runs presenting 17-23 fps stayed within 65 ms
MIN_PRESENTED_FPS = 18.0


def sync_report(rec, sent, fps=25, rate=16000):
    """From the browser's record and the frames the server sent: per speech onset, the offset between the
    first mouth-opening frame's display and the voice's onset, as presented (browser) and as made (server: the
    frames' pts); the difference is what the transport added. And the interrupt's latency to silence."""
    v_t = [t for t, _ in rec["video"]]
    v_c = [c for _, c in rec["video"]]
    # the voice's onsets as Chrome plays it out (RTP source info: each 20 ms frame's playout time and level);
    # WebAudio's view of the same track comes ~40 ms later (its own buffering) and is kept as a cross-check
    b_onsets = onsets([t for t, level in rec["playout"] if level > 0.01])
    pcm = np.concatenate([p for _, _, p in sent])
    start = sent[0][0]
    loud = np.flatnonzero(np.abs(pcm) > 0.02)
    s_onsets = onsets(1000 * (start / fps + loud / rate))
    s_t = [1000 * i / fps for i, _, _ in sent]
    s_c = [mouth_cells(img) for _, img, _ in sent]
    events = []
    for b, s in zip(b_onsets, s_onsets):
        made = mouth_onset(s_t, s_c, s) - s  # the frame that opens the mouth, on the server's clock
        k = int(np.searchsorted(s_t, s + made))
        browser = shown(v_t, v_c, s_c[k], s_c[k - 1], b + made) - b
        events.append({"browser_ms": round(browser, 1), "server_ms": round(made, 1),
                       "av_offset_ms": round(browser - made, 1)})
    stop, mic = rec["marks"]["stop"], rec["marks"]["mic"]
    after = [t for t, level in rec["playout"] if stop < t < mic and level > 0.01]
    return {"events": events, "onsets": [len(b_onsets), len(s_onsets)],
            "interrupt_to_silence_ms": round(max(after) - stop, 1) if after else 0.0,
            "video_fps": round((len(v_t) - 1) / ((v_t[-1] - v_t[0]) / 1000), 2)}


@needs_browser
def test_browser_over_webrtc_plays_video_and_voice_in_sync(tmp_path):
    pytest.importorskip("avatarforcing.data.speech").engine()  # the page's typed text needs libespeak-ng
    import soundfile as sf

    from avatarforcing.data.audio import resample
    from avatarforcing.data.speech import synthesize

    sp = synthesize("One two three, the quick brown fox jumps over the lazy dog.")
    x = resample(sp.samples, sp.rate, 16000).astype(np.float32)
    mic = tmp_path / "mic.wav"  # the fake microphone: a second of silence, then speech
    sf.write(mic, np.concatenate([np.zeros(16000, np.float32), x, np.zeros(16000, np.float32)]), 16000,
             subtype="PCM_16")
    from avatarforcing.serve.spec import Limits

    s = Server(Limits(compute_threads=1))  # the model, Chromium and aiortc share this machine's two cores
    try:
        res = subprocess.run(["node", str(HERE / "e2e.mjs"), s.url + "/", "webrtc", str(mic)], capture_output=True,
                             text=True, timeout=200, cwd=HERE, env={**os.environ, "CHROMIUM": CHROMIUM})
        sent = list(s.sent)
    finally:
        s.close()
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = json.loads([x for x in res.stdout.splitlines() if x.startswith("{")][-1])
    rec = out["record"]
    assert out["started"]["tracks"] == ["audio", "video"] and out["frames"] >= 100
    assert max(rms for _, rms, _ in rec["audio"]) > 0.05  # the voice arrived
    if os.environ.get("AVATARFORCING_WEBRTC_RAW"):  # what the measures are computed from, for a closer look
        import pickle

        Path(os.environ["AVATARFORCING_WEBRTC_RAW"]).write_bytes(pickle.dumps((rec, sent)))
    report = sync_report(rec, sent)
    report["frames_late"] = out["stats"][1]
    last = rec["stats"][-1] if rec.get("stats") else {}  # the server's last 'stats' over the data channel
    report["server_behind_ms"], report["server_slipped_ms"] = last.get("behind_ms"), last.get("slipped_ms")
    print("webrtc browser:", json.dumps(report))
    if os.environ.get("AVATARFORCING_WEBRTC_REPORT"):  # benchmarks/webrtc_browser.sh collects runs
        Path(os.environ["AVATARFORCING_WEBRTC_REPORT"]).write_text(json.dumps(report) + "\n")
    assert report["onsets"][0] >= 2 and len(report["events"]) >= 2  # the typed sentence and the microphone
    assert report["interrupt_to_silence_ms"] < 1500, report  # the rest of the sentence (~4 s) is never heard
    if report["video_fps"] < MIN_PRESENTED_FPS:
        offsets = [float(e["av_offset_ms"]) for e in report["events"]]
        pytest.skip(f"A/V offset not judged: the browser presented {report['video_fps']} fps of 25, so this machine "
                    f"fell behind real time (offsets {offsets} ms); the server's stamps are checked without a "
                    "browser in tests/test_rtc_media.py")
    # the target is 40 ms (benchmarks/webrtc_browser.sh: median +4 ms, 10 of 10 events within 40 ms on this CPU); the
    # bar here is four frames, what a track sent on its own clock (unpaced, or not moved with the other) exceeds
    for e in report["events"]:
        assert abs(e["av_offset_ms"]) <= 160, report
    # the interrupt mutes the voice queued on the track (60 ms median, 86 at most here); before, the queued speech
    # played to its end (263-440 ms)
    assert report["interrupt_to_silence_ms"] < 250, report


def test_ice_servers_reach_the_servers_peer_and_only_stun_reaches_the_page(capsys):
    """`serve --ice-server`: the server's peer connection gathers through the STUN server given (a STUN responder
    here counts its Binding requests), /model tells the page the STUN URL and never the TURN credentials, and a
    malformed URL is refused at the command line."""
    from aioice import stun

    from avatarforcing.cli import main
    from avatarforcing.serve.ice import IceServer, for_browsers
    from avatarforcing.serve.spec import Limits

    for bad, why in (("http://x", "expected a URL starting with"), ("turn:host:3478", "needs USER:PASSWORD@"),
                     ("stun:u:p@host", "only TURN servers"), ("turn:user@host", "USER:PASSWORD"), ("stun:", "no host")):
        with pytest.raises(ValueError, match=why):
            IceServer.parse(bad)
    assert IceServer.parse("turn:me:s3cret@turn.example.org:3478?transport=tcp") == \
        IceServer("turn:turn.example.org:3478?transport=tcp", "me", "s3cret")
    assert main(["serve", "--ice-server", "turn:nocreds.example.org"]) == 2
    assert "a TURN server needs USER:PASSWORD@" in capsys.readouterr().err

    class Responder(asyncio.DatagramProtocol):
        requests = 0

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            req = stun.parse_message(data)
            Responder.requests += 1
            res = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                               transaction_id=req.transaction_id)
            res.attributes["XOR-MAPPED-ADDRESS"] = addr
            self.transport.sendto(bytes(res), addr)

    async def go(port):
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Responder, local_addr=("127.0.0.1", port))
        s = Server(Limits(ice_servers=(f"stun:127.0.0.1:{port}",)))  # (an unreachable TURN would cost 5 s)
        try:
            async with httpx.AsyncClient() as c:
                model = (await c.get(f"{s.url}/model")).json()
            assert model["ice_servers"] == [{"urls": f"stun:127.0.0.1:{port}"}]
            r, pc, channel, got = await connect(s.url)
            assert r.status_code == 200, r.text
            await wait_for(lambda: any(m.get("type") == "ready" for m in got["messages"]))
            await pc.close()
        finally:
            s.close()
            transport.close()

    asyncio.run(go(free_port()))
    assert Responder.requests >= 1  # the server's own peer asked the STUN server for its address
    assert for_browsers(("turn:a:b@h", "stuns:h:5349")) == [{"urls": "stuns:h:5349"}]

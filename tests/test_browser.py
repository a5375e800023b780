"""Browser end-to-end: headless Debian Chromium (playwright-core) drives the served page on a phone-sized
screen. Needs `chromium` and `npm install` in tests/browser (.ci/run does both); skipped otherwise."""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

HERE = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

needs_browser = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and shutil.which("node") and (HERE / "node_modules" / "playwright-core").exists()),
    reason="needs Debian chromium, node and `npm install` in tests/browser (see .ci/run)")


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from avatarforcing.api import Avatar
    from avatarforcing.serve.app import create_app

    from .conftest import free_port

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Avatar.load("mini")), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    th.join(10)


def run_flow(url, flow, arg) -> dict:
    res = subprocess.run(["node", str(HERE / "e2e.mjs"), url, flow, str(arg)], capture_output=True, text=True,
                         timeout=150, cwd=HERE)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


@needs_browser
def test_page_draws_frames_from_the_microphone(server, tmp_path):
    wav = tmp_path / "mic.wav"
    t = np.arange(16000 * 8) / 16000
    sf.write(wav, (0.4 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32), 16000)
    out = run_flow(server, "mic", wav)
    assert out["frames"] >= 12 and out["lit"] > 10


@needs_browser
def test_typed_sentence_speaks_and_the_recording_downloads(server, tmp_path):
    pytest.importorskip("avatarforcing.data.speech").engine()  # server-side speech needs libespeak-ng
    out = run_flow(server, "say", tmp_path)
    assert out["frames"] >= 25 and out["motion"]["n"] >= out["frames"] - 1  # every drawn frame was compared
    assert out["motion"]["backwards"] == 0  # frames are shown in their order, whatever order decodes finish in
    assert out["motion"]["mouth"] > 1.25 * out["motion"]["forehead"]
    from avatarforcing.data.video import read_video

    frames, fps, audio = read_video(tmp_path / "recording.mp4")
    assert frames.shape[0] >= 25 and fps == 25 and audio is not None
    assert (tmp_path / "page.png").stat().st_size > 10_000


@needs_browser
def test_bad_portrait_shows_a_readable_banner(server, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a picture" * 20)
    out = run_flow(server, "error", bad)
    assert "not a readable image" in out["banner"]


@needs_browser
def test_conversation_mode_is_always_on_speaks_and_stops(server, tmp_path):
    pytest.importorskip("avatarforcing.data.speech").engine()  # server-side speech needs libespeak-ng
    out = run_flow(server, "live", tmp_path)
    assert out["silent"]["n"] >= 30  # frames drawn with nobody speaking
    assert out["speaking"]["mouth"] > 1.5 * out["settled"]["mouth"] and not out["after"]["speaking"]
    assert out["speaking"]["backwards"] == 0 and (tmp_path / "page_live.png").stat().st_size > 10_000

"""Browser end-to-end: headless Debian Chromium (playwright-core) opens the page, a wav file plays as the
microphone, frames must be drawn. Needs `chromium` and `npm install` in tests/browser (.ci/run does both)."""

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


@needs_browser
def test_page_draws_frames_from_the_microphone(tmp_path):
    import uvicorn

    from avatarforcing.api import Avatar
    from avatarforcing.serve.app import create_app

    from .test_serve import _free_port

    wav = tmp_path / "mic.wav"
    t = np.arange(16000 * 8) / 16000
    sf.write(wav, (0.4 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32), 16000)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Avatar.load("mini")), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        res = subprocess.run(["node", str(HERE / "e2e.mjs"), f"http://127.0.0.1:{port}/", str(wav), "12"],
                             capture_output=True, text=True, timeout=120, cwd=HERE)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert '"frames"' in res.stdout
    finally:
        server.should_exit = True
        th.join(10)

"""A wheel: built from the checkout, installed into a clean venv, it generates and serves from the installed
package (its shipped `mini`, its page), not from the checkout."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from .conftest import free_port

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, a working folder outside the checkout) with the wheel installed in the venv; the
    dependencies come from this test environment's site-packages (read, not installed: no network)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ there
    top = {".git", ".venv", "out", "build", "runs", "data", "tests", "benchmarks"}  # at the top level only
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if (Path(d) == ROOT and n in top) or
                                                         n == "__pycache__" or n.endswith((".egg-info", "cache"))])
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("avatarforcing-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not our package
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    work = tmp / "work"
    work.mkdir()
    return env_dir / "bin", work


def test_the_wheel_ships_the_model_and_the_page(installed):
    bin_dir, work = installed
    where = subprocess.check_output([str(bin_dir / "python"), "-c",
                                     "import avatarforcing, pathlib; p = pathlib.Path(avatarforcing.__file__).parent;"
                                     "print(p); assert (p / 'assets/models/mini/model.safetensors').is_file();"
                                     "assert (p / 'serve/static/index.html').is_file()"], cwd=work, text=True)
    assert str(ROOT) not in where and "site-packages" in where


def test_the_installed_command_generates_and_serves(installed):
    bin_dir, work = installed
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    wav = ROOT / "avatarforcing" / "assets" / "demo" / "utterance.wav"
    import numpy as np
    import soundfile as sf

    pcm, rate = sf.read(wav, dtype="float32")
    sf.write(work / "short.wav", pcm[: 2 * rate], rate)
    r = subprocess.run(["avatarforcing", "generate", "--model", "mini", "--identity", "demo", "--audio", "short.wav",
                        "--out", "out.mp4"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "out.mp4").stat().st_size > 1000 and "50 frames" in r.stdout

    port = free_port()
    proc = subprocess.Popen(["avatarforcing", "serve", "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.3)
        assert health["status"] == "ok"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert b"<html" in page.lower()
        assert np.frombuffer(urllib.request.urlopen(f"http://127.0.0.1:{port}/identities/demo.png",
                                                    timeout=10).read()[:8], np.uint8).tolist()[:4] == [137, 80, 78, 71]
    finally:
        proc.terminate()
        proc.wait(30)

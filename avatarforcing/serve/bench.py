"""``avatarforcing bench serve``: a bounded load test on 127.0.0.1 (the server in its own process + S real-time
clients, in one run)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from .http import free_port

LATE_MS = 500.0  # a frame later than this after the audio it needed arrived (the server's late_ms)


def _client(url: str, seconds: float, out: dict) -> None:
    from .client import AvatarClient

    rate, chunk = 16000, 1600  # 100 ms chunks sent at real-time pace
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    sent_at: list[float] = []
    t0 = time.perf_counter()

    def chunks():
        for i in range(0, len(pcm), chunk):
            target = t0 + i / rate
            time.sleep(max(0.0, target - time.perf_counter()))
            sent_at.append(time.perf_counter())
            yield pcm[i:i + chunk]

    cl = AvatarClient(url)
    arrivals = []
    try:
        for f in cl.stream(chunks(), identity="demo"):
            arrivals.append((f.index, time.perf_counter()))
    except Exception as e:  # noqa: BLE001 - refused (busy, HTTP 5xx) or cut: reported, not raised in a thread
        out["error"] = f"{type(e).__name__}: {e}"
        return
    look = (cl.ready or {}).get("lookahead_ms", 0) / 1000
    lat = []  # frames whose audio (and look-ahead) the client sent: their latency from that audio's send time
    for idx, ta in arrivals:  # frame idx needs audio up to (idx + 1)/25 s + look-ahead
        k = int(((idx + 1) / 25 + look) * rate / chunk)
        if k < len(sent_at):
            lat.append(1000 * (ta - sent_at[k]))
    # the last frames need audio past the end: they are made once 'end' says there is none (the window's drain)
    end_ms = 1000 * (arrivals[-1][1] - sent_at[-1]) if arrivals else None
    dur = arrivals[-1][1] - arrivals[0][1] if len(arrivals) > 1 else float("nan")
    out.update(frames=len(arrivals), fps=(len(arrivals) - 1) / dur if dur == dur and dur > 0 else None,
               latency_ms_p50=float(np.percentile(lat, 50)), latency_ms_p95=float(np.percentile(lat, 95)),
               frames_late=int(sum(x > LATE_MS for x in lat)), frames_timed=len(lat), end_ms=end_ms)


def start_server(model: str, port: int, flags: list[str], timeout: float = 300.0):
    """``avatarforcing serve`` in its own process (its own GIL, as in production), once /healthz answers."""
    import os
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "avatarforcing.cli", "serve", "--model", model, "--port",
                             str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"avatarforcing serve did not start (exit code {proc.poll()})") from None
            time.sleep(0.2)


def _idle(port: int, timeout: float = 20.0) -> None:
    """Wait until the previous sweep's sessions have closed on the server side."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
            if health["sessions"] == 0:
                return
        except OSError:
            pass
        time.sleep(0.2)


def _sweep(port: int, sessions: list[int], seconds: float, label: str) -> list[dict]:
    results = []
    for s in sessions:
        _idle(port)
        outs = [{} for _ in range(s)]
        threads = [threading.Thread(target=_client, args=(f"ws://127.0.0.1:{port}/ws", seconds, o)) for o in outs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [o for o in outs if "fps" in o and o["fps"]]
        results.append({"server": label, "sessions": s, "seconds": seconds, "ok": len(ok),
                        "fps_per_session": [round(o["fps"], 1) for o in ok],
                        "latency_ms_p50": float(np.median([o["latency_ms_p50"] for o in ok])) if ok else None,
                        "latency_ms_p95": float(np.max([o["latency_ms_p95"] for o in ok])) if ok else None,
                        "errors": [o["error"] for o in outs if "error" in o]})
        print(json.dumps(results[-1]), flush=True)
    return results


def _flood(port: int, stop: threading.Event, out: dict) -> None:
    """Waves of 20 concurrent /speak and /prepare requests from one client until ``stop``."""
    import io
    import urllib.request

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (120, 90, 60)).save(buf, format="PNG")
    image = buf.getvalue()
    text = json.dumps({"text": "This is a rather long sentence that the server must turn into speech. " * 6})

    def one(path: str, body: bytes, kind: str) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers={"content-type": kind})
        try:
            urllib.request.urlopen(req, timeout=30).read()
            out["ok"] = out.get("ok", 0) + 1
        except Exception:  # noqa: BLE001 - refusals (503) are what the gates do under a flood
            out["refused"] = out.get("refused", 0) + 1

    while not stop.is_set():
        wave = [threading.Thread(target=one, args=("/speak", text.encode(), "application/json")) for _ in range(10)]
        wave += [threading.Thread(target=one, args=("/prepare", image, "image/png")) for _ in range(10)]
        for t in wave:
            t.start()
        for t in wave:
            t.join()


def _fast_stream(port: int, stop: threading.Event, out: dict) -> None:
    """Another client sending 60 s files as fast as the socket takes them (faster than real time), until ``stop``."""
    from .client import AvatarClient

    t = np.arange(16000 * 60) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)).astype(np.float32)
    while not stop.is_set():
        try:
            for _ in AvatarClient(f"ws://127.0.0.1:{port}/ws").stream((pcm[i:i + 16000] for i in range(0, len(pcm),
                                                                                                     16000)),
                                                                        identity="ada"):
                out["frames"] = out.get("frames", 0) + 1
                if stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - reported, not raised in a thread
            out["error"] = f"{type(e).__name__}: {e}"
            return


NEIGHBOURS = {"alone": None, "beside /speak + /prepare floods": _flood,
              "beside a stream sent faster than real time": _fast_stream}


def _neighbours(port: int, seconds: float) -> list[dict]:
    """One real-time stream alone, then beside floods of /speak and /prepare, then beside another client's stream
    sent at once (the noisy neighbour rows)."""
    rows = []
    for label, neighbour in NEIGHBOURS.items():
        _idle(port)
        out, flood, stop = {}, {}, threading.Event()
        flooder = threading.Thread(target=neighbour, args=(port, stop, flood)) if neighbour else None
        if flooder:
            flooder.start()
            time.sleep(1.0)
        _client(f"ws://127.0.0.1:{port}/ws", seconds, out)
        stop.set()
        if flooder:
            flooder.join()
        rows.append({"server": "single process", "neighbour": label, "seconds": seconds, **out,
                     **({"neighbour_result": flood} if flooder else {})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_serve(model: str = "mini", sessions: list[int] = (1, 2, 4), seconds: float = 10.0,
                json_path: str | None = None, ray_replicas: int | None = None, neighbours: bool = False) -> list[dict]:
    """S real-time clients against ``avatarforcing serve`` started in its own process (its own GIL, as in
    production), for each S in ``sessions``; with ``ray_replicas``, the same sweep against ``serve --ray``
    with that many replicas (sessions per replica: enough for the largest S), in the same run."""
    port = free_port()
    proc = start_server(model, port, ["--max-sessions", str(max(*sessions, 2 if neighbours else 1))])
    try:
        results = _sweep(port, sessions, seconds, "single process")
        if neighbours:
            results += _neighbours(port, seconds)
    finally:
        proc.terminate()
        proc.wait(30)
    if ray_replicas:
        from . import ray as afray
        from .spec import Limits, RayOptions, ServingSpec

        port, per_replica = free_port(), -(-max(sessions) // ray_replicas)
        with afray.running(ServingSpec(model=model, port=port, limits=Limits(max_sessions=per_replica),
                                       ray=RayOptions(replicas=ray_replicas)), log_level="warning"):
            results += _sweep(port, sessions, seconds, f"ray, {ray_replicas} replicas")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results

"""``avatarforcing bench serve``: a bounded load test on 127.0.0.1 (the server in its own process + S real-time
clients, in one run)."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
    lat = []
    for idx, ta in arrivals:  # frame idx needs audio up to (idx + 1)/25 s + look-ahead
        need = (idx + 1) / 25 + look
        k = min(len(sent_at) - 1, int(need * rate / chunk))
        lat.append(1000 * (ta - sent_at[k]))
    dur = arrivals[-1][1] - arrivals[0][1] if len(arrivals) > 1 else float("nan")
    out.update(frames=len(arrivals), fps=(len(arrivals) - 1) / dur if dur == dur and dur > 0 else None,
               latency_ms_p50=float(np.percentile(lat, 50)), latency_ms_p95=float(np.percentile(lat, 95)))


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


def bench_serve(model: str = "mini", sessions: list[int] = (1, 2, 4), seconds: float = 10.0,
                json_path: str | None = None, ray_replicas: int | None = None) -> list[dict]:
    """S real-time clients against ``avatarforcing serve`` started in its own process (its own GIL, as in
    production), for each S in ``sessions``; with ``ray_replicas``, the same sweep against ``serve --ray``
    with that many replicas (sessions per replica: enough for the largest S), in the same run."""
    import os
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "avatarforcing.cli", "serve", "--model", model, "--port",
                             str(port), "--max-sessions", str(max(sessions))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"avatarforcing serve did not start (exit code {proc.poll()})") from None
                time.sleep(0.2)
        results = _sweep(port, sessions, seconds, "single process")
    finally:
        proc.terminate()
        proc.wait(30)
    if ray_replicas:
        from . import ray as afray
        from .spec import Limits, RayOptions, ServingSpec

        port, per_replica = _free_port(), -(-max(sessions) // ray_replicas)
        afray.start(ServingSpec(model=model, port=port, limits=Limits(max_sessions=per_replica),
                                ray=RayOptions(replicas=ray_replicas)))
        try:
            results += _sweep(port, sessions, seconds, f"ray, {ray_replicas} replicas")
        finally:
            afray.stop()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results

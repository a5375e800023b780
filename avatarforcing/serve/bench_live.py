"""``avatarforcing bench serve --live``: how many live sessions one serving process holds in real time, batched
(one model step per due block for every session) against unbatched (each session stepped alone), in one run.

    for dtype/engine in --configs:      (e.g. fp32:eager,bf16:eager,bf16:compiled)
    two server processes: ``serve`` (batched) and ``serve --no-batch`` (unbatched), same flags otherwise
      for K in --sessions, each mode in turn (so drift in the machine's speed hits both alike):
                                        K live clients at once (different identities and seeds), for --seconds:
                                        each says a 2 s utterance every 5 s and listens in between
        per session   fps (frames after the first WARMUP_S / the time they span), lateness of each frame: its
                      arrival minus the pts of its block's last frame (a block's frames are made together), less
                      the smallest such offset after the warm-up (0: as early as the session's earliest; a
                      session that keeps up stays within its jitter, one that does not drifts without bound),
                      p50 / p95 / max; frames the server counted late
        per K         server CPU utilisation (its process's CPU time / wall time / cores); from its /metrics: the
                      batched steps, their mean batch and step time, the share of wall time the model was busy
      realtime_sessions  the largest K at which every session kept >= REALTIME_FPS x fps with p95 lateness under
                         one block (the headline, per dtype/engine/mode, with the device)
      startup_s          the server's start until /healthz answers (a compiled engine compiles its batches first)

The clients run on the same machine as the server (they parse frames, they do not decode JPEG).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from .bench import _idle, start_server
from .http import free_port

WARMUP_S = 3.0  # first seconds of each session not counted (start-up, first frames)
REALTIME_FPS = 0.95  # a session holds real time at >= this fraction of the model's fps ...
MODES = (("batched", []), ("unbatched", ["--no-batch"]))
IDENTITIES = ("demo", "ada", "bo", "cy", "dee", "eli", "fay", "gus")


def _utterance(rate: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.01).astype(np.float32)


def _session(url: str, i: int, seconds: float, out: dict) -> None:
    from .client import LiveClient, LiveFrame

    try:
        with LiveClient(url, identity=IDENTITIES[i % len(IDENTITIES)], seed=i) as live:
            ready = live.ready
            utterance = _utterance(ready["sample_rate"])
            frames, late, t0, say = [], 0, time.monotonic(), 1.0 + 0.37 * i
            while time.monotonic() - t0 < seconds:
                if time.monotonic() - t0 >= say:
                    live.send(utterance)
                    live.segment_end()
                    say += 5.0
                item = live.receive(timeout=0.05)
                if isinstance(item, LiveFrame):
                    frames.append((item.pts, item.received_at - t0))
                elif isinstance(item, dict) and item.get("type") == "stats":
                    late = item["frames_late"]
                elif isinstance(item, dict) and item.get("type") in ("error", "closed"):
                    raise RuntimeError(f"session ended: {item}")
    except Exception as e:  # noqa: BLE001 - reported in the row, not raised in a thread
        out["error"] = f"{type(e).__name__}: {e}"
        return
    # a block's frames are made together: each is due with its block's last frame
    fpb = round(ready["block_ms"] * ready["fps"] / 1000)
    due = [((round(p * ready["fps"]) // fpb + 1) * fpb - 1) / ready["fps"] for p, _ in frames]
    offsets = np.array([a - d for (_, a), d in zip(frames, due)])
    counted = [(p, a) for p, a in frames if a >= WARMUP_S]
    steady = offsets[len(frames) - len(counted):]
    lateness = 1000 * (steady - steady.min()) if counted else np.zeros(0)
    span = counted[-1][1] - counted[0][1] if len(counted) > 1 else float("nan")
    out.update(frames=len(frames), fps=(len(counted) - 1) / span if span == span and span > 0 else 0.0,
               lateness_ms_p50=float(np.percentile(lateness, 50)) if len(lateness) else None,
               lateness_ms_p95=float(np.percentile(lateness, 95)) if len(lateness) else None,
               lateness_ms_max=float(lateness.max()) if len(lateness) else None, frames_late_server=late,
               fps_model=ready["fps"], block_ms=ready["block_ms"])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _engine_counters(port: int) -> dict:
    """The server's scheduler counters from /metrics: batched steps, blocks they carried, their total seconds."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = {"avatarforcing_engine_steps_total": "steps", "avatarforcing_engine_blocks_total": "blocks",
            "avatarforcing_step_latency_seconds_sum": "seconds"}
    return {want[k]: float(v) for k, v in (line.split()[:2] for line in text.splitlines()
                                            if line.split() and line.split()[0] in want)}


def _sweep(port: int, pid: int, sessions: list[int], seconds: float, mode: str) -> list[dict]:
    rows = []
    for k in sessions:
        _idle(port)
        before = _engine_counters(port)
        outs = [{} for _ in range(k)]
        threads = [threading.Thread(target=_session, args=(f"ws://127.0.0.1:{port}/ws", i, seconds, o))
                   for i, o in enumerate(outs)]
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        util = (_cpu_seconds(pid) - cpu0) / wall / (os.cpu_count() or 1)
        after = _engine_counters(port)
        steps = after["steps"] - before["steps"]
        engine = {"engine_steps": int(steps), "mean_batch": round((after["blocks"] - before["blocks"]) / steps, 2)
                  if steps else None, "step_ms_mean": round(1000 * (after["seconds"] - before["seconds"]) / steps, 1)
                  if steps else None, "model_busy": round((after["seconds"] - before["seconds"]) / wall, 3)}
        ok = [o for o in outs if "error" not in o]
        held = len(ok) == k and all(o["fps"] >= REALTIME_FPS * o["fps_model"] and
                                    o["lateness_ms_p95"] is not None and o["lateness_ms_p95"] < o["block_ms"]
                                    for o in ok)
        rows.append({"mode": mode, "sessions": k, "seconds": seconds, "realtime": held,
                     "fps_model": ok[0]["fps_model"] if ok else None, "block_ms": ok[0]["block_ms"] if ok else None,
                     "fps_per_session": [round(o["fps"], 1) for o in ok],
                     "lateness_ms_p95": max((o["lateness_ms_p95"] or 0.0 for o in ok), default=None),
                     "lateness_ms_max": max((o["lateness_ms_max"] or 0.0 for o in ok), default=None),
                     "frames_late_server": sum(o["frames_late_server"] for o in ok), "server_cpu_util": round(util, 3),
                     **engine,
                     "errors": [o["error"] for o in outs if "error" in o]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_live_serve(model: str = "mini", sessions: list[int] = (1, 2, 3, 4), seconds: float = 20.0,
                     configs: list[tuple[str, str]] = (("fp32", "eager"),), device: str = "cpu",
                     json_path: str | None = None) -> dict:
    """For each (dtype, engine variant) in ``configs``, both modes' sweeps and their ``realtime_sessions`` (keyed
    "dtype/engine/mode"); writes ``json_path`` and returns the result."""
    import platform

    import torch

    result = {"model": model, "seconds": seconds, "sessions": list(sessions),
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else
              f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "rows": [], "realtime_sessions": {}}
    for dtype, engine in configs:
        flags = ["--max-sessions", str(max(sessions)), "--dtype", dtype, "--device", device, "--engine", engine]
        servers = {}
        try:
            for mode, extra in MODES:  # both up; the idle one costs nothing while the other is measured
                port, t0 = free_port(), time.monotonic()
                servers[mode] = (port, start_server(model, port, flags + extra, timeout=1800),
                                 round(time.monotonic() - t0, 1))
            rows = []
            for k in sessions:  # the modes alternate per K: a machine whose speed drifts drifts for both
                for mode, _ in MODES:
                    port, proc, started = servers[mode]
                    rows += [dict(r, dtype=dtype, engine=engine, startup_s=started)
                             for r in _sweep(port, proc.pid, [k], seconds, mode)]
        finally:
            for _, proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        result["rows"] += rows
        for mode, _ in MODES:
            held = max((r["sessions"] for r in rows if r["realtime"] and r["mode"] == mode), default=0)
            result["realtime_sessions"][f"{dtype}/{engine}/{mode}"] = held
            print(json.dumps({"dtype": dtype, "engine": engine, "mode": mode, "realtime_sessions": held,
                              "startup_s": servers[mode][2]}), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
        plot(result, Path(json_path).with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    """Per-session fps and p95 lateness against concurrent sessions, one line per dtype/engine/mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in result["realtime_sessions"]:
        dtype, engine, mode = key.split("/")
        rows = [r for r in result["rows"] if (r["dtype"], r["engine"], r["mode"]) == (dtype, engine, mode)]
        ks = [r["sessions"] for r in rows]
        style = "-" if mode == "batched" else "--"
        a.plot(ks, [min(r["fps_per_session"], default=0) for r in rows], style, marker="o", label=key)
        b.plot(ks, [r["lateness_ms_p95"] or 0 for r in rows], style, marker="o", label=key)
    first = result["rows"][0] if result["rows"] else {}
    a.axhline(REALTIME_FPS * first.get("fps_model", 25), color="grey", lw=0.8)
    a.set(xlabel="live sessions", ylabel="fps of the slowest session", title=f"{result['model']}, {result['device']}")
    b.axhline(first.get("block_ms", 160), color="grey", lw=0.8)
    b.set(xlabel="live sessions", ylabel="p95 lateness (ms)", yscale="log", title="lateness (grey: one block)")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

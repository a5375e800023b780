"""``avatarforcing bench live``: the live avatar measured as a voice agent uses it, in one run.

    conversation (real time, wall clock): listening, then utterances pushed at once (as a TTS engine
        delivers them) after silences of 2-4 s; every other one interrupted 1.2 s after it shows
        -> speech latency (push -> first speaking frame emitted), interrupt -> mouth settled (media and
           wall time), A/V offset (speech onset in the frames' PCM -> the mouth opening, read from the pixels),
           frames late, the visual jump at the cut against ordinary frame-to-frame change; p50 / p95
    soak (simulated clock, as fast as it computes): ``soak_minutes`` of 5 s speech / 20 s silence
        -> memory (RSS, Python objects) per simulated minute, frames lost, identity drift and mouth opening
           per state and per minute with 95% bootstrap intervals over the minute's cycles

Writes JSON (and a PNG of the soak) and prints the JSON.
"""

from __future__ import annotations

import json
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..api import Avatar
from ..identities import identity_image
from .metrics import identity_drift, mouth_readings
from .nets import load_eval_nets


def _pcts(values) -> dict:
    v = np.asarray(values, float)
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _utterances(avatar: Avatar, n: int, seconds: float) -> list[np.ndarray]:
    pcm = avatar.load_audio(Path(__file__).parent.parent / "assets" / "demo" / "utterance.wav")
    step = int(seconds * avatar.cfg.codec.sample_rate)
    return [pcm[i * step:(i + 1) * step] for i in range(min(n, len(pcm) // step))]


def conversation(avatar: Avatar, nets, utterances: list[np.ndarray], seed: int = 0, tick_s: float = 0.04) -> dict:
    fps = avatar.cfg.codec.fps
    live = avatar.live(identity_image("demo", avatar.cfg.codec.height), seed=seed)
    block_s, look_s = live.block_s, live.lookahead_ms / 1000
    rng = np.random.default_rng(seed)
    plan, t = [], 3.0
    for i, u in enumerate(utterances):
        plan.append({"at": t, "pcm": u, "interrupt": i % 2 == 1})
        t += len(u) / avatar.cfg.codec.sample_rate + rng.uniform(2.0, 4.0)
    end = t + 2.0
    frames, emitted_at, pending = [], [], list(plan)
    active, cuts = None, []
    t0 = time.perf_counter()
    bar = tqdm(total=round(end * fps), desc="bench live: conversation", unit="frame")
    while True:
        now = time.perf_counter() - t0
        if now >= end:
            break
        if pending and now >= pending[0]["at"]:
            active = pending.pop(0)
            live.push(active["pcm"])
            live.end_segment()
            active["pushed"] = now
        out = live.tick(now)
        wall = time.perf_counter() - t0
        for f in out:
            frames.append(f)
            emitted_at.append(wall)
            if active is not None and f.speaking and "first" not in active:
                active["first"] = (f.index, wall)
        bar.update(len(out))
        if active is not None and active["interrupt"] and "first" in active and "cut" not in active and \
                wall - active["first"][1] >= 1.2:
            active["cut"] = (live.frames, wall)  # the first frame emitted after this is after the cut
            live.interrupt()
            cuts.append(active)
        time.sleep(max(0.0, tick_s - (time.perf_counter() - t0 - now)))
    bar.close()
    images = np.stack([f.image for f in frames])
    opening = mouth_readings(nets, images)[0][:, 0]
    speaking = np.array([f.speaking for f in frames])
    listening = opening[~speaking][fps:]  # after the first second
    band = float(np.percentile(listening, 95)) + 0.02  # the mouth at its silence level
    speech_latency = [u["first"][1] - u["pushed"] for u in plan if "first" in u]
    settle_media, settle_wall, jumps = [], [], []
    diffs = np.abs(np.diff(images.astype(np.float32), axis=0)).mean((1, 2, 3))
    for u in cuts:
        cut, t_int = u["cut"]
        after = opening[cut:]
        stay = 10  # frames it must stay down
        k = next((i for i in range(len(after) - stay) if (after[i:i + stay] <= band).all()), None)
        if k is not None:
            settle_media.append(1000 * (k / fps))
            settle_wall.append(1000 * (emitted_at[cut + k] - t_int))
        if 0 < cut < len(diffs):
            jumps.append(float(diffs[cut - 1]))
    offsets = []
    for u in plan:
        if "first" not in u:
            continue
        onset = u["first"][0]
        pcm = np.concatenate([f.pcm for f in frames[onset:onset + 3 * fps]])
        rms = np.sqrt(np.convolve(pcm ** 2, np.ones(160) / 160, "valid"))
        voiced = np.flatnonzero(rms > 0.02)
        if not len(voiced):
            continue
        speech_frame = onset + voiced[0] // avatar.cfg.codec.samples_per_frame
        lo = max(0, speech_frame - fps)
        opened = np.flatnonzero(opening[lo:speech_frame + fps] > band)
        if len(opened):
            offsets.append(1000 * (lo + opened[0] - speech_frame) / fps)
    lateness = [1000 * (w - f.pts - look_s - block_s) for f, w in zip(frames, emitted_at)]
    return {
        "seconds": end, "frames": len(frames), "utterances": len(plan), "interrupted": len(cuts),
        "lookahead_ms": live.lookahead_ms, "block_ms": 1000 * block_s, "grace_ms": 1000 * live.grace_s,
        "speech_latency_ms": _pcts(1000 * np.array(speech_latency)),
        "speech_latency_bound_ms": 1000 * (block_s + look_s) + float(np.median(list(live.session.stats.dit_ms))),
        "interrupt_settle_media_ms": _pcts(settle_media), "interrupt_settle_wall_ms": _pcts(settle_wall),
        "interrupt_settle_target_ms": 1000 * (look_s + block_s),
        "av_offset_ms": _pcts(offsets), "av_offsets_ms": offsets,
        "cut_jump": {"at_cut": _pcts(jumps), "ordinary_p50": float(np.median(diffs)),
                     "ordinary_p95": float(np.percentile(diffs, 95))},
        "lateness_ms": _pcts(lateness), "frames_late": int(sum(x > 1000 * block_s for x in lateness)),
        "clock_slipped_s": live.slipped_s,  # the clock waited this long for compute (live.py): 0 at real time
        "mouth_open": {"listening": float(listening.mean()), "speaking": float(opening[speaking].mean()),
                       "silence_band": band},
        # a listening face that never changed would be frozen: the frame-to-frame change while listening
        "listening_frame_change": _pcts(diffs[(~speaking[1:]) & (~speaking[:-1])][fps:]),
    }


def _ci(values, rng) -> list[float]:
    v = np.asarray(values, float)
    if len(v) < 2:
        return [float(v.mean()), float(v.mean())] if len(v) else [float("nan")] * 2
    means = v[rng.integers(0, len(v), (2000, len(v)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def soak(avatar: Avatar, nets, minutes: float, seed: int = 0, speech_s: float = 5.0, silence_s: float = 20.0) -> dict:
    """A simulated-clock session of ``minutes``: memory, lost frames, drift and mouth opening per state."""
    fps = avatar.cfg.codec.fps
    reference = identity_image("demo", avatar.cfg.codec.height)
    live = avatar.live(reference, seed=seed)
    utterance = _utterances(avatar, 1, speech_s)[0]
    cycle = speech_s + silence_s
    per_minute, frames_total, t = [], 0, 0.0
    sample: list[tuple[float, bool, np.ndarray]] = []  # one frame a second: (pts, speaking, image)
    tracemalloc.start()
    bar = tqdm(total=round(minutes * 60 * fps), desc="bench live: soak", unit="frame")
    for i in range(int(np.ceil(minutes * 60 / cycle))):  # one utterance at the start of every cycle
        live.push(utterance)
        live.end_segment()
        end = min((i + 1) * cycle, minutes * 60)
        while t < end - 1e-9:
            t = round(t + 0.2, 6)
            for f in live.tick(t):
                frames_total += 1
                if f.index % fps == 0:
                    sample.append((f.pts, f.speaking, f.image.copy()))
                bar.update(1)
            live.events()
            if abs(t / 60 - round(t / 60)) < 1e-9 and t > 0:  # a simulated minute has passed
                kept = sum(x[2].nbytes for x in sample)  # the benchmark's own samples, not the session's
                per_minute.append({"minute": round(t / 60), "rss_mb": _rss_mb(), "frames": frames_total,
                                   "python_mb": (tracemalloc.get_traced_memory()[0] - kept) / 2**20})
    bar.close()
    tracemalloc.stop()
    images = np.stack([s[2] for s in sample])
    opening = mouth_readings(nets, images)[0][:, 0]
    drift = np.array([identity_drift(nets, images[i:i + 1], reference)[0] for i in range(len(images))])
    minute = np.array([int(s[0] // 60) for s in sample])
    state = np.array([s[1] for s in sample])
    rng = np.random.default_rng(0)
    rows = []
    for mm in range(int(np.ceil(minutes))):
        row = {"minute": mm + 1}
        for name, mask in (("listening", ~state), ("speaking", state)):
            sel = (minute == mm) & mask
            row[name] = {"mouth_open": float(opening[sel].mean()) if sel.any() else None,
                         "mouth_open_ci95": _ci(opening[sel], rng),
                         "identity_drift": float(drift[sel].mean()) if sel.any() else None,
                         "identity_drift_ci95": _ci(drift[sel], rng)}
        rows.append(row)
    # the last minute against the first: a difference with its interval (the two minutes are independent samples,
    # each resampled on its own), not two intervals that happen to overlap
    first_last = {}
    for name, mask in (("listening", ~state), ("speaking", state)):
        a, b = (opening[(minute == mm) & mask] for mm in (0, int(np.ceil(minutes)) - 1))
        if len(a) > 1 and len(b) > 1 and minutes > 1:
            diffs = (b[rng.integers(0, len(b), (2000, len(b)))].mean(1)
                     - a[rng.integers(0, len(a), (2000, len(a)))].mean(1))
            first_last[name] = {"mouth_open_diff": float(b.mean() - a.mean()),
                                "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}
    return {"minutes": minutes, "last_minus_first_minute": first_last,
            "pattern": f"{speech_s:g} s speech / {silence_s:g} s silence",
            "frames": frames_total, "media_s": t,
            "frames_expected": f"{int(t * fps)} minus the look-ahead ({live.lookahead_ms:.0f} ms) and at most a block",
            "frames_lost": 0 if frames_total == live.frames else live.frames - frames_total,
            "memory": per_minute, "per_minute": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["soak"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    mins = [r["minute"] for r in s["memory"]]
    a.plot(mins, [r["rss_mb"] for r in s["memory"]], "o-", label="RSS")
    a.plot(mins, [r["python_mb"] for r in s["memory"]], "s-", label="Python objects (session)")
    a.set_xlabel("simulated minute"), a.set_ylabel("MB"), a.legend(), a.set_title("memory of one live session")
    for name in ("listening", "speaking"):
        rows = [r for r in s["per_minute"] if r[name]["mouth_open"] is not None]
        y = [r[name]["mouth_open"] for r in rows]
        lo = [r[name]["mouth_open"] - r[name]["mouth_open_ci95"][0] for r in rows]
        hi = [r[name]["mouth_open_ci95"][1] - r[name]["mouth_open"] for r in rows]
        b.errorbar([r["minute"] for r in rows], y, yerr=[lo, hi], fmt="o-", capsize=3, label=name)
    b.set_xlabel("simulated minute"), b.set_ylabel("mouth opening (reader)"), b.legend()
    b.set_title(s["pattern"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_live(model: str = "mini", utterances: int = 8, utterance_s: float = 2.5, soak_minutes: float = 10.0,
               json_path: str | None = None, device: str = "cpu") -> dict:
    avatar = Avatar.load(model, device)
    nets = load_eval_nets().to(device)
    result = {"model": model, "device": device,
              "conversation": conversation(avatar, nets, _utterances(avatar, utterances, utterance_s))}
    if soak_minutes:
        result["soak"] = soak(avatar, nets, soak_minutes)
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
        if soak_minutes:
            plot(result, Path(json_path).with_suffix(".png"))
    return result

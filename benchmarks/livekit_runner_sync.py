"""Audio/video sync of the LiveKit generator inside LiveKit's own AvatarRunner, paced (as shipped) and unpaced
(each block of frames handed on as the session makes it), in one run.

No LiveKit server can run here: the runner gets a stand-in room (connected; tracks publish at once), and the
measure is taken where LiveKit timestamps the two tracks: per frame of speech, when the runner's video source
captured its image minus when its voice starts playing from the runner's audio source (now + the audio queued
ahead of it, when it was queued). A subscriber's own jitter buffers come on top of that.

    .venv/bin/python benchmarks/livekit_runner_sync.py [--model mini] [--seconds 20]
      -> benchmarks/results/livekit_runner_sync_cpu.json and .png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

from avatarforcing.api import Avatar
from avatarforcing.identities import identity_image
from avatarforcing.integrations.driver import float_to_s16
from avatarforcing.integrations.livekit import QUEUE_MS, AvatarForcingVideoGenerator, avatar_options

OUT = Path(__file__).parent / "results" / "livekit_runner_sync_cpu"


class _Publication:
    async def wait_for_subscription(self):
        pass


class _Participant:
    async def publish_track(self, track, options):
        return _Publication()


class StandInRoom(rtc.EventEmitter):
    def __init__(self):
        super().__init__()
        self.local_participant = _Participant()

    def isconnected(self):
        return True


def speech(seconds: float, rate: int = 24000) -> np.ndarray:
    """A voiced test signal at a TTS rate: 180 Hz with harmonics, syllable-rate amplitude."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 6))
    return (0.2 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


async def run(avatar, image, seconds: float, paced: bool) -> list[tuple[float, float]]:
    """(seconds since the utterance was pushed, offset ms) per frame of speech."""
    captured, voice, last = {}, [], []
    audio = QueueAudioOutput(sample_rate=avatar.cfg.codec.sample_rate)
    gen = AvatarForcingVideoGenerator(avatar, image, seed=0)
    if not paced:
        async def at_once(pts):
            return None

        gen._pacer.wait = at_once
    runner = AvatarRunner(StandInRoom(), audio_recv=audio, video_gen=gen, options=avatar_options(avatar),
                          _queue_size_ms=QUEUE_MS)
    video_source, audio_source, push = runner._video_source, runner._audio_source, runner.av_sync.push
    capture = video_source.capture_frame

    def recording_capture(frame, *args, **kwargs):
        captured[id(frame)] = time.monotonic()
        return capture(frame, *args, **kwargs)

    async def recording_push(frame, *args):
        await push(frame, *args)
        if isinstance(frame, rtc.VideoFrame):
            last[:] = [frame]
        else:
            voice.append((last[0], time.monotonic() + audio_source.queued_duration - frame.duration))

    video_source.capture_frame, runner.av_sync.push = recording_capture, recording_push
    await runner.start()
    try:
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        x = speech(seconds)
        for i in range(0, len(x), 480):  # 20 ms frames, as a TTS plugin sends them
            chunk = x[i:i + 480]
            await audio.capture_frame(rtc.AudioFrame(float_to_s16(chunk), 24000, 1, len(chunk)))
        audio.flush()
        while len(voice) < seconds * avatar.cfg.codec.fps - 2 and time.monotonic() - t0 < 3 * seconds + 10:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    finally:
        await runner.aclose()
    return [(t - t0, 1000 * (captured[id(v)] - t)) for v, t in voice if id(v) in captured]


def summary(rows: list[tuple[float, float]]) -> dict:
    off = np.array([o for _, o in rows])
    return {"frames": len(off), "median_ms": round(float(np.median(off)), 1),
            "p5_ms": round(float(np.percentile(off, 5)), 1), "p95_ms": round(float(np.percentile(off, 95)), 1),
            "min_ms": round(float(off.min()), 1), "max_ms": round(float(off.max()), 1),
            "within_40ms": int((np.abs(off) <= 40).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the utterance")
    args = ap.parse_args()
    avatar = Avatar.load(args.model)
    image = identity_image("demo", avatar.cfg.codec.height)
    results = {}
    for paced in (True, False):
        name = "paced" if paced else "unpaced"
        print(f"{name}: one {args.seconds:g} s utterance through AvatarRunner ...", flush=True)
        rows = asyncio.run(run(avatar, image, args.seconds, paced))
        results[name] = {**summary(rows), "series": [(round(t, 3), round(o, 1)) for t, o in rows]}
        print(name, json.dumps(summary(rows)), flush=True)
    out = {"command": f"benchmarks/livekit_runner_sync.py --model {args.model} --seconds {args.seconds:g}",
           "machine": f"cpu, {platform.processor() or platform.machine()}", "model": args.model,
           "measure": "video capture time minus voice playout start, per frame of speech (ms; > 0: image late)",
           **results}
    OUT.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in ("unpaced", "paced"):
        t, o = zip(*results[name]["series"])
        ax.plot(t, o, ".", ms=3, label=name)
    ax.axhspan(-40, 40, color="0.9", zorder=0)
    ax.set(xlabel="s since the utterance was pushed", ylabel="image - voice (ms)",
           title=f"AvatarRunner A/V offset, {args.model}, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=100)
    print("wrote", OUT.with_suffix(".json"), OUT.with_suffix(".png"))


if __name__ == "__main__":
    main()

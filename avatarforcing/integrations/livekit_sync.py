"""``avatarforcing bench livekit-sync``: audio/video sync of the LiveKit generator inside LiveKit's own
AvatarRunner, paced (as shipped) and handed on as made (a block of frames at once), in one run.

No LiveKit server can run here: the runner gets a stand-in room (``StandInRoom``: connected, tracks publish at
once), and the measure is taken where LiveKit timestamps the two tracks: per frame of speech, when the runner's
video source captured its image minus when its voice starts playing from the runner's audio source (now + the
audio queued ahead of it, when it was queued); > 0: the image is late. A subscriber's jitter buffers come on top.

    avatarforcing bench livekit-sync [--model mini] [--seconds 20] [--json out.json]   (+ a PNG beside the JSON)
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

from .driver import float_to_s16
from .livekit import QUEUE_MS, AvatarForcingVideoGenerator, avatar_options

TTS_RATE, TTS_FRAME = 24000, 480  # what a TTS plugin sends: 24 kHz, 20 ms frames


class _Publication:
    async def wait_for_subscription(self) -> None:
        pass


class _Participant:
    async def publish_track(self, track, options) -> _Publication:
        return _Publication()


class StandInRoom(rtc.EventEmitter):
    """What AvatarRunner uses of a room: connected, and tracks that publish at once (nothing leaves)."""

    def __init__(self):
        super().__init__()
        self.local_participant = _Participant()

    def isconnected(self) -> bool:
        return True


def tts_speech(seconds: float) -> list[rtc.AudioFrame]:
    """A voiced test signal as a TTS sends it: 180 Hz with harmonics at a syllable-rate amplitude."""
    t = np.arange(int(seconds * TTS_RATE)) / TTS_RATE
    x = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 6))
    x = (0.2 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    return [rtc.AudioFrame(float_to_s16(x[i:i + TTS_FRAME]), TTS_RATE, 1, len(x[i:i + TTS_FRAME]))
            for i in range(0, len(x), TTS_FRAME)]


async def runner_offsets(avatar, image, seconds: float, paced: bool = True, seed: int = 0) -> list[tuple]:
    """One utterance of ``seconds`` through AvatarRunner: (seconds since it was pushed, offset ms) per frame of
    speech."""
    captured, voice, last = {}, [], []
    audio = QueueAudioOutput(sample_rate=avatar.cfg.codec.sample_rate)
    gen = AvatarForcingVideoGenerator(avatar, image, seed=seed, paced=paced)
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
            last[:] = [frame]  # kept alive: its id stays its own
        else:
            voice.append((last[0], time.monotonic() + audio_source.queued_duration - frame.duration))

    video_source.capture_frame, runner.av_sync.push = recording_capture, recording_push
    await runner.start()
    try:
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        for f in tts_speech(seconds):
            await audio.capture_frame(f)
        audio.flush()
        want = seconds * avatar.cfg.codec.fps - 2
        while len(voice) < want and time.monotonic() - t0 < 3 * seconds + 10:  # (a slow CPU slips: wait for it)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    finally:
        await runner.aclose()
    return [(t - t0, 1000 * (captured[id(v)] - t)) for v, t in voice if id(v) in captured]


def summary(rows: list[tuple]) -> dict:
    off = np.array([o for _, o in rows])
    return {"frames": len(off), "within_40ms": int((np.abs(off) <= 40).sum()),
            "median_ms": round(float(np.median(off)), 1), "p5_ms": round(float(np.percentile(off, 5)), 1),
            "p95_ms": round(float(np.percentile(off, 95)), 1), "min_ms": round(float(off.min()), 1),
            "max_ms": round(float(off.max()), 1)}


def bench_livekit_sync(model: str, seconds: float, json_path: str | None) -> dict:
    from ..api import Avatar
    from ..identities import identity_image

    avatar = Avatar.load(model)
    image = identity_image("demo", avatar.cfg.codec.height)
    result = {"command": f"avatarforcing bench livekit-sync --model {model} --seconds {seconds:g}",
              "machine": f"cpu, {platform.processor() or platform.machine()}",
              "measure": "per frame of speech: image captured by the runner's video source minus its voice's playout "
                         "start from the runner's audio source (ms; > 0: the image is late)"}
    for paced in (True, False):
        name = "paced" if paced else "as_made"
        print(f"{name}: one {seconds:g} s utterance through LiveKit's AvatarRunner ...", flush=True)
        rows = asyncio.run(runner_offsets(avatar, image, seconds, paced))
        result[name] = {**summary(rows), "series": [(round(t, 3), round(o, 1)) for t, o in rows]}
        print(name, json.dumps(summary(rows)), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        _plot(result, model, Path(json_path).with_suffix(".png"))
    return result


def _plot(result: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in ("as_made", "paced"):
        t, o = zip(*result[name]["series"])
        ax.plot(t, o, ".", ms=3, label=name.replace("_", " "))
    ax.axhspan(-40, 40, color="0.9", zorder=0)
    ax.set(xlabel="s since the utterance was pushed", ylabel="image - voice (ms)",
           title=f"A/V offset inside LiveKit's AvatarRunner, {model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The WebRTC media clock (serve/rtc_media.py): a frame's image and its voice carry the same stamp, even when the
compute falls behind and the timeline moves."""

import asyncio
import time

import numpy as np

from avatarforcing.serve.rtc_media import VIDEO_CLOCK, MediaClock

FPS, RATE = 25, 16000
SPF = RATE // FPS  # samples per frame


async def _run(stalls: dict[int, float], slow_video: dict[int, float], frames: int = 24):
    """Frames put at real-time pace after a head start, with extra stalls (s) before some (the compute behind);
    both tracks read at once, the video reader pausing after some frames (a slow encoder). Each frame's PCM is a
    constant that names it, so the audio parts say which frame's voice they carry."""
    clock = MediaClock(FPS, RATE)
    clock.origin = time.monotonic() + 0.05
    video, audio = [], []

    async def produce():
        for i in range(frames):
            await asyncio.sleep(stalls.get(i, 0.0))
            await asyncio.sleep(max(0.0, clock.origin + clock.shift + i / FPS - 0.01 - time.monotonic()))
            clock.put(i, np.full((8, 8, 3), i, np.uint8), np.full(SPF, (i + 1) / 1000, np.float32))
        await asyncio.sleep(0.3)
        clock.close()

    async def read_video():
        while (f := await clock.next_video()) is not None:
            video.append((f.pts / VIDEO_CLOCK, int(f.to_ndarray(format="rgb24")[0, 0, 0])))
            await asyncio.sleep(slow_video.get(len(video) - 1, 0.0))

    async def read_audio():
        while (f := await clock.next_audio()) is not None:
            audio.append((f.pts / RATE, int(round(f.to_ndarray()[0, 0] / 32767 * 1000)) - 1))

    await asyncio.gather(produce(), read_video(), read_audio())
    return video, audio, clock


def _first_parts(audio):
    first = {}
    for t, i in audio:
        if i >= 0:
            first.setdefault(i, t)
    return first


def test_each_frames_voice_has_the_frames_stamp_when_the_timeline_moves():
    """Stalls of 130 ms and 25 ms (the compute behind; frame 6 comes 80 ms after its time) move the timeline,
    and the video reader is once 110 ms late (a slow encoder: frame 19 is read 70 ms after its time): the timeline
    moves by whole audio parts, so the first part of frame i's voice is stamped exactly with frame i's video stamp
    (no fraction of a part between the tracks), except for the frames whose voice had already gone out when frame
    19 was read (off by the move, then in sync again); the gaps are silence and every frame's voice arrives whole
    and in order."""
    video, audio, clock = asyncio.run(_run({6: 0.13, 14: 0.025}, {18: 0.11}))
    assert [i for _, i in video] == list(range(24))
    first = _first_parts(audio)
    assert sorted(first) == list(range(24))
    off = {i: round(t - first[i], 9) for t, i in video if abs(t - first[i]) > 1e-9}
    assert set(off) <= {19, 20} and all(0 < d <= 0.1 for d in off.values()), off
    voiced = [i for _, i in audio if i >= 0]
    assert voiced == sorted(voiced) and all(voiced.count(i) == SPF // (RATE // 50) for i in range(24))
    assert clock.shift >= 0.08 and abs(clock.shift / 0.02 - round(clock.shift / 0.02)) < 1e-6  # whole parts


def test_an_interrupt_mutes_the_voice_queued_on_the_tracks():
    """The voice already queued for the peer (the send margin ahead of the compute: ~300 ms, more when the timeline
    moved) is not sent after an interrupt: every part not yet sent goes out silent, the video as made, and the
    frames put afterwards speak again. Before, the peer heard the queued speech to its end (267 ms median)."""
    async def main():
        clock = MediaClock(FPS, RATE)
        clock.origin = time.monotonic()
        for i in range(10):  # 400 ms of speech queued ahead of the send time
            clock.put(i, np.full((8, 8, 3), i, np.uint8), np.full(SPF + (i == 0) * 7, 0.5, np.float32))
        first = await clock.next_audio()  # one part already on its way
        clock.mute()
        clock.put(10, np.full((8, 8, 3), 10, np.uint8), np.full(SPF, 0.25, np.float32))
        parts = [await clock.next_audio() for _ in range(21)]
        videos = [await clock.next_video() for _ in range(11)]
        clock.close()
        return first, parts, videos

    first, parts, videos = asyncio.run(main())
    assert np.abs(first.to_ndarray()).min() > 0  # sent before the interrupt: as made
    levels = [np.abs(p.to_ndarray()).max() / 32767 for p in parts]
    assert levels[:19] == [0.0] * 19  # the rest of the queued speech: silence, the 7 samples still pending too
    assert abs(levels[19] - 0.25) < 0.01 and abs(levels[20] - 0.25) < 0.01  # frame 10 (after): its own voice
    assert [int(v.to_ndarray(format="rgb24")[0, 0, 0]) for v in videos] == list(range(11))

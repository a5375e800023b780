"""The avatar as a LiveKit Agents ``VideoGenerator`` (``pip install 'avatarforcing[livekit]'``): the agent's host
runs the model, the shape of LiveKit's own in-process avatar plugins.

    audio = QueueAudioOutput(sample_rate=16000, wait_playback_start=True)    # the agent's audio tail
    runner = AvatarRunner(room, audio_recv=audio,
                          video_gen=AvatarForcingVideoGenerator(Avatar.load("mini"), "portrait.jpg"),
                          options=avatar_options(avatar), _queue_size_ms=QUEUE_MS)
    await runner.start()
    session.output.audio = audio   # (or agent_session.output.replace_audio_tail(audio))

    push_audio(rtc.AudioFrame)     the agent's speech, any rate and channel count (resampled, mixed to mono)
    push_audio(AudioSegmentEnd())  the utterance ends: its last block is not held back
    clear_buffer()                 interrupt: queued speech dropped, what is not on a frame yet muted; no
                                   AudioFrame of the dropped speech is yielded after it (the runner reports
                                   the interrupted playback from the audio it forwarded)
    async for item in generator    per video frame, always (25 fps; listening when there is no speech):
                                   rtc.VideoFrame (RGB24), then, for frames that show speech, the rtc.AudioFrame
                                   it shows (16 kHz); AudioSegmentEnd after the last frame of an utterance that
                                   played out (an interrupted one ends with the runner's clear_buffer instead)

The runner's AVSynchronizer holds ``video_queue_size_ms`` of video (100 ms = 2 frames at 25 fps by default):
the generator makes a block of frames at a time (160 ms for ``mini``), so give it ``QUEUE_MS``.
"""

from __future__ import annotations

import asyncio

import numpy as np

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("the LiveKit generator needs livekit-agents: pip install 'avatarforcing[livekit]'") from e

from ..live import LiveFrame, PlaybackFinished
from .driver import LiveDriver, float_to_s16, s16_to_float
from .pacing import Pacer

QUEUE_MS = 400  # the synchronizer's video queue: two blocks of 160 ms and some
MAX_AHEAD_S = 2.0  # frames made but held back by the pacing: at most this much (it holds one block normally)


def avatar_options(avatar) -> AvatarOptions:
    """The runner's options for this model: its frame size and rate, its audio rate, mono."""
    c = avatar.cfg.codec
    return AvatarOptions(video_width=c.width, video_height=c.height, video_fps=c.fps,
                         audio_sample_rate=c.sample_rate, audio_channels=1)


class AvatarForcingVideoGenerator(VideoGenerator):
    """One live session on this host behind LiveKit's VideoGenerator interface."""

    def __init__(self, avatar, image, *, seed: int = 0, prompt: str | None = None, paced: bool = True):
        """``paced``: each frame handed on at its own time (pacing.py); False: as the session makes them, a block
        at once (the runner's audio and video queues then drift apart; ``bench livekit-sync`` compares them)."""
        self._driver = LiveDriver(avatar, image, seed=seed, prompt=prompt)
        self._paced = paced
        c = avatar.cfg.codec
        self._rate = c.sample_rate
        block = avatar.cfg.stream.block_frames * c.temporal_stride  # frames a model step makes at once
        self._pacer = Pacer(slack_s=block / c.fps)  # one block
        self._max_ahead = round(MAX_AHEAD_S * c.fps)  # frames made and not handed on (more: the runner stalled)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self._driver.end_segment()
            return
        self._driver.push(s16_to_float(bytes(frame.data.cast("B")), frame.num_channels), frame.sample_rate)

    def clear_buffer(self) -> None:
        self._driver.interrupt()

    async def aclose(self) -> None:
        """End the stream: the iterator yields the window's last frames, then stops."""
        self._driver.close()

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        made: asyncio.Queue = asyncio.Queue(maxsize=self._max_ahead)

        async def make():  # the session's clock runs on, whatever the pacing holds back
            try:
                async for item in self._driver.run():
                    await made.put((item, self._driver.interrupts))
            except Exception as e:  # noqa: BLE001 - raised to the runner by the iterator below
                await made.put((e, 0))
                return
            await made.put((None, 0))

        maker = asyncio.ensure_future(make())
        try:
            while True:
                item, asked = await made.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, LiveFrame):
                    if self._paced:  # each frame at its time: the runner's queues stay shallow
                        await self._pacer.wait(item.pts)
                    h, w = item.image.shape[:2]
                    yield rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(item.image).tobytes())
                    if item.speaking and self._driver.interrupts == asked:  # (no clear_buffer since it was made)
                        yield rtc.AudioFrame(float_to_s16(item.pcm), self._rate, 1, len(item.pcm))
                elif isinstance(item, PlaybackFinished) and not item.interrupted and self._driver.interrupts == asked:
                    yield AudioSegmentEnd()
        finally:
            maker.cancel()

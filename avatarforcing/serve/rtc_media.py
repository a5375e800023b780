"""The avatar as two WebRTC tracks on one media clock, and the microphone track as speech in (aiortc).

    live session frames (index, pts, image, pcm)            MediaClock.put (the peer's pump, webrtc.py)
         |-- video: one frame per 1/fps           -> AvatarTrack("video").recv -> VP8, RTP clock 90 kHz
         '-- audio: the frame's PCM in 20 ms parts -> AvatarTrack("audio").recv -> Opus, RTP clock 48 kHz

Sync: a frame's image and its PCM carry the same media time (the live session's pts: the PCM is exactly the
audio the frame shows). Both tracks are sent on one timeline, wall time = ``origin + shift + media time``, and
stamped with it (video pts; audio by its sample count), so each track's RTP clock follows the wall clock and
aiortc's RTCP sender reports map both alike: the receiver (a browser) plays them in sync.
``origin`` = the session's clock start + the look-ahead + one block (when a frame exists at the earliest) +
``Limits.rtc_margin_ms`` of slack for the step's compute. The audio track is the clock: it sends a 20 ms part
every 20 ms whatever happens. When the compute falls further behind (a part's voice is not there at its time),
it sends silence and the timeline (``shift``) moves by that part for both tracks; when the video is read a frame
late (its frame came late, a slow encoder, a busy loop), the timeline moves by the delay rounded up to whole
parts: the audio track fills the gap with silence, the video holds its last frame, and the stream goes on in
sync, that much later (late frames are counted in ``frames_late``). Restamping beats sending a frame late on its
old stamp: a browser drops or shows late a frame that arrives after its render time (measured: fewer frames
presented, worse offsets). ``shift`` is always a whole number of parts, so each part of the voice starts exactly
on its frame's stamp; only the frames whose voice was already sent when the timeline moved are off, by the move.

Interrupt (``mute``): the voice queued and not sent yet becomes silence at once, so what the peer hears stops
within what is already on its way (the network and its jitter buffer), not after the queued margin.

Bounded: a track that is not read (a peer that never connected, or negotiated only one kind) keeps at most
``MAX_QUEUED_S`` of media; older items are dropped.

Incoming: ``read_microphone`` resamples the peer's audio track (any rate, channels) to the model's rate and
pushes it as speech; any other incoming track is read and discarded (its frames would otherwise pile up).
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections import deque

import numpy as np

AUDIO_PART_S = 0.02  # audio frames of 20 ms: Opus's frame
VIDEO_CLOCK = 90_000  # RTP video clock (Hz)
MAX_QUEUED_S = 5.0  # media kept for a track that is not being read


class MediaClock:
    """The frames of one live session, waiting for their send time, per track kind."""

    def __init__(self, fps: int, rate: int):
        self.fps, self.rate = fps, rate
        self.part = round(AUDIO_PART_S * rate)  # samples per audio frame
        self.origin: float | None = None  # monotonic time of media time 0 (set when the session's clock starts)
        self.video: deque = deque()  # (media time, av.VideoFrame)
        self.audio: deque = deque()  # (media time, av.AudioFrame)
        self.pending = np.zeros(0, np.int16)  # PCM not yet cut into a whole 20 ms part
        self.samples = 0  # samples cut into audio frames so far (their media time)
        self.shift = 0.0  # how much later than planned the timeline runs (s): the compute's delays so far
        self.sent = 0  # audio samples sent (the timeline's clock: one 20 ms part every 20 ms)
        self.changed = asyncio.Event()
        self.closed = False

    def put(self, index: int, image: np.ndarray, pcm: np.ndarray) -> None:
        """One live frame: its image at ``index / fps``, its PCM continuing the audio track."""
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.video.append((index / self.fps, frame))
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        self.pending = np.concatenate([self.pending, s16])
        while len(self.pending) >= self.part:
            part, self.pending = self.pending[:self.part], self.pending[self.part:]
            audio = av.AudioFrame.from_ndarray(part[None, :], format="s16", layout="mono")
            audio.sample_rate, audio.time_base = self.rate, fractions.Fraction(1, self.rate)
            self.audio.append((self.samples / self.rate, audio))
            self.samples += self.part
        for q in (self.video, self.audio):  # bounded: a track nobody reads
            while q and q[-1][0] - q[0][0] > MAX_QUEUED_S:
                q.popleft()
        self.changed.set()

    def mute(self) -> None:
        """Interrupt: the voice queued and not sent yet becomes silence (the video goes on as made)."""
        self.pending[:] = 0
        for _, frame in self.audio:
            frame.planes[0].update(bytes(frame.planes[0].buffer_size))

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def _wait(self, ready) -> bool:
        """Until ``ready()`` (and the clock has its origin); False once closed."""
        while not (self.origin is not None and ready()):
            if self.closed:
                return False
            self.changed.clear()
            await self.changed.wait()
        return True

    async def next_video(self):
        """The next frame at its send time, stamped with it (None once closed)."""
        if not await self._wait(lambda: bool(self.video)):
            return None
        media_time, frame = self.video.popleft()
        late = time.monotonic() - (self.origin + self.shift + media_time)
        if late > 1 / self.fps:  # behind by a frame: the whole timeline moves, both tracks alike, by whole audio
            step = self.part / self.rate  # parts (the voice's parts then start exactly on their frames' stamps)
            self.shift += math.ceil(late / step) * step
        await _until(self.origin + self.shift + media_time)
        frame.pts = round((media_time + self.shift) * VIDEO_CLOCK)
        return frame

    async def next_audio(self):
        """The next 20 ms of the voice at its send time: the frames' PCM, or silence where there is none yet."""
        import av

        if not await self._wait(lambda: bool(self.audio) or not self.closed):  # once closed: what is left
            return None
        at = self.sent / self.rate  # this part's time on the timeline (media time + shift)
        await _until(self.origin + at)
        half = self.part / self.rate / 2
        if self.audio and self.audio[0][0] + self.shift <= at + half:
            media_time, frame = self.audio.popleft()
            self.shift = max(self.shift, at - media_time)  # never earlier than the timeline
        else:
            if not self.audio:  # not made yet: the compute is behind, the timeline moves on with silence
                self.shift += self.part / self.rate
            frame = av.AudioFrame.from_ndarray(np.zeros((1, self.part), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.time_base = self.rate, fractions.Fraction(1, self.rate)
        frame.pts = self.sent
        self.sent += self.part
        return frame


async def _until(t: float) -> None:
    wait = t - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)


def avatar_track(clock: MediaClock, kind: str):
    """An aiortc track of ``kind`` reading ``clock``."""
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class AvatarTrack(MediaStreamTrack):
        def __init__(self):
            super().__init__()
            self.kind = kind

        async def recv(self):
            item = await (clock.next_video() if kind == "video" else clock.next_audio())
            if item is None:
                self.stop()
                raise MediaStreamError
            return item

    return AvatarTrack()


async def read_microphone(track, rate: int, push) -> None:
    """The peer's audio track -> float32 mono at ``rate`` -> ``push(pcm)``, until the track ends."""
    import av
    from aiortc.mediastreams import MediaStreamError

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        for out in resampler.resample(frame):
            push(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))


async def discard(track) -> None:
    """Read and drop a track the server does not use (a peer's camera)."""
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return

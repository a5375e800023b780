"""The avatar as a Pipecat video service (``pip install 'avatarforcing[pipecat]'``): the model runs on this host.

    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts,
                         AvatarForcingVideoService(Avatar.load("mini"), "portrait.jpg"),
                         transport.output(), assistant_aggregator])

    in   TTSAudioRawFrame (s16, any rate: resampled)   -> the live session's speech (not passed on)
         TTSStoppedFrame                                -> the utterance ends (its last block is not held back)
         InterruptionFrame / UserStartedSpeakingFrame   -> interrupt (queued speech dropped, the rest muted),
                                                           then passed on
         anything else                                  -> passed on
    out  per video frame, always (25 fps, listening when there is no speech):
           TTSAudioRawFrame  the exact PCM the frame shows (16 kHz s16), only for frames that show speech: the
                             original TTS audio is replaced by the avatar's, so mouth and voice stay in sync
           OutputImageRawFrame  RGB, ``pts`` on the session's media clock; frames that show speech are
                                ``sync_with_audio`` (shown after the audio before them has been sent)

Set the output transport's ``video_out_framerate`` to 25 and ``video_out_width/height`` to the model's size.
"""

from __future__ import annotations

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
        UserStartedSpeakingFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("the Pipecat service needs pipecat-ai: pip install 'avatarforcing[pipecat]'") from e

from ..live import LiveFrame
from .driver import LiveDriver, float_to_s16, s16_to_float


class AvatarForcingVideoService(AIService):
    """TTS audio in, the avatar's frames and its synced audio out, from one live session on this host."""

    def __init__(self, avatar, image, *, seed: int = 0, prompt: str | None = None, **kwargs):
        kwargs.setdefault("settings", ServiceSettings(model=None))  # runs on this host: no remote model name
        super().__init__(**kwargs)
        self._driver = LiveDriver(avatar, image, seed=seed, prompt=prompt)
        self._rate = avatar.cfg.codec.sample_rate
        self._task = None

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self._driver.open()
        self._task = self.create_task(self._pump())

    async def stop(self, frame: EndFrame):
        """The window drains: the last frames go out before the end."""
        await super().stop(frame)
        if self._task is not None:
            self._driver.close()
            await self._task
            self._task = None

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._driver.push(s16_to_float(frame.audio, frame.num_channels), frame.sample_rate)
            return  # the avatar's own audio, in sync with its frames, replaces it
        if isinstance(frame, TTSStoppedFrame):
            self._driver.end_segment()
        elif isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            self._driver.interrupt()
        await self.push_frame(frame, direction)

    async def _pump(self):
        async for item in self._driver.run():
            if isinstance(item, LiveFrame):
                await self._emit(item)

    async def _emit(self, f: LiveFrame):
        h, w = f.image.shape[:2]
        image = OutputImageRawFrame(image=f.image.tobytes(), size=(w, h), format="RGB")
        image.pts = round(f.pts * 1e9)  # nanoseconds, Pipecat's clock unit
        if f.speaking:
            await self.push_frame(TTSAudioRawFrame(audio=float_to_s16(f.pcm), sample_rate=self._rate,
                                                   num_channels=1))
            image.sync_with_audio = True
        await self.push_frame(image)

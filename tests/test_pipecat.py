"""The Pipecat video service (avatarforcing/integrations/pipecat.py), driven by Pipecat's own test runner with no
transport: TTS audio in -> the avatar's frames and its synced audio out; segment end; interruption."""

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed (pip install 'avatarforcing[pipecat]')")

from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from avatarforcing.integrations.driver import float_to_s16, s16_to_float  # noqa: E402
from avatarforcing.integrations.pipecat import AvatarForcingVideoService  # noqa: E402

from .conftest import tts_chunks  # noqa: E402

TTS_RATE = 24000


@pytest.fixture
def avatar(tiny_avatar):
    return tiny_avatar


def _tts(seconds):
    return [TTSAudioRawFrame(audio=float_to_s16(c), sample_rate=TTS_RATE, num_channels=1)
            for c in tts_chunks(seconds, TTS_RATE)]


def _service(avatar):
    return AvatarForcingVideoService(avatar, np.full((64, 64, 3), 128, np.uint8), seed=3)


def _spoken(frames):
    return [f for f in frames if isinstance(f, TTSAudioRawFrame)]


def test_tts_audio_becomes_frames_and_the_same_audio_in_sync(avatar):
    down, _ = asyncio.run(run_test(_service(avatar), frames_to_send=[TTSStartedFrame(), *_tts(1.0), TTSStoppedFrame(),
                                                                     SleepFrame(sleep=2.5)]))
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    c = avatar.cfg.codec
    assert len(images) >= 2.0 * 25 and all(f.size == (c.width, c.height) and f.format == "RGB" for f in images)
    assert all(len(f.image) == c.width * c.height * 3 for f in images)
    pts = [f.pts for f in images]
    assert pts == [round(i * 0.04e9) for i in range(len(images))]  # the media clock, 40 ms apart
    audio = _spoken(down)
    assert all(a.sample_rate == 16000 and a.num_channels == 1 for a in audio)  # the TTS's own frames never pass
    spoken = np.concatenate([s16_to_float(a.audio, 1) for a in audio])
    assert abs(np.count_nonzero(spoken) - 16000) <= 2  # the whole utterance, once, at the model's rate
    for i, f in enumerate(down):  # every frame of speech: its audio, then its image (shown after that audio)
        if isinstance(f, TTSAudioRawFrame):
            assert isinstance(down[i + 1], OutputImageRawFrame) and down[i + 1].sync_with_audio
    assert any(isinstance(f, TTSStartedFrame) for f in down) and any(isinstance(f, TTSStoppedFrame) for f in down)


def test_an_interruption_stops_the_speech_at_once(avatar):
    frames = [TTSStartedFrame(), *_tts(4.0), SleepFrame(sleep=1.5), InterruptionFrame(), SleepFrame(sleep=1.5)]
    down, _ = asyncio.run(run_test(_service(avatar), frames_to_send=frames))
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))  # passed on
    spoken_before = sum(len(a.audio) // 2 for a in _spoken(down[:cut]))
    after = down[cut:]
    assert 0 < spoken_before < 4.0 * 16000
    # none of the dropped speech after it, not even what was in flight (its frames come without their speech)
    assert _spoken(after) == []
    images_after = [f for f in after if isinstance(f, OutputImageRawFrame)]
    assert len(images_after) >= 25 and not any(f.sync_with_audio for f in images_after)

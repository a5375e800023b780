"""The LiveKit Agents VideoGenerator (avatarforcing/integrations/livekit.py), driven the way AvatarRunner drives
it (audio frames and segment ends pushed from one task, the generator iterated in another; clear_buffer on a
barge-in). No LiveKit server can run here: a real-room test runs only when LIVEKIT_URL is given."""

import asyncio
import os

import numpy as np
import pytest

rtc = pytest.importorskip("livekit.rtc", reason="the livekit extra is not installed (pip install "
                                                "'avatarforcing[livekit]')")
pytest.importorskip("livekit.agents", reason="the livekit extra is not installed")

from livekit.agents.voice.avatar import AudioSegmentEnd  # noqa: E402

from avatarforcing.integrations.driver import float_to_s16, s16_to_float  # noqa: E402
from avatarforcing.integrations.livekit import AvatarForcingVideoGenerator, avatar_options  # noqa: E402

from .conftest import tts_chunks  # noqa: E402

RATE = 24000


@pytest.fixture
def avatar(tiny_avatar):
    return tiny_avatar


def _frames(seconds):
    return [rtc.AudioFrame(float_to_s16(c), RATE, 1, len(c)) for c in tts_chunks(seconds, RATE)]


def _run(avatar, seconds, speech_s, interrupt_at=None):
    gen = AvatarForcingVideoGenerator(avatar, np.full((64, 64, 3), 128, np.uint8), seed=1)
    items, marks = [], {}

    async def read_audio():  # AvatarRunner._read_audio: the agent's audio, as it comes
        await asyncio.sleep(0.3)
        for f in _frames(speech_s):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        if interrupt_at is not None:
            await asyncio.sleep(interrupt_at)
            marks["cut"] = len(items)
            gen.clear_buffer()
        await asyncio.sleep(seconds)
        await gen.aclose()

    async def forward_video():  # AvatarRunner._forward_video
        async for item in gen:
            items.append(item)

    async def main():
        await asyncio.gather(read_audio(), forward_video())

    asyncio.run(main())
    return items, marks


def test_audio_in_video_and_the_same_audio_out_in_order(avatar):
    items, _ = _run(avatar, 2.5, 1.0)
    video = [i for i in items if isinstance(i, rtc.VideoFrame)]
    c = avatar.cfg.codec
    assert len(video) >= 2.5 * 25 and all(v.width == c.width and v.height == c.height for v in video)
    assert all(v.type == rtc.VideoBufferType.RGB24 for v in video)
    audio = [i for i in items if isinstance(i, rtc.AudioFrame)]
    assert all(a.sample_rate == 16000 and a.num_channels == 1 and a.samples_per_channel == 640 for a in audio)
    spoken = np.concatenate([s16_to_float(bytes(a.data.cast("B")), 1) for a in audio])
    assert abs(np.count_nonzero(spoken) - 16000) <= 2  # the utterance, once, resampled to the model's rate
    for k, item in enumerate(items):  # each audio frame right after the video frame it belongs to
        if isinstance(item, rtc.AudioFrame):
            assert isinstance(items[k - 1], rtc.VideoFrame)
    ends = [k for k, i in enumerate(items) if isinstance(i, AudioSegmentEnd)]
    last_audio = max(k for k, i in enumerate(items) if isinstance(i, rtc.AudioFrame))
    assert len(ends) == 1 and ends[0] > last_audio  # the segment ends after its last frame of speech


def test_clear_buffer_drops_the_rest_of_the_utterance(avatar):
    items, marks = _run(avatar, 1.5, 4.0, interrupt_at=1.0)
    after = items[marks["cut"]:]
    spoken_after = [i for i in after if isinstance(i, rtc.AudioFrame)]
    assert len(spoken_after) <= 2 * 4  # what was in flight (at most two blocks), then silence
    assert not any(isinstance(i, AudioSegmentEnd) for i in items)  # interrupted: the runner reports it, not us
    assert sum(isinstance(i, rtc.VideoFrame) for i in after) >= 25  # the avatar keeps rendering (listening)


def test_runner_options_fit_the_model(avatar):
    o = avatar_options(avatar)
    c = avatar.cfg.codec
    assert (o.video_width, o.video_height, o.video_fps, o.audio_sample_rate, o.audio_channels) == \
        (c.width, c.height, c.fps, c.sample_rate, 1)


@pytest.mark.skipif(not os.environ.get("LIVEKIT_URL"), reason="no LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY "
                                                              "and LIVEKIT_API_SECRET to run against one")
def test_a_real_room_receives_the_avatar(avatar):  # pragma: no cover - needs a server
    from livekit import api
    from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

    async def main():
        token = api.AccessToken().with_identity("avatarforcing-test").with_grants(
            api.VideoGrants(room_join=True, room="avatarforcing-test")).to_jwt()
        room = rtc.Room()
        await room.connect(os.environ["LIVEKIT_URL"], token)
        audio = QueueAudioOutput(sample_rate=16000)
        gen = AvatarForcingVideoGenerator(avatar, np.full((64, 64, 3), 128, np.uint8))
        runner = AvatarRunner(room, audio_recv=audio, video_gen=gen, options=avatar_options(avatar),
                              _queue_size_ms=400)
        await runner.start()
        await asyncio.sleep(2.0)
        published = [p.kind for p in room.local_participant.track_publications.values()]
        await runner.aclose()
        await room.disconnect()
        return published

    kinds = asyncio.run(main())
    assert rtc.TrackKind.KIND_VIDEO in kinds

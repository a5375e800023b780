"""The runnable examples (examples/): their keyless parts work as shipped. The Pipecat bot's espeak voice drives
the avatar through Pipecat's own test runner; the LiveKit agent's espeak voice is the audio LiveKit's say()
takes. (Running them needs a browser and Pipecat's runner, or a LiveKit server: not here.)"""

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def espeak():
    pytest.importorskip("avatarforcing.data.speech").engine()  # libespeak-ng


def test_pipecat_bot_speaks_through_the_avatar(tiny_avatar, espeak, monkeypatch):
    pytest.importorskip("pipecat", reason="the pipecat extra is not installed")
    from pipecat.frames.frames import OutputImageRawFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.processors.filters.identity_filter import IdentityFilter
    from pipecat.tests.utils import SleepFrame, run_test

    bot = load("pipecat_bot")

    class Transport:  # the transport's two ends as pass-through processors
        def input(self):
            return IdentityFilter()

        def output(self):
            return IdentityFilter()

    for key in ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    pipeline, agent = bot.pipeline(Transport(), tiny_avatar)
    assert not agent  # no keys: the keyless speaker
    down, _ = asyncio.run(run_test(pipeline, frames_to_send=[TTSSpeakFrame("Hello there, I am talking."),
                                                             SleepFrame(sleep=3.0)]))
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    voice = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    c = tiny_avatar.cfg.codec
    assert len(images) >= 25 and images[0].size == (c.width, c.height)
    assert voice and all(f.sample_rate == c.sample_rate for f in voice)  # the avatar's voice, not espeak's own
    assert sum(len(f.audio) for f in voice) // 2 >= c.sample_rate  # the sentence (over a second) is spoken


def test_livekit_agent_voice_is_audio_frames_say_takes(espeak):
    pytest.importorskip("livekit.agents", reason="the livekit extra is not installed")
    agent = load("livekit_agent")

    async def frames():
        return [f async for f in agent.espeak_audio("Hello there.")]

    got = asyncio.run(frames())
    assert got and all(f.num_channels == 1 and f.samples_per_channel == f.sample_rate // 50 for f in got)
    assert len(got) * 0.02 > 0.5  # over half a second of speech

"""A Pipecat bot with the avatarforcing face, on Pipecat's local WebRTC transport (SmallWebRTC) and runner.

    pip install -e '.[pipecat]' 'pipecat-ai[webrtc,runner]'
    python examples/pipecat_bot.py -t webrtc          # then open http://localhost:7860/client

What it needs: nothing for the avatar part. Without keys the bot greets you in espeak-ng's voice (the corpus's
synthesiser, shipped with avatarforcing) and says one line every few seconds, its face rendered by the `mini`
model on this machine. With DEEPGRAM_API_KEY, OPENAI_API_KEY and CARTESIA_API_KEY set (and pipecat-ai's
`deepgram`, `openai`, `cartesia` extras installed) it is a voice agent: Deepgram STT -> OpenAI LLM -> Cartesia
TTS -> the avatar. AVATAR_MODEL (default `mini`) and AVATAR_IMAGE (a portrait file; default the built-in `demo`
identity) choose the face.
"""

from __future__ import annotations

import asyncio
import os

from pipecat.frames.frames import TTSAudioRawFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService

from avatarforcing import Avatar
from avatarforcing.identities import identity_image
from avatarforcing.integrations.driver import float_to_s16
from avatarforcing.integrations.pipecat import AvatarForcingVideoService

LINES = ["Hello! I am a small avatar model, rendered on this computer in real time.",
         "My face is made frame by frame, from the sound of my own voice.",
         "Give me an LLM and a speech recogniser, and I can hold a conversation."]


class EspeakTTSService(TTSService):
    """Text -> speech with libespeak-ng (no key, no network): the keyless bot's voice."""

    def __init__(self, **kwargs):
        super().__init__(push_stop_frames=True, push_start_frame=True, stop_frame_timeout_s=0.5,
                         settings=TTSSettings(model=None, voice="en", language="en"), **kwargs)

    async def run_tts(self, text: str, context_id: str):
        from avatarforcing.data.speech import synthesize

        speech = await asyncio.to_thread(synthesize, text)
        pcm = float_to_s16(speech.samples)  # s16 bytes
        step = 2 * speech.rate // 50  # 20 ms chunks, as a streaming TTS delivers them
        for i in range(0, len(pcm), step):
            yield TTSAudioRawFrame(audio=pcm[i:i + step], sample_rate=speech.rate, num_channels=1,
                                   context_id=context_id)


def pipeline(transport, model: Avatar) -> tuple[Pipeline, bool]:
    """The bot's pipeline, and whether it is the voice agent (every key set) or the keyless speaker."""
    image = os.environ.get("AVATAR_IMAGE") or identity_image("demo", model.cfg.codec.height)
    avatar = AvatarForcingVideoService(model, image)
    if not all(os.environ.get(k) for k in ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "CARTESIA_API_KEY")):
        return Pipeline([transport.input(), EspeakTTSService(), avatar, transport.output()]), False
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.services.cartesia.tts import CartesiaTTSService
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.services.openai.llm import OpenAILLMService

    context = LLMContext([{"role": "system", "content": "You are a friendly talking avatar. Answer in one or two "
                                                         "short spoken sentences."}])
    turns = LLMContextAggregatorPair(context)
    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    llm = OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"])
    tts = CartesiaTTSService(api_key=os.environ["CARTESIA_API_KEY"],
                             voice_id=os.environ.get("CARTESIA_VOICE_ID", "71a7ad14-091c-4e8e-a314-022ece01c121"))
    return Pipeline([transport.input(), stt, turns.user(), llm, tts, avatar, transport.output(),
                     turns.assistant()]), True


async def bot(runner_args):
    """Pipecat's runner calls this for every client that connects."""
    from pipecat.runner.utils import create_transport
    from pipecat.transports.base_transport import TransportParams

    model = Avatar.load(os.environ.get("AVATAR_MODEL", "mini"))
    c = model.cfg.codec
    params = TransportParams(audio_in_enabled=True, audio_out_enabled=True, audio_out_sample_rate=c.sample_rate,
                             video_out_enabled=True, video_out_is_live=True, video_out_framerate=c.fps,
                             video_out_width=c.width, video_out_height=c.height)
    transport = await create_transport(runner_args, {"webrtc": lambda: params})
    pipe, agent = pipeline(transport, model)
    task = PipelineTask(pipe, params=PipelineParams(allow_interruptions=True))
    talking: list[asyncio.Task] = []

    async def keyless_lines():
        for i in range(10_000):
            await task.queue_frames([TTSSpeakFrame(LINES[i % len(LINES)])])
            await asyncio.sleep(8)

    @transport.event_handler("on_client_connected")
    async def greet(transport, client):
        if agent:
            await task.queue_frames([TTSSpeakFrame("Hello! Ask me anything.")])
        else:
            talking.append(asyncio.ensure_future(keyless_lines()))

    @transport.event_handler("on_client_disconnected")
    async def bye(transport, client):
        for t in talking:
            t.cancel()
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()

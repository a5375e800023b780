"""A LiveKit agent with the avatarforcing face: the model runs in the agent's own process (AvatarRunner), or, with
AVATAR_REMOTE=1, in a separate `avatarforcing livekit-worker` process that joins the room as the avatar.

    pip install -e '.[livekit]'
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...   # a LiveKit server or Cloud project
    python examples/livekit_agent.py dev       # then join the room from https://agents-playground.livekit.io

What it needs: a LiveKit server (self-hosted `livekit-server --dev`, or LiveKit Cloud) and its three variables;
nothing else for the avatar part. Without an agent model configured the agent says one line every few seconds in
espeak-ng's voice (shipped with avatarforcing) and the avatar speaks it. With AGENT_STT, AGENT_LLM and AGENT_TTS
set to LiveKit Inference model names (e.g. deepgram/nova-3, openai/gpt-4.1-mini, cartesia/sonic-2; a LiveKit
Cloud project) it is a voice agent. AVATAR_MODEL (default `mini`) and AVATAR_IMAGE (a portrait file; default the
built-in `demo` identity) choose the face. AVATAR_REMOTE=1 starts the worker here as a subprocess for the demo;
in a deployment it runs on the model's own machine (the same command), and the agent only streams its audio to it.
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli
from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioOutput, QueueAudioOutput

from avatarforcing import Avatar
from avatarforcing.identities import identity_image
from avatarforcing.integrations.driver import float_to_s16
from avatarforcing.integrations.livekit import QUEUE_MS, AvatarForcingVideoGenerator, avatar_options

LINES = ["Hello! I am a small avatar model, rendered by this agent in real time.",
         "My face is made frame by frame, from the sound of my own voice.",
         "Give me a speech recogniser and a language model, and I can hold a conversation."]

server = AgentServer()


async def espeak_audio(text: str):
    """Text -> 20 ms rtc.AudioFrames with libespeak-ng (no key, no network): the keyless agent's voice."""
    from avatarforcing.data.speech import synthesize

    speech = await asyncio.to_thread(synthesize, text)
    pcm = np.frombuffer(float_to_s16(speech.samples), np.int16)
    step = speech.rate // 50
    for i in range(0, len(pcm) - step + 1, step):
        yield rtc.AudioFrame(pcm[i:i + step].tobytes(), speech.rate, 1, step)


WORKER_IDENTITY = "avatarforcing-avatar"


async def remote_avatar(ctx: JobContext) -> DataStreamAudioOutput:
    """Start `avatarforcing livekit-worker` for this room (it signs its own token from the same environment) and
    stream the agent's audio to it; it publishes the avatar on the agent's behalf."""
    args = ["--room", ctx.room.name, "--agent", ctx.room.local_participant.identity, "--participant", WORKER_IDENTITY,
            "--model", os.environ.get("AVATAR_MODEL", "mini")]
    args += ["--image", os.environ["AVATAR_IMAGE"]] if os.environ.get("AVATAR_IMAGE") else ["--identity", "demo"]
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "avatarforcing.cli", "livekit-worker", *args)

    async def stop_worker() -> None:  # it also leaves by itself when the agent leaves the room
        if worker.returncode is None:
            worker.terminate()
            await worker.wait()

    ctx.add_shutdown_callback(stop_worker)
    return DataStreamAudioOutput(ctx.room, destination_identity=WORKER_IDENTITY, sample_rate=16000,
                                 wait_remote_track=rtc.TrackKind.KIND_VIDEO)


@server.rtc_session()
async def entrypoint(ctx: JobContext):
    await ctx.connect()
    agent_models = {k: os.environ.get(f"AGENT_{k.upper()}") for k in ("stt", "llm", "tts")}
    keyless = not all(agent_models.values())
    session = AgentSession() if keyless else AgentSession(**agent_models)

    if os.environ.get("AVATAR_REMOTE"):
        audio = await remote_avatar(ctx)
    else:  # the agent's audio goes to a queue; the runner publishes the generator's video and synced audio
        model = Avatar.load(os.environ.get("AVATAR_MODEL", "mini"))
        image = os.environ.get("AVATAR_IMAGE") or identity_image("demo", model.cfg.codec.height)
        audio = QueueAudioOutput(sample_rate=model.cfg.codec.sample_rate)
        runner = AvatarRunner(ctx.room, audio_recv=audio, video_gen=AvatarForcingVideoGenerator(model, image),
                              options=avatar_options(model), _queue_size_ms=QUEUE_MS)
        await runner.start()
    await session.start(agent=Agent(instructions="You are a friendly talking avatar. Answer in one or two short "
                                                  "spoken sentences."), room=ctx.room)
    session.output.audio = audio

    if keyless:
        for i in range(10_000):
            await session.say(LINES[i % len(LINES)], audio=espeak_audio(LINES[i % len(LINES)]))
            await asyncio.sleep(4)
    else:
        await session.say("Hello! Ask me anything.")


if __name__ == "__main__":
    cli.run_app(server)

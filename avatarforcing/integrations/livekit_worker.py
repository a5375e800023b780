"""The avatar as a remote LiveKit participant (``avatarforcing livekit-worker``): the model runs on its own
machine, joins the agent's room and publishes the avatar's video and voice there.

    agent process (any host)                          this worker (the model's host)
    DataStreamAudioOutput(room, destination=ID)  -->  byte stream "lk.audio_stream" (PCM + rate attributes)
                                                      DataStreamAudioReceiver -> AvatarRunner
                                                        -> AvatarForcingVideoGenerator (livekit.py)
                                                        -> video + audio tracks, published on the agent's behalf
    clear_buffer()  -- RPC "lk.clear_buffer" ------>  interrupt
                    <-- RPC "lk.playback_finished" --  position, interrupted (per utterance)

The wire protocol (byte-stream topic, RPC names, the ``lk.publish_on_behalf`` attribute that makes the room
present the avatar's tracks as the agent's) is LiveKit Agents' own, implemented by its
``DataStreamAudioReceiver`` / ``AvatarRunner``; this module joins the room with the right token and runs them
until the room or the agent goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from ..errors import InputError

log = logging.getLogger("avatarforcing.livekit")


@dataclass(frozen=True)
class WorkerSettings:
    """Where to join and as whom. ``token``: a ready access token; otherwise ``api_key`` / ``api_secret`` sign
    one for ``room`` with ``identity`` (and the agent's identity as ``lk.publish_on_behalf``)."""

    url: str
    room: str | None = None
    identity: str = "avatarforcing-avatar"
    agent_identity: str | None = None  # whose speech to play; None: the first agent participant to join
    token: str | None = None
    api_key: str | None = None
    api_secret: str | None = None

    @classmethod
    def from_env(cls, **given) -> WorkerSettings:
        """Flags first, then LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET (the names LiveKit's tools use)."""
        env = {"url": "LIVEKIT_URL", "api_key": "LIVEKIT_API_KEY", "api_secret": "LIVEKIT_API_SECRET"}
        values = {k: os.environ[name] for k, name in env.items() if os.environ.get(name)}
        values.update({k: v for k, v in given.items() if v is not None})
        if "url" not in values:
            raise InputError("no LiveKit server: pass --url or set LIVEKIT_URL (e.g. wss://my-project.livekit.cloud)")
        s = cls(**values)
        s.check()
        return s

    def check(self) -> None:
        if not self.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise InputError(f"--url {self.url!r}: expected a ws://, wss://, http:// or https:// address")
        if self.token:
            return
        if not (self.api_key and self.api_secret):
            raise InputError("no way to join: pass --token, or an API key and secret (--api-key/--api-secret or "
                             "LIVEKIT_API_KEY/LIVEKIT_API_SECRET) with --room")
        if not self.room:
            raise InputError("--room is needed to sign a token (which room the agent is in)")

    def access_token(self) -> str:
        """The token to join with: the one given, or one signed for this room and identity, as an agent
        participant that may publish (and, with ``agent_identity``, publishes on that agent's behalf)."""
        if self.token:
            return self.token
        from livekit import api

        grants = api.VideoGrants(room_join=True, room=self.room, can_publish=True, can_subscribe=True,
                                 can_publish_data=True)
        token = (api.AccessToken(self.api_key, self.api_secret).with_identity(self.identity)
                 .with_name("avatarforcing").with_kind("agent").with_grants(grants))
        if self.agent_identity:
            token = token.with_attributes({"lk.publish_on_behalf": self.agent_identity})
        return token.to_jwt()


def is_the_agent(settings: WorkerSettings, participant) -> bool:
    """Whether ``participant`` is the agent whose avatar this is: the named one, or (none named) any agent
    participant. A user leaving the room does not end the avatar's part; the agent leaving does."""
    from livekit import rtc

    if settings.agent_identity:
        return participant.identity == settings.agent_identity
    return participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


async def run_worker(settings: WorkerSettings, avatar, image, *, seed: int = 0, prompt: str | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """Join the room, play the agent's speech through the avatar until the room disconnects, the agent leaves
    or ``stop`` is set; then leave."""
    from livekit import rtc
    from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

    from .livekit import QUEUE_MS, AvatarForcingVideoGenerator, avatar_options

    room = rtc.Room()
    done = stop or asyncio.Event()
    room.on("disconnected", lambda *_: done.set())

    def left(participant) -> None:
        if is_the_agent(settings, participant):
            log.info("the agent %s left; leaving", participant.identity)
            done.set()

    room.on("participant_disconnected", left)
    await room.connect(settings.url, settings.access_token())
    log.info("joined room %s as %s", room.name, settings.identity)
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room, sender_identity=settings.agent_identity),
                          video_gen=AvatarForcingVideoGenerator(avatar, image, seed=seed, prompt=prompt),
                          options=avatar_options(avatar), _queue_size_ms=QUEUE_MS)
    try:
        await runner.start()
        await done.wait()
    finally:
        await runner.aclose()
        await room.disconnect()

"""``avatarforcing livekit-worker``: the avatar as a remote participant of the agent's room. No LiveKit server can
run here: its settings, token and command-line errors are tested; joining a real room (the agent's
DataStreamAudioOutput -> this worker -> tracks and lk.playback_finished) runs only when LIVEKIT_URL is given."""

import asyncio
import os

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra is not installed (pip install "
                                             "'avatarforcing[livekit]')")

from avatarforcing.cli import main  # noqa: E402
from avatarforcing.errors import InputError  # noqa: E402
from avatarforcing.integrations.livekit_worker import WorkerSettings  # noqa: E402


@pytest.fixture
def no_env(monkeypatch):
    for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(k, raising=False)


def test_settings_say_what_is_missing(no_env, monkeypatch):
    with pytest.raises(InputError, match="no LiveKit server: pass --url or set LIVEKIT_URL"):
        WorkerSettings.from_env()
    with pytest.raises(InputError, match="expected a ws://"):
        WorkerSettings.from_env(url="livekit.example.org", token="t")
    with pytest.raises(InputError, match="pass --token, or an API key and secret"):
        WorkerSettings.from_env(url="wss://x.example.org", room="r")
    with pytest.raises(InputError, match="--room is needed"):
        WorkerSettings.from_env(url="wss://x.example.org", api_key="k", api_secret="s")
    monkeypatch.setenv("LIVEKIT_URL", "wss://env.example.org")
    monkeypatch.setenv("LIVEKIT_API_KEY", "key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "secret-that-is-long-enough-for-hs256-signing")
    s = WorkerSettings.from_env(room="r1", url=None)
    assert (s.url, s.api_key, s.room) == ("wss://env.example.org", "key", "r1")  # the environment fills the gaps
    assert WorkerSettings.from_env(url="wss://flag.example.org", room="r1").url == "wss://flag.example.org"


def test_the_signed_token_joins_that_room_as_an_agent_publishing_on_the_agents_behalf(no_env):
    from livekit import api

    secret = "secret-that-is-long-enough-for-hs256-signing"
    s = WorkerSettings.from_env(url="wss://x.example.org", room="support-42", api_key="key", api_secret=secret,
                                identity="face", agent_identity="agent-7")
    claims = api.TokenVerifier("key", secret).verify(s.access_token())
    assert claims.identity == "face" and claims.kind == "agent"
    v = claims.video
    assert v.room_join and v.room == "support-42" and v.can_publish and v.can_subscribe and v.can_publish_data
    assert claims.attributes == {"lk.publish_on_behalf": "agent-7"}
    assert WorkerSettings(url="wss://x", token="given").access_token() == "given"


def test_only_the_agent_leaving_ends_the_worker():
    from types import SimpleNamespace

    from livekit import rtc

    from avatarforcing.integrations.livekit_worker import is_the_agent

    agent = SimpleNamespace(identity="agent-7", kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    user = SimpleNamespace(identity="visitor", kind=rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
    other_agent = SimpleNamespace(identity="agent-9", kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    named = WorkerSettings(url="wss://x", token="t", agent_identity="agent-7")
    anyone = WorkerSettings(url="wss://x", token="t")
    assert is_the_agent(named, agent) and not is_the_agent(named, user) and not is_the_agent(named, other_agent)
    assert is_the_agent(anyone, agent) and is_the_agent(anyone, other_agent) and not is_the_agent(anyone, user)


def test_every_worker_flag_reaches_the_worker(no_env, monkeypatch):
    """`livekit-worker`'s flags land in the settings the worker joins with, with the model, portrait and seed."""
    import avatarforcing.integrations.livekit_worker as worker

    got = {}

    async def fake_run(settings, avatar, image, *, seed=0, prompt=None, stop=None):
        got.update(settings=settings, model=avatar.cfg.name, image=image, seed=seed)

    monkeypatch.setattr(worker, "run_worker", fake_run)
    assert main(["livekit-worker", "--identity", "demo", "--seed", "5", "--url", "wss://lk.example.org",
                 "--room", "support", "--api-key", "k", "--api-secret", "s", "--participant", "face",
                 "--agent", "agent-7"]) == 0
    assert got["settings"] == WorkerSettings(url="wss://lk.example.org", room="support", identity="face",
                                             agent_identity="agent-7", api_key="k", api_secret="s")
    assert got["model"] == "mini" and got["seed"] == 5 and got["image"] is not None
    assert main(["livekit-worker", "--identity", "demo", "--url", "wss://lk.example.org", "--token", "t"]) == 0
    assert got["settings"].token == "t" and got["settings"].identity == "avatarforcing-avatar"


def test_the_command_fails_clearly_without_a_server(no_env, capsys):
    assert main(["livekit-worker", "--identity", "demo"]) == 2
    err = capsys.readouterr().err
    assert "no LiveKit server" in err and "Traceback" not in err
    assert main(["livekit-worker", "--identity", "demo", "--url", "wss://x.example.org", "--room", "r"]) == 2
    assert "pass --token, or an API key and secret" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("LIVEKIT_URL"), reason="no LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY "
                                                              "and LIVEKIT_API_SECRET to run against one")
def test_a_real_room_gets_the_remote_avatar():  # pragma: no cover - needs a server
    """The agent's side (a participant with DataStreamAudioOutput) sends 1 s of speech to the worker: the worker
    publishes video and audio and answers with lk.playback_finished (not interrupted)."""
    from livekit import api, rtc
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from avatarforcing.api import Avatar
    from avatarforcing.integrations.livekit_worker import run_worker

    room_name = f"avatarforcing-worker-{os.getpid()}"

    async def scenario():
        key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]
        agent_token = api.AccessToken(key, secret).with_identity("agent").with_kind("agent").with_grants(
            api.VideoGrants(room_join=True, room=room_name)).to_jwt()
        agent = rtc.Room()
        await agent.connect(os.environ["LIVEKIT_URL"], agent_token)
        settings = WorkerSettings.from_env(room=room_name, agent_identity="agent")
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(settings, Avatar.load("mini"),
                                                np.full((128, 128, 3), 128, np.uint8), stop=stop))
        out = DataStreamAudioOutput(agent, destination_identity=settings.identity, sample_rate=16000)
        finished = asyncio.get_running_loop().create_future()
        out.on("playback_finished", lambda ev: finished.done() or finished.set_result(ev))
        await out._start_task()
        tone = (3000 * np.sin(np.arange(16000) * 2 * np.pi * 200 / 16000)).astype(np.int16)
        for i in range(0, 16000, 1600):
            await out.capture_frame(rtc.AudioFrame(tone[i:i + 1600].tobytes(), 16000, 1, 1600))
        out.flush()
        ev = await asyncio.wait_for(finished, 60)
        kinds = {p.kind for p in agent.remote_participants[settings.identity].track_publications.values()}
        stop.set()
        await worker
        await agent.disconnect()
        return ev, kinds

    ev, kinds = asyncio.run(scenario())
    assert not ev.interrupted and ev.playback_position > 0.5
    assert {rtc.TrackKind.KIND_VIDEO, rtc.TrackKind.KIND_AUDIO} <= kinds

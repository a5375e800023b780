"""``avatarforcing livekit-worker``: the avatar joins a LiveKit room as a remote participant and plays the agent's
speech there (integrations/livekit_worker.py; docs/agents.md)."""

from __future__ import annotations

from ..errors import AvatarForcingError
from .common import add_reference_args, reference


def add(sub) -> None:
    w = sub.add_parser("livekit-worker", help="join a LiveKit room as the agent's avatar (pip install "
                                              "'avatarforcing[livekit]')",
                       description="Joins the room, receives the agent's speech on LiveKit's avatar data stream "
                                   "(DataStreamAudioOutput on the agent's side), answers lk.clear_buffer and sends "
                                   "lk.playback_finished, and publishes the avatar's video and voice on the agent's "
                                   "behalf. Leaves when the agent leaves or the room closes.")
    add_reference_args(w)
    w.add_argument("--model", default="mini", help="shipped model name or model folder (default: mini)")
    w.add_argument("--device", default="cpu")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--url", help="the LiveKit server (default: $LIVEKIT_URL)")
    w.add_argument("--room", help="the agent's room (to sign a token with the API key and secret)")
    w.add_argument("--token", help="a ready access token instead of the API key and secret")
    w.add_argument("--api-key", help="default: $LIVEKIT_API_KEY")
    w.add_argument("--api-secret", help="default: $LIVEKIT_API_SECRET")
    w.add_argument("--participant", default="avatarforcing-avatar",
                   help="this worker's identity in the room; the agent's DataStreamAudioOutput sends to it "
                        "(destination_identity; default %(default)s)")
    w.add_argument("--agent", help="the agent's identity: whose speech to play and on whose behalf to publish "
                                   "(default: the first agent participant to join)")
    w.set_defaults(func=run)


def run(args) -> int:
    import importlib.util

    from ..integrations.livekit_worker import WorkerSettings, run_worker

    if importlib.util.find_spec("livekit") is None or importlib.util.find_spec("livekit.agents") is None:
        raise AvatarForcingError("livekit-worker needs the livekit extra: pip install 'avatarforcing[livekit]'")
    settings = WorkerSettings.from_env(url=args.url, room=args.room, identity=args.participant,
                                       agent_identity=args.agent, token=args.token, api_key=args.api_key,
                                       api_secret=args.api_secret)
    import asyncio
    import logging

    from ..api import Avatar

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    image = reference(args)
    avatar = Avatar.load(args.model, args.device)
    avatar.prepare_reference(image)  # a bad portrait fails here, before joining the room
    asyncio.run(run_worker(settings, avatar, image, seed=args.seed))
    return 0

"""``avatarforcing serve``: the flags become one ``ServingSpec``, run by one process or replicated by Ray."""

from __future__ import annotations

from ..errors import AvatarForcingError
from ..serve.spec import Limits, RayOptions, ServingSpec
from .common import add_prompt_args, prompt

SESSIONS, SESSIONS_PER_REPLICA = 4, 2  # default session slots: one server, one Ray replica


def add(sub) -> None:
    v = sub.add_parser("serve", help="real-time WebSocket server and browser page",
                       description="FastAPI + uvicorn: WebSocket /ws (docs/protocol.md), the browser page at /, "
                                   "/healthz and /metrics (Prometheus).")
    v.add_argument("--model", default="mini")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-sessions", type=int, metavar="K",
                   help=f"session slots of the server (default {SESSIONS}); under --ray: of each replica (default "
                        f"{SESSIONS_PER_REPLICA}); the largest batch of one model step")
    v.add_argument("--device", default="cpu")
    v.add_argument("--no-batch", dest="batch", action="store_false",
                   help="step every session alone (the unbatched baseline); by default the sessions' due blocks "
                        "share one model step")
    v.add_argument("--compute-threads", type=int, metavar="N",
                   help="torch threads of the model's thread (default: torch's, one per core). Fewer leave cores to "
                        "the transport (WebRTC encoders, JPEG, sockets) on a small machine")
    v.add_argument("--allow-origin", action="append", help="a web origin (https://example.org) whose pages may "
                                                           "open streams, besides this server's own page; '*': any")
    v.add_argument("--session-limit", type=float, default=Limits.max_session_seconds, metavar="SECONDS",
                   help="wall-clock length of a session, live or not (default %(default)g s)")
    v.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a host name clients may reach this server by (the Host header; DNS rebinding). Default: "
                        "the loopback names and --host when it is one address; any when --host is 0.0.0.0 or ::")
    v.add_argument("--ice-server", action="append", metavar="URL",
                   help="WebRTC: a STUN or TURN server for peers behind NAT, stun:HOST[:PORT] or "
                        "turn:USER:PASSWORD@HOST[:PORT][?transport=udp|tcp] (repeatable; the page is told the STUN "
                        "ones). Default: host candidates only")
    v.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    r = v.add_argument_group("Ray Serve (many replicas, GPUs, machines; pip install -e '.[ray]')")
    r.add_argument("--ray", action="store_true", help="serve as a Ray Serve application (its proxy on loopback, behind "
                   "a front door with the single server's HTTP limits on --host/--port)")
    r.add_argument("--replicas", type=int, default=2, help="fixed number of replicas (default 2)")
    r.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale replicas on live sessions instead")
    r.add_argument("--sessions-per-replica", type=int, dest="max_sessions", metavar="K",
                   help="the same as --max-sessions")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica owns (1 with --device cuda)")
    r.add_argument("--address", help="an existing Ray cluster this machine is a node of (e.g. auto: run on the head); "
                        "default: start one")
    add_prompt_args(v)
    v.set_defaults(func=run)


def spec(args) -> ServingSpec:
    """The whole serving spec from the flags (validated here, before anything loads)."""
    ray = None
    if args.ray:
        autoscale = None
        if args.autoscale:
            try:
                lo, hi = (int(x) for x in args.autoscale.split(":"))
            except ValueError:
                raise AvatarForcingError(f"--autoscale {args.autoscale!r}: expected MIN:MAX, e.g. 1:4") from None
            if not 1 <= lo <= hi:
                raise AvatarForcingError(f"--autoscale {args.autoscale!r}: need 1 <= MIN <= MAX")
            autoscale = (lo, hi)
        if args.replicas < 1:
            raise AvatarForcingError(f"--replicas {args.replicas}: need at least 1")
        try:
            ray = RayOptions(replicas=args.replicas, autoscale=autoscale, gpus_per_replica=args.gpus_per_replica,
                             address=args.address)
        except ValueError as e:
            raise AvatarForcingError(f"--ray: {e}") from None
    elif args.autoscale or args.address:
        raise AvatarForcingError("--autoscale and --address are options of --ray")
    sessions = args.max_sessions if args.max_sessions is not None else SESSIONS_PER_REPLICA if args.ray else SESSIONS
    if sessions < 1:
        raise AvatarForcingError(f"--max-sessions {sessions}: need at least 1")
    if args.engine:
        from ..model import fast

        fast.parse(args.engine)  # a bad name fails here, not in every replica
    if args.compute_threads is not None and args.compute_threads < 1:
        raise AvatarForcingError(f"--compute-threads {args.compute_threads}: need at least 1")
    if args.session_limit <= 0:
        raise AvatarForcingError(f"--session-limit {args.session_limit}: need a positive number of seconds")
    try:
        limits = Limits(max_sessions=sessions, allow_origins=tuple(args.allow_origin or ()), docs=args.docs,
                        max_session_seconds=args.session_limit, allow_hosts=allowed_hosts(args), batch=args.batch,
                        compute_threads=args.compute_threads, ice_servers=tuple(args.ice_server or ()))
    except ValueError as e:
        raise AvatarForcingError(str(e)) from None
    return ServingSpec(model=args.model, device=args.device, dtype=args.dtype, engine=args.engine,
                       host=args.host, port=args.port, limits=limits, ray=ray, **prompt(args))


LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(args) -> tuple[str, ...]:
    """--allow-host, or by default the loopback names plus --host itself; no check for a wildcard bind."""
    if args.allow_host:
        return tuple(args.allow_host)
    if args.host in ("0.0.0.0", "::", ""):
        return ()
    host = f"[{args.host}]" if ":" in args.host else args.host
    return tuple(dict.fromkeys((*LOOPBACK, host.lower())))


def run(args) -> int:
    s = spec(args)
    if s.ray is not None:
        from ..serve.ray import serve_forever

        serve_forever(s)
    else:
        from ..serve.http import serve

        serve(s)
    return 0

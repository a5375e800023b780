"""``avatarforcing bench``: speed benchmarks that print JSON and compare variants in one run."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AvatarForcingError


def add(sub) -> None:
    b = sub.add_parser("bench", help="speed benchmarks (JSON)",
                       description="speed: the streaming engine (DiT + VAE) per step; codec: VAE decode rate; "
                                   "serve: load test of the server on 127.0.0.1 with real-time clients; "
                                   "audio-rows: streaming wav2vec2 rows against whole-clip rows; live: the live "
                                   "avatar as a voice agent uses it (latencies, interrupt, A/V offset, a soak); "
                                   "livekit-sync: A/V offset inside LiveKit's own AvatarRunner, paced and not "
                                   "(needs the livekit extra).")
    b.add_argument("what", choices=["speed", "codec", "serve", "audio-rows", "live", "livekit-sync"])
    b.add_argument("--model", default="mini", help="mini or wan-1.3b (bench live: any model folder)")
    b.add_argument("--frames", type=int, default=1000)
    b.add_argument("--modes", default="avatarforcing,ar", help="comma-separated samplers to compare")
    b.add_argument("--variants", help="bench speed: engine variants to compare with eager, e.g. "
                                      "eager,compiled,graphs,fp8,fp8+graphs (model/fast.py)")
    b.add_argument("--weights", help="bench speed --variants: a model folder or shipped name (mini) whose trained "
                                     "DiT replaces the random one")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--json", help="write the JSON result here")
    b.add_argument("--sessions", default="1,2,4", help="bench serve: concurrent sessions to try, in turn")
    b.add_argument("--seconds", type=float, default=10.0, help="bench serve: seconds of audio per session; bench "
                                                               "livekit-sync: length of the utterance")
    b.add_argument("--ray", action="store_true", help="bench serve: also the same sweep against serve --ray")
    b.add_argument("--neighbours", action="store_true", help="bench serve: also one real-time stream alone and "
                                                             "beside floods of /speak and /prepare")
    b.add_argument("--live", action="store_true", help="bench serve: K live sessions per --sessions, batched and "
                                                       "unbatched; realtime_sessions per mode")
    b.add_argument("--configs", default="fp32:eager", help="bench serve --live: dtype:engine pairs to compare, e.g. "
                                                           "fp32:eager,bf16:eager,bf16:compiled")
    b.add_argument("--replicas", type=int, default=2, help="bench serve --ray: replicas")
    b.add_argument("--audio-model", help="bench audio-rows: a wav2vec2-base-960h folder")
    b.add_argument("--audio", help="bench audio-rows: a speech file")
    b.add_argument("--left", default="25,50,100", help="bench audio-rows: left contexts to try (video frames)")
    b.add_argument("--lookahead", default="0,2,4,8", help="bench audio-rows: look-aheads to try (video frames)")
    b.add_argument("--utterances", type=int, default=8, help="bench live: utterances in the real-time conversation")
    b.add_argument("--soak-minutes", type=float, default=10.0, help="bench live: simulated minutes of the soak "
                                                                    "(5 s speech / 20 s silence; 0: none)")
    b.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..eval.bench import run_codec, speed_main

    if args.what == "livekit-sync":
        try:
            from ..integrations.livekit_sync import bench_livekit_sync
        except ImportError as e:
            raise AvatarForcingError("bench livekit-sync needs the livekit extra: pip install "
                                     f"'avatarforcing[livekit]' ({e})") from None
        bench_livekit_sync(args.model, args.seconds, args.json)
        return 0
    if args.what == "live":
        from ..eval.live_bench import bench_live

        bench_live(args.model, args.utterances, soak_minutes=args.soak_minutes, json_path=args.json,
                   device=args.device)
        return 0
    if args.model not in ("mini", "wan-1.3b") and args.what in ("speed", "codec"):
        raise AvatarForcingError(f"bench {args.what} --model: mini or wan-1.3b, got {args.model!r}")
    if args.what == "speed":
        modes = args.modes.split(",")
        variants = args.variants.split(",") if args.variants else None
        speed_main(args.model, args.frames, args.device, args.dtype, args.json, modes, variants, args.weights)
    elif args.what == "codec":
        from ..config import preset

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        res = [run_codec(preset(args.model), torch.device(args.device), dt)]
        if torch.cuda.is_available() and args.model == "mini":
            res.append(run_codec(preset("wan-1.3b"), torch.device("cuda"), torch.bfloat16, latents=12))
        text = json.dumps(res if len(res) > 1 else res[0], indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
    elif args.what == "audio-rows":
        from ..eval.bench import audio_rows_main

        if not args.audio_model or not args.audio:
            raise AvatarForcingError("bench audio-rows needs --audio-model (a wav2vec2-base-960h folder) and --audio")
        audio_rows_main(args.audio_model, args.audio, [int(x) for x in args.left.split(",")],
                        [int(x) for x in args.lookahead.split(",")], json_path=args.json)
    elif args.live:
        from ..serve.bench_live import bench_live_serve

        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
        if any(len(c) != 2 for c in configs):
            raise AvatarForcingError(f"--configs {args.configs!r}: expected dtype:engine pairs, e.g. "
                                     "fp32:eager,bf16:eager")
        bench_live_serve(args.model, [int(x) for x in args.sessions.split(",")], args.seconds, configs, args.device,
                         args.json)
    else:
        from ..serve.bench import bench_serve

        bench_serve(args.model, [int(x) for x in args.sessions.split(",")], args.seconds, args.json,
                    ray_replicas=args.replicas if args.ray else None, neighbours=args.neighbours)
    return 0

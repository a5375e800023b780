"""``avatarforcing`` command line: generate | stream | serve | train | eval | bench | data | convert | encode-prompt."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import AvatarForcingError, InputError

ABLATIONS = ("style-anchor", "rope-reindex", "audio-zero-pad", "temporal-anchor")


class Missing(AvatarForcingError):
    """A capability another issue has not built yet."""


def _add_reference_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="portrait (jpg/png/webp)")
    src.add_argument("--identity", help="a built-in identity name (see `avatarforcing data identities`)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mini", help="shipped model name or model folder (default: mini)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--audio-model", help="local wav2vec2-base-960h folder (models with the wav2vec2 front end)")
    p.add_argument("--mode", default="avatarforcing", choices=["avatarforcing", "ar", "teacher"],
                   help="sampler: AvatarForcing window, one-step AR forcing, or the multi-step teacher")
    p.add_argument("--seed", type=int, default=0)
    for name in ABLATIONS:
        p.add_argument(f"--no-{name}", action="store_true", help=f"ablation: disable the {name.replace('-', ' ')}")
    p.add_argument("--audio-lookahead", type=int, help="wav2vec2 streaming: video frames of audio look-ahead per "
                                                        "block (adds 40 ms each to the latency)")
    p.add_argument("--audio-left-context", type=int, help="wav2vec2 streaming: video frames of left context")


def _overrides(args) -> dict:
    out = {}
    if args.audio_lookahead is not None:
        out["codec.audio_lookahead_frames"] = args.audio_lookahead
    if args.audio_left_context is not None:
        out["codec.audio_left_context_frames"] = args.audio_left_context
    return out


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    t = p.add_mutually_exclusive_group()
    t.add_argument("--prompt", help="text prompt (wan models; encoded by the model's umT5 and cached)")
    t.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    t.add_argument("--prompt-embeds", help="cached embeddings from `avatarforcing encode-prompt`")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="model precision (default: bf16 on a GPU, "
                                                                    "fp32 on the CPU)")
    p.add_argument("--engine", help="inference variant: eager, compiled, graphs, fp8, or joined with '+' (default: "
                                    "compiled on a GPU, eager on the CPU; see `bench speed --variants`)")


def _prompt(args) -> dict:
    """The prompt arguments as ``Avatar.session`` keywords."""
    prompt = args.prompt
    if args.prompt_file:
        f = Path(args.prompt_file)
        if not f.is_file():
            raise AvatarForcingError(f"{f}: prompt file not found")
        prompt = f.read_text(encoding="utf-8").strip()
    return {"prompt": prompt, "prompt_embeds": args.prompt_embeds}


def _options(args):
    from .stream.window import Options

    return Options(style_anchor=not args.no_style_anchor, rope_reindex=not args.no_rope_reindex,
                   audio_zero_pad=not args.no_audio_zero_pad, temporal_anchor=not args.no_temporal_anchor)


def _reference(args) -> str:
    if args.image:
        return args.image
    from .identities import identity_image

    return identity_image(args.identity)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .api import Avatar
    from .data.video import VideoWriter

    avatar = Avatar.load(args.model, args.device, args.audio_model, args.dtype, _overrides(args), args.engine)
    rate = avatar.cfg.codec.sample_rate
    pcm = avatar.load_audio(args.audio)
    t0 = time.perf_counter()
    if avatar.clip_rows or args.latent_frames:  # the release: the file's audio rows at once, offline
        video = avatar.generate(_reference(args), pcm, seed=args.seed, mode=args.mode, options=_options(args),
                                latent_frames=args.latent_frames, **_prompt(args))
        with VideoWriter(args.out, fps=avatar.cfg.codec.fps, sample_rate=rate) as writer:
            writer.add_audio(pcm)
            writer.write(video)
            n = writer.frames_written
        dt = time.perf_counter() - t0
        print(f"{args.out}: {n} frames, {dt:.1f} s, {n / dt:.1f} fps (offline: audio rows over the whole clip)")
        return 0
    session = avatar.session(_reference(args), seed=args.seed, mode=args.mode, options=_options(args),
                             **_prompt(args))
    total = -(-len(pcm) // avatar.cfg.codec.samples_per_frame)
    chunk = rate // 5  # 200 ms of audio per push, as a live source would deliver it
    with VideoWriter(args.out, fps=avatar.cfg.codec.fps, sample_rate=rate) as writer, \
            tqdm(total=total, unit="frame", desc="generate") as bar:
        for i in range(0, len(pcm), chunk):
            writer.add_audio(pcm[i:i + chunk])
            for frames in session.push(pcm[i:i + chunk]):
                writer.write(frames)
                bar.update(len(frames))
        for frames in session.close():
            writer.write(frames)
            bar.update(len(frames))
        n = writer.frames_written
    dt = time.perf_counter() - t0
    print(f"{args.out}: {n} frames, {dt:.1f} s, {n / dt:.1f} fps "
          f"(look-ahead {session.lookahead_ms:.0f} ms, first frame after {session.stats.first_frame_ms:.0f} ms "
          f"of compute)")
    return 0


def cmd_stream(args) -> int:
    import numpy as np

    from .api import Avatar

    avatar = Avatar.load(args.model, args.device, args.audio_model, args.dtype, _overrides(args), args.engine)
    session = avatar.session(_reference(args), seed=args.seed, mode=args.mode, options=_options(args),
                             **_prompt(args))
    c = avatar.cfg.codec
    print(f"avatarforcing stream: in {args.format} mono {c.sample_rate} Hz; out rgb24 {c.width}x{c.height} "
          f"@ {c.fps} fps; look-ahead {session.lookahead_ms:.0f} ms", file=sys.stderr)
    width = 2 if args.format == "s16le" else 4
    out = sys.stdout.buffer
    inp = sys.stdin.buffer
    pending = b""
    while True:
        data = inp.read1(args.chunk * width) if hasattr(inp, "read1") else inp.read(args.chunk * width)
        if not data:
            break
        data = pending + data
        usable = len(data) // width * width
        pending = data[usable:]
        raw = np.frombuffer(data[:usable], dtype="<i2" if width == 2 else "<f4")
        pcm = raw.astype(np.float32) / 32768.0 if width == 2 else raw.astype(np.float32)
        for frames in session.push(pcm):
            out.write(frames.tobytes())
            out.flush()
    for frames in session.close():
        out.write(frames.tobytes())
    out.flush()
    return 0


def cmd_bench(args) -> int:
    import json

    import torch

    from .eval.bench import run_codec, speed_main

    if args.what == "speed":
        modes = args.modes.split(",")
        variants = args.variants.split(",") if args.variants else None
        speed_main(args.model, args.frames, args.device, args.dtype, args.json, modes, variants, args.weights)
    elif args.what == "codec":
        from .config import preset

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        res = [run_codec(preset(args.model), torch.device(args.device), dt)]
        if torch.cuda.is_available() and args.model == "mini":
            res.append(run_codec(preset("wan-1.3b"), torch.device("cuda"), torch.bfloat16, latents=12))
        text = json.dumps(res if len(res) > 1 else res[0], indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
    elif args.what == "audio-rows":
        from .eval.bench import audio_rows_main

        if not args.audio_model or not args.audio:
            raise AvatarForcingError("bench audio-rows needs --audio-model (a wav2vec2-base-960h folder) and --audio")
        audio_rows_main(args.audio_model, args.audio, [int(x) for x in args.left.split(",")],
                        [int(x) for x in args.lookahead.split(",")], json_path=args.json)
    else:
        from .serve.bench import bench_serve

        bench_serve(args.model, [int(x) for x in args.sessions.split(",")], args.seconds, args.json,
                    ray_replicas=args.replicas if args.ray else None)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    out = convert(args.src, args.out, config=args.config, preset_name=args.preset, fmt=args.format, lora=args.lora,
                  ema=args.ema, dtype=args.dtype, lora_alpha=args.lora_alpha, lora_rank=args.lora_rank,
                  wan=args.wan, wav2vec2=args.wav2vec2, paper_engine=args.paper_engine, cache_prompt=args.cache_prompt)
    print(f"wrote {out}")
    return 0


def cmd_encode_prompt(args) -> int:
    from .api import read_components
    from .codecs.text import encode_prompt, save_prompt_embeds
    from .config import Config

    folder = Path(args.model)
    if not (folder / "config.yaml").is_file():
        raise AvatarForcingError(f"{folder}: not a model folder (expected config.yaml)")
    cfg = Config.load(folder / "config.yaml")
    if not cfg.model.text_dim:
        raise AvatarForcingError(f"{folder}: this model has no text conditioning (text_dim 0)")
    parts = read_components(folder)
    encoder = args.text_encoder or parts.get("text_encoder")
    tokenizer = args.tokenizer or parts.get("tokenizer")
    if not encoder or not tokenizer:
        raise AvatarForcingError(f"{folder}: no umT5 encoder referenced (components.yaml); pass --text-encoder "
                                 f"and --tokenizer")
    t0 = time.perf_counter()
    ctx = encode_prompt(args.prompt, encoder, tokenizer, cfg.model.text_len, args.device)
    save_prompt_embeds(args.out, ctx, args.prompt)
    print(f"{args.out}: {tuple(ctx.shape)} text context in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_data(args) -> int:
    from .identities import IDENTITIES, identity_image

    if args.what == "identities":
        for name in sorted(IDENTITIES):
            print(name)
            if args.out:
                from PIL import Image

                Path(args.out).mkdir(parents=True, exist_ok=True)
                Image.fromarray(identity_image(name, args.size)).save(Path(args.out) / f"{name}.png")
        return 0
    if not args.out:
        raise AvatarForcingError("data synth needs --out DIR")
    if args.size % 16 or args.size < 64:
        raise AvatarForcingError(f"--size must be a multiple of 16 and >= 64, got {args.size}")
    from .data.corpus import contact_sheet, synth

    t0 = time.perf_counter()
    synth(args.out, args.clips, args.seconds, args.split, args.seed, args.size, args.workers, args.shard_size,
          clip_files=not args.shards_only, synthesisers=tuple(args.voices.split(",")))
    dt = time.perf_counter() - t0
    frames = args.clips * round(args.seconds * 25)
    print(f"{args.out}: {args.clips} {args.split} clips, {frames} frames in {dt:.1f} s ({frames / dt:.0f} frames/s)")
    if args.preview and not args.shards_only:
        contact_sheet(Path(args.out) / "clips" / f"{args.split}-00000", args.preview)
        print(f"contact sheet: {args.preview}")
    return 0


def cmd_train(args) -> int:
    import dataclasses

    import yaml

    from .config import Config
    from .train.recipe import SMOKE, RecipeConfig, run_recipe

    if args.stage == "listener":
        return _train_listener(args)
    if args.stage == "robust":
        return _train_robust(args)
    if args.stage == "syncnet":
        from .eval.nets import EVAL_WEIGHTS, train_eval_nets

        meta = train_eval_nets(args.corpus, args.export or EVAL_WEIGHTS, steps=30 if args.smoke else 1500,
                               device=args.device)
        print(f"eval nets (SyncNet-style, mouth reader, identity): {meta}")
        return 0
    order = ["vae", "latents", "teacher", "ode-gen", "ode", "dmd", "export"]
    last = {"vae": "vae", "teacher": "teacher", "ode-generate": "ode-gen", "ode": "ode", "dmd": "dmd",
            "recipe": "export"}[args.stage]
    stages = tuple(order[: order.index(last) + 1])
    r = SMOKE if args.smoke else RecipeConfig()
    if args.config:
        r = dataclasses.replace(r, **(yaml.safe_load(Path(args.config).read_text()) or {}))
    _require_corpus(args.corpus)
    try:
        times = run_recipe(args.corpus, args.out, args.device, r, stages=stages, export_to=args.export,
                           minutes=args.minutes, cfg=Config.load(args.model_config) if args.model_config else None)
    except TimeoutError as e:
        print(f"avatarforcing train: {e}")
        return 3
    print(f"train {args.stage}: done; cumulative seconds per stage: {times}")
    return 0


def _require_corpus(corpus: str) -> None:
    if not (Path(corpus) / "shards").is_dir():
        raise AvatarForcingError(f"{corpus}: no corpus shards; run `avatarforcing data synth --out {corpus}`"
                                 " for the train and heldout splits first")


def _train_robust(args) -> int:
    import dataclasses

    import yaml

    from .api import model_folder
    from .train.recipe import SMOKE
    from .train.robust import RobustConfig, run_robust

    smoke = RobustConfig(versions=2, workers=0, recipe=dataclasses.replace(SMOKE, decoder_steps=2, sample_every=0))
    rc = smoke if args.smoke else RobustConfig()
    if args.config:
        d = yaml.safe_load(Path(args.config).read_text()) or {}
        rc = RobustConfig.from_dict({**dataclasses.asdict(rc), **d,
                                     "recipe": {**dataclasses.asdict(rc.recipe), **d.get("recipe", {})}})
    _require_corpus(args.corpus)
    try:
        info = run_robust(args.corpus, model_folder(args.model), args.out, args.device, rc, export_to=args.export,
                          minutes=args.minutes)
    except TimeoutError as e:
        print(f"avatarforcing train: {e}")
        return 3
    print(json.dumps(info, indent=1))
    return 0


def _train_listener(args) -> int:
    import dataclasses

    import yaml

    from .api import model_folder
    from .config import Config
    from .train.listener import ListenerTrainConfig, train_listener

    folder = model_folder(args.model)
    cfg = Config.load(folder / "config.yaml")
    if cfg.codec.audio != "mel":
        raise AvatarForcingError(f"{folder}: the listener adapts mel rows; this model's codec.audio is "
                                 f"{cfg.codec.audio!r}")
    tcfg = ListenerTrainConfig(steps=40, batch=2, workers=0) if args.smoke else ListenerTrainConfig()
    if args.config:
        tcfg = dataclasses.replace(tcfg, **(yaml.safe_load(Path(args.config).read_text()) or {}))
    corpora = args.corpus.split(",")
    report = train_listener(corpora if len(corpora) > 1 else corpora[0], folder, args.out,
                            cfg.override({"codec.listener": "none"}), tcfg,
                            minutes=args.minutes, export=args.export)
    print(json.dumps(report, indent=1))
    return 0


def cmd_eval(args) -> int:
    import json

    from .eval.nets import EVAL_WEIGHTS

    nets_dir = args.eval_nets or EVAL_WEIGHTS
    if args.what == "longform":
        from .eval.longform import markdown_table, run_longform

        res = run_longform(args.model, args.clips, args.frames, [m for m in args.modes.split(",") if m],
                           args.json, args.report, eval_nets=nets_dir, device=args.device,
                           fid_extractor=args.fid_extractor, batch=args.batch, workers=args.workers,
                           deadline_minutes=args.deadline_min, first=args.first, syncnet_v2=args.syncnet_v2,
                           voices=tuple(args.voices.split(",")))
        print(markdown_table(res))
        return 0
    if args.what == "merge":
        from .eval.longform import markdown_table, merge_longform, write_report

        if not args.parts:
            raise AvatarForcingError("eval merge needs the JSON files of the runs: --parts A.json B.json ...")
        parts = []
        for p in args.parts:
            try:
                parts.append(json.loads(Path(p).read_text()))
            except (OSError, ValueError) as e:
                raise AvatarForcingError(f"{p}: not a readable longform JSON ({e})") from e
        try:
            res = merge_longform(parts)
        except KeyError as e:
            raise AvatarForcingError(f"eval merge: a part lacks {e}; expected `eval longform` JSON files") from e
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        if args.report:
            write_report(res, Path(args.report))
        print(markdown_table(res))
        return 0
    if not args.video:
        raise AvatarForcingError("eval video needs --video FILE.mp4")
    import numpy as np

    from .data.audio import load_audio
    from .data.image import load_image
    from .data.video import read_video
    from .eval.metrics import MIN_FLOOR_S, RATE, evaluate_video
    from .eval.nets import load_eval_nets

    frames, fps, own_audio = read_video(args.video)
    if abs(fps - 25) > 0.01:
        raise AvatarForcingError(f"{args.video}: {fps:.2f} fps; the metrics expect 25 fps")
    audio = load_audio(args.audio, RATE) if args.audio else own_audio
    if audio is None:
        raise AvatarForcingError(f"{args.video}: no audio track; pass --audio")
    video_s, audio_s = len(frames) / fps, len(audio) / RATE
    if abs(video_s - audio_s) > 1.0:
        print(f"note: the video is {video_s:.1f} s, its audio {audio_s:.1f} s; the metrics use the first "
              f"{min(video_s, audio_s):.1f} s of both", file=sys.stderr)
    ref = None
    if args.reference:
        ref = np.asarray(load_image(args.reference).resize(frames.shape[2:0:-1]))
    lse_net = None
    if args.syncnet_v2:
        from .eval.syncnet_v2 import load_syncnet_v2

        lse_net = load_syncnet_v2(args.syncnet_v2, args.device)
    try:
        res = evaluate_video(load_eval_nets(nets_dir).to(args.device), frames, audio, ref, syncnet_v2=lse_net,
                             floors=True)
    except InputError as e:
        raise InputError(f"{args.video}: {e}") from None
    if "sync_c_floor95" not in res:
        print(f"note: {res['frames'] / fps:.1f} s is too short for loudness sync and the floors (they need "
              f"{MIN_FLOOR_S} s); not reported", file=sys.stderr)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_serve(args) -> int:
    if args.ray:
        from .serve.ray import serve_forever

        autoscale = None
        if args.autoscale:
            try:
                lo, hi = (int(x) for x in args.autoscale.split(":"))
            except ValueError:
                raise AvatarForcingError(f"--autoscale {args.autoscale!r}: expected MIN:MAX, e.g. 1:4") from None
            if not 1 <= lo <= hi:
                raise AvatarForcingError(f"--autoscale {args.autoscale!r}: need 1 <= MIN <= MAX")
            autoscale = (lo, hi)
        prompt = _prompt(args)
        if prompt["prompt_embeds"]:
            raise AvatarForcingError("serve --ray takes --prompt or --prompt-file (replicas encode it themselves)")
        serve_forever(model=args.model, host=args.host, port=args.port, device=args.device,
                      sessions=args.sessions_per_replica, replicas=args.replicas, autoscale=autoscale,
                      gpus_per_replica=args.gpus_per_replica, address=args.address, dtype=args.dtype,
                      prompt=prompt["prompt"])
        return 0
    from .serve.app import serve

    serve(args.model, args.host, args.port, args.max_sessions, args.device, dtype=args.dtype, engine=args.engine,
          allow_origins=tuple(args.allow_origin or ()), docs=args.docs, **_prompt(args))
    return 0


def cmd_missing(what: str):
    def run(args) -> int:
        raise Missing(what)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatarforcing", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="portrait + speech file -> talking-avatar MP4 (H.264 + AAC)",
                       description="Stream a speech file through the model and write the video incrementally.")
    _add_reference_args(g)
    g.add_argument("--audio", required=True, help="speech (wav/flac/ogg/mp3/m4a)")
    g.add_argument("--out", required=True, help="output .mp4")
    g.add_argument("--latent-frames", type=int, help="release output: exactly 1 + 4 (N - 1) frames for N latent "
                                                      "frames, as the release's --num_output_frames")
    _add_model_args(g)
    _add_prompt_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stream", help="raw PCM on stdin -> raw rgb24 frames on stdout, as they are ready",
                       description="Pipe speech in (16 kHz mono) and frames out, e.g. into ffmpeg -f rawvideo.")
    _add_reference_args(s)
    s.add_argument("--format", choices=["s16le", "f32le"], default="s16le", help="input sample format")
    s.add_argument("--chunk", type=int, default=640, help="samples read per push")
    _add_model_args(s)
    _add_prompt_args(s)
    s.set_defaults(func=cmd_stream)

    v = sub.add_parser("serve", help="real-time WebSocket server and browser page",
                       description="FastAPI + uvicorn: WebSocket /ws (docs/protocol.md), the browser page at /, "
                                   "/healthz and /metrics (Prometheus).")
    v.add_argument("--model", default="mini")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-sessions", type=int, default=4)
    v.add_argument("--device", default="cpu")
    v.add_argument("--allow-origin", action="append", help="a web origin (https://example.org) whose pages may "
                                                           "open streams, besides this server's own page; '*': any")
    v.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    r = v.add_argument_group("Ray Serve (many replicas, GPUs, machines; pip install -e '.[ray]')")
    r.add_argument("--ray", action="store_true", help="serve as a Ray Serve application")
    r.add_argument("--replicas", type=int, default=2, help="fixed number of replicas (default 2)")
    r.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale replicas on live sessions instead")
    r.add_argument("--sessions-per-replica", type=int, default=2, help="session slots of each replica")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica owns (1 with --device cuda)")
    r.add_argument("--address", help="an existing Ray cluster (e.g. auto, or ray://head:10001); default: start one")
    _add_prompt_args(v)
    v.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="training stages: vae, teacher, ode-generate, ode, dmd, recipe, listener, robust",
                       description="Run the mini recipe up to a stage (earlier stages are resumed or reused). "
                                   "Every stage checkpoints atomically in --out and resumes where it stopped.")
    t.add_argument("stage", choices=["vae", "teacher", "ode-generate", "ode", "dmd", "recipe", "syncnet", "listener",
                                     "robust"])
    t.add_argument("--model", default="mini", help="listener: the model whose audio rows it learns to give back; "
                                                   "robust: the model to fine-tune")
    t.add_argument("--corpus", default="data/corpus", help="corpus folder from `avatarforcing data synth` (listener: "
                                                           "several, comma-separated)")
    t.add_argument("--out", default="runs/mini", help="checkpoints, logs (JSONL) and intermediate data")
    t.add_argument("--export", help="write the trained student + VAE as a model folder here (recipe)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--smoke", action="store_true", help="a few steps of every stage (end-to-end check)")
    t.add_argument("--minutes", type=float, help="wall-clock budget; stops with a checkpoint, rerun to resume")
    t.add_argument("--config", help="recipe overrides as YAML (fields of RecipeConfig)")
    t.add_argument("--model-config", help="recipe: the model to train as YAML (`preset: mini` and the fields to "
                                          "change, e.g. benchmarks/mini_wide.yaml); default: the mini preset")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="metrics and the long-form benchmark",
                       description="longform: every mode/ablation on the same held-out clips -> JSON, markdown, "
                                   "PNG drift curves. video: the same metrics on any MP4 (with its audio). "
                                   "merge: one result from longform runs over consecutive clip ranges.")
    e.add_argument("what", choices=["longform", "video", "merge"])
    e.add_argument("--parts", nargs="+", help="merge: longform JSONs of consecutive clip ranges (--first)")
    e.add_argument("--model", default="mini")
    e.add_argument("--clips", type=int, default=400)
    e.add_argument("--frames", type=int, default=400)
    e.add_argument("--modes", default="avatarforcing,ar,teacher,shuffled,no-style-anchor,no-rope-reindex,"
                                      "no-audio-zero-pad,no-temporal-anchor")
    e.add_argument("--json", help="write the JSON result here")
    e.add_argument("--report", help="folder for report.md and the PNG plots")
    e.add_argument("--eval-nets", help="folder with eval_nets.safetensors (default: the shipped ones)")
    e.add_argument("--video", help="eval video: the MP4 to score")
    e.add_argument("--audio", help="eval video: the speech (default: the MP4's own audio track)")
    e.add_argument("--reference", help="eval video: the reference portrait (for identity drift)")
    e.add_argument("--syncnet-v2", help="the public SyncNet's syncnet_v2.model: adds LSE-C / LSE-D (not shipped)")
    e.add_argument("--fid-extractor", help="TorchScript feature extractor for FID/FVD (default: corpus-trained)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch", type=int, default=1, help="longform: clips per engine run (e.g. 100 on a GPU)")
    e.add_argument("--workers", type=int, default=0, help="longform: processes synthesising clips ahead")
    e.add_argument("--voices", default="espeak", help="longform: held-out voices, espeak or espeak,flite (flite's "
                                                     "held-out speaker slt in 40%% of the clips; needs Debian flite)")
    e.add_argument("--first", type=int, default=0, help="longform: first clip index (resume a run cut short)")
    e.add_argument("--deadline-min", type=float, help="longform: stop after the batch that passes this many minutes "
                                                     "(the JSON is rewritten after every batch)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="speed benchmarks (JSON)",
                       description="speed: the streaming engine (DiT + VAE) per step; codec: VAE decode rate; "
                                   "serve: load test of the server on 127.0.0.1 with real-time clients; "
                                   "audio-rows: streaming wav2vec2 rows against whole-clip rows.")
    b.add_argument("what", choices=["speed", "codec", "serve", "audio-rows"])
    b.add_argument("--model", default="mini", choices=["mini", "wan-1.3b"])
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
    b.add_argument("--seconds", type=float, default=10.0, help="bench serve: seconds of audio per session")
    b.add_argument("--ray", action="store_true", help="bench serve: also the same sweep against serve --ray")
    b.add_argument("--replicas", type=int, default=2, help="bench serve --ray: replicas")
    b.add_argument("--audio-model", help="bench audio-rows: a wav2vec2-base-960h folder")
    b.add_argument("--audio", help="bench audio-rows: a speech file")
    b.add_argument("--left", default="25,50,100", help="bench audio-rows: left contexts to try (video frames)")
    b.add_argument("--lookahead", default="0,2,4,8", help="bench audio-rows: look-aheads to try (video frames)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("data", help="synthetic talking-head corpus: synth | identities",
                       description="synth: render a corpus split (MP4 + wav + ground truth + training shards); "
                                   "identities: list the built-in identities (or save their portraits).")
    d.add_argument("what", choices=["synth", "identities"])
    d.add_argument("--voices", default="espeak", help="synth: espeak or espeak,flite (flite's real-speaker voices "
                                                     "for 40%% of the clips; needs Debian's flite)")
    d.add_argument("--out", help="corpus folder (synth) or folder for portrait PNGs (identities)")
    d.add_argument("--clips", type=int, default=16)
    d.add_argument("--seconds", type=float, default=16.0)
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--split", choices=["train", "heldout"], default="train")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--shard-size", type=int, default=16)
    d.add_argument("--preview", help="write a contact sheet PNG of the first clip here")
    d.add_argument("--shards-only", action="store_true", help="skip the per-clip MP4/wav/PNG (training only)")
    d.set_defaults(func=cmd_data)

    c = sub.add_parser("convert", help="published weights -> a model folder that `generate --model` runs",
                       description="Official AvatarForcing model.pt / ode_audio_init.pt (+ --wan Wan2.1-T2V-1.3B/ "
                                   "+ --wav2vec2 wav2vec2-base-960h/ for a complete folder), OmniAvatar (Wan base + "
                                   "--lora), Wan2.1 (original or diffusers layout) -> our format. Official "
                                   "checkpoints get the release's engine settings (README, 'Published weights').")
    c.add_argument("src", help="checkpoint file or folder")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--wan", help="the Wan2.1-T2V-1.3B folder: VAE copied in, umT5 encoder + tokenizer referenced")
    c.add_argument("--wav2vec2", help="the wav2vec2-base-960h folder (referenced)")
    c.add_argument("--format", default="auto", choices=["auto", "avatarforcing", "wan"])
    c.add_argument("--lora", help="OmniAvatar checkpoint (LoRA + audio modules) on top of the Wan base SRC")
    c.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 64, the release's, for rank 128 only)")
    c.add_argument("--lora-rank", type=int, help="expected LoRA rank (checked against the checkpoint)")
    c.add_argument("--ema", action="store_true", help="take generator_ema from an AvatarForcing checkpoint")
    c.add_argument("--preset", default="wan-1.3b", choices=["mini", "wan-1.3b"])
    c.add_argument("--config", help="a config YAML instead of the preset")
    c.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    c.add_argument("--paper-engine", action="store_true", help="official checkpoints: keep the paper's re-indexed "
                                                               "positions and our input handling, not the release's")
    c.add_argument("--cache-prompt", nargs="?", const="", metavar="PROMPT",
                   help="encode a default prompt now (the built-in one if none given) into prompt.safetensors")
    c.set_defaults(func=cmd_convert)

    ep = sub.add_parser("encode-prompt", help="prompt -> cached umT5 embeddings (load the 5.7B encoder once)",
                        description="Encode a prompt with the model's umT5 encoder (GPU bf16 if present, else CPU) "
                                    "and write [1, text_len, 4096] to a safetensors file for --prompt-embeds.")
    ep.add_argument("prompt")
    ep.add_argument("--model", required=True, help="model folder (its components.yaml names the encoder)")
    ep.add_argument("--out", required=True, help="output .safetensors")
    ep.add_argument("--text-encoder", help="umT5 weights (.pth or text_encoder/ folder) instead of the model's")
    ep.add_argument("--tokenizer", help="tokenizer folder (google/umt5-xxl/) instead of the model's")
    ep.add_argument("--device", help="default: cuda if available, else cpu")
    ep.set_defaults(func=cmd_encode_prompt)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AvatarForcingError as e:
        print(f"avatarforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

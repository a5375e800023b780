"""``avatarforcing generate``: a portrait and a speech file -> an MP4."""

from __future__ import annotations

import time

from .common import add_model_args, add_prompt_args, add_reference_args, load_avatar, options, prompt, reference


def add(sub) -> None:
    g = sub.add_parser("generate", help="portrait + speech file -> talking-avatar MP4 (H.264 + AAC)",
                       description="Stream a speech file through the model and write the video incrementally.")
    add_reference_args(g)
    g.add_argument("--audio", required=True, help="speech (wav/flac/ogg/mp3/m4a)")
    g.add_argument("--out", required=True, help="output .mp4")
    g.add_argument("--latent-frames", type=int, help="release output: exactly 1 + 4 (N - 1) frames for N latent "
                                                      "frames, as the release's --num_output_frames")
    add_model_args(g)
    add_prompt_args(g)
    g.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..data.video import VideoWriter

    avatar = load_avatar(args)
    rate = avatar.cfg.codec.sample_rate
    pcm = avatar.load_audio(args.audio)
    t0 = time.perf_counter()
    if avatar.whole_clip(args.latent_frames):  # the release: the file's audio rows at once, offline
        video = avatar.generate(reference(args), pcm, seed=args.seed, mode=args.mode, options=options(args),
                                latent_frames=args.latent_frames, **prompt(args))
        with VideoWriter(args.out, fps=avatar.cfg.codec.fps, sample_rate=rate) as writer:
            writer.add_audio(pcm)
            writer.write(video)
            n = writer.frames_written
        dt = time.perf_counter() - t0
        print(f"{args.out}: {n} frames, {dt:.1f} s, {n / dt:.1f} fps (offline: audio rows over the whole clip)")
        return 0
    session = avatar.session(reference(args), seed=args.seed, mode=args.mode, options=options(args),
                             **prompt(args))
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

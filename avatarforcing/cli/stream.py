"""``avatarforcing stream``: raw PCM on stdin -> raw rgb24 frames on stdout, as they are ready."""

from __future__ import annotations

import sys

from ..errors import InputError
from .common import add_model_args, add_prompt_args, add_reference_args, load_avatar, options, prompt, reference


def add(sub) -> None:
    s = sub.add_parser("stream", help="raw PCM on stdin -> raw rgb24 frames on stdout, as they are ready",
                       description="Pipe speech in (16 kHz mono) and frames out, e.g. into ffmpeg -f rawvideo.")
    add_reference_args(s)
    s.add_argument("--format", choices=["s16le", "f32le"], default="s16le", help="input sample format")
    s.add_argument("--chunk", type=int, default=640, help="samples read per push")
    add_model_args(s)
    add_prompt_args(s)
    s.set_defaults(func=run)


def run(args) -> int:
    from ..serve.protocol import FORMATS, ClientError, decode_pcm

    avatar = load_avatar(args)
    session = avatar.session(reference(args), seed=args.seed, mode=args.mode, options=options(args),
                             **prompt(args))
    c = avatar.cfg.codec
    print(f"avatarforcing stream: in {args.format} mono {c.sample_rate} Hz; out rgb24 {c.width}x{c.height} "
          f"@ {c.fps} fps; look-ahead {session.lookahead_ms:.0f} ms", file=sys.stderr)
    width = FORMATS[args.format][1]
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
        try:
            pcm = decode_pcm(data[:usable], args.format)  # the same decoding as the server's
        except ClientError as e:
            raise InputError(f"stdin: {e}") from None
        for frames in session.push(pcm):
            out.write(frames.tobytes())
            out.flush()
    for frames in session.close():
        out.write(frames.tobytes())
    out.flush()
    return 0

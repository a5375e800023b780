"""What several commands share: the portrait, the model and its engine, the prompt, the ablations."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import AvatarForcingError
from ..stream.options import Options


def add_reference_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="portrait (jpg/png/webp)")
    src.add_argument("--identity", help="a built-in identity name (see `avatarforcing data identities`)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mini", help="shipped model name or model folder (default: mini)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--audio-model", help="local wav2vec2-base-960h folder (models with the wav2vec2 front end)")
    p.add_argument("--mode", default="avatarforcing", choices=["avatarforcing", "ar", "teacher"],
                   help="sampler: AvatarForcing window, one-step AR forcing, or the multi-step teacher")
    p.add_argument("--seed", type=int, default=0)
    for name in Options.names():
        p.add_argument(f"--no-{name}", action="store_true", help=f"ablation: disable the {name.replace('-', ' ')}")
    p.add_argument("--audio-lookahead", type=int, help="wav2vec2 streaming: video frames of audio look-ahead per "
                                                        "block (adds 40 ms each to the latency)")
    p.add_argument("--audio-left-context", type=int, help="wav2vec2 streaming: video frames of left context")


def overrides(args) -> dict:
    out = {}
    if args.audio_lookahead is not None:
        out["codec.audio_lookahead_frames"] = args.audio_lookahead
    if args.audio_left_context is not None:
        out["codec.audio_left_context_frames"] = args.audio_left_context
    return out


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    t = p.add_mutually_exclusive_group()
    t.add_argument("--prompt", help="text prompt (wan models; encoded by the model's umT5 and cached)")
    t.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    t.add_argument("--prompt-embeds", help="cached embeddings from `avatarforcing encode-prompt`")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="model precision (default: bf16 on a GPU, "
                                                                    "fp32 on the CPU)")
    p.add_argument("--engine", help="inference variant: eager, compiled, graphs, fp8, or joined with '+' (default: "
                                    "compiled on a GPU, eager on the CPU; see `bench speed --variants`)")


def prompt(args) -> dict:
    """The prompt arguments as ``Avatar.session`` keywords."""
    text = args.prompt
    if args.prompt_file:
        f = Path(args.prompt_file)
        if not f.is_file():
            raise AvatarForcingError(f"{f}: prompt file not found")
        text = f.read_text(encoding="utf-8").strip()
    return {"prompt": text, "prompt_embeds": args.prompt_embeds}


def options(args) -> Options:
    """The ablation flags (``--no-<name>``) as the sampler's Options."""
    return Options.without(*(n for n in Options.names() if getattr(args, "no_" + n.replace("-", "_"))))


def reference(args):
    if args.image:
        return args.image
    from ..identities import identity_image

    return identity_image(args.identity)


def load_avatar(args):
    """The model of a generating command (generate, stream) with its flags."""
    from ..api import Avatar

    return Avatar.load(args.model, args.device, args.audio_model, args.dtype, overrides(args), args.engine)


def require_corpus(corpus: str) -> None:
    if not (Path(corpus) / "shards").is_dir():
        raise AvatarForcingError(f"{corpus}: no corpus shards; run `avatarforcing data synth --out {corpus}`"
                                 " for the train and heldout splits first")

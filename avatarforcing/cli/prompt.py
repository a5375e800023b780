"""``avatarforcing encode-prompt``: a prompt -> cached umT5 embeddings."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import AvatarForcingError


def add(sub) -> None:
    ep = sub.add_parser("encode-prompt", help="prompt -> cached umT5 embeddings (load the 5.7B encoder once)",
                        description="Encode a prompt with the model's umT5 encoder (GPU bf16 if present, else CPU) "
                                    "and write [1, text_len, 4096] to a safetensors file for --prompt-embeds.")
    ep.add_argument("prompt")
    ep.add_argument("--model", required=True, help="model folder (its components.yaml names the encoder)")
    ep.add_argument("--out", required=True, help="output .safetensors")
    ep.add_argument("--text-encoder", help="umT5 weights (.pth or text_encoder/ folder) instead of the model's")
    ep.add_argument("--tokenizer", help="tokenizer folder (google/umt5-xxl/) instead of the model's")
    ep.add_argument("--device", help="default: cuda if available, else cpu")
    ep.set_defaults(func=run)


def run(args) -> int:
    from ..api import read_components
    from ..codecs.text import encode_prompt, save_prompt_embeds
    from ..config import Config

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

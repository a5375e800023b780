"""``avatarforcing convert``: published weights -> a model folder."""

from __future__ import annotations


def add(sub) -> None:
    c = sub.add_parser("convert", help="published weights -> a model folder that `generate --model` runs",
                       description="Official AvatarForcing model.pt / ode_audio_init.pt (+ --wan Wan2.1-T2V-1.3B/ "
                                   "+ --wav2vec2 wav2vec2-base-960h/ for a complete folder), OmniAvatar (Wan base + "
                                   "--lora), Wan2.1 (original or diffusers layout) -> our format. Official "
                                   "checkpoints get the release's engine settings (docs/weights.md).")
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
    c.set_defaults(func=run)


def run(args) -> int:
    from ..convert import convert

    out = convert(args.src, args.out, config=args.config, preset_name=args.preset, fmt=args.format, lora=args.lora,
                  ema=args.ema, dtype=args.dtype, lora_alpha=args.lora_alpha, lora_rank=args.lora_rank,
                  wan=args.wan, wav2vec2=args.wav2vec2, paper_engine=args.paper_engine, cache_prompt=args.cache_prompt)
    print(f"wrote {out}")
    return 0

"""Downloaded weights -> a complete model folder that ``Avatar.load`` runs.

    model.pt (+ Wan2.1-T2V-1.3B/ + wav2vec2-base-960h/)
        -> out/config.yaml          the wan-1.3b shape; the release's engine settings for official checkpoints
           out/model.safetensors    the DiT, LoRA merged (alpha / rank), bf16 by default
           out/Wan2.1_VAE.pth | vae/  the VAE (hard link, or a copy)
           out/components.yaml      where the umT5 encoder, its tokenizer and wav2vec2 are (referenced, not copied)
           out/prompt.safetensors   optional: a default prompt encoded once (--cache-prompt)

A Wan folder comes in the original layout (``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
``google/umt5-xxl/``) or the diffusers layout (``vae/``, ``text_encoder/``, ``tokenizer/``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
import yaml

from .checkpoints import (
    atomic_write,
    avatarforcing_state_dict,
    load_into,
    omniavatar_state_dict,
    read_checkpoint,
    save_model,
)
from .config import Config, preset, release
from .errors import InputError
from .model import AvatarDiT

WAN_ORIGINAL = {"vae": "Wan2.1_VAE.pth", "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
                "tokenizer": "google/umt5-xxl"}
WAN_DIFFUSERS = {"vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}


def wan_parts(folder: str | Path) -> dict[str, Path]:
    """The VAE, umT5 encoder and tokenizer of a Wan2.1 folder (original or diffusers layout)."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{d}: Wan2.1 folder not found")
    for layout in (WAN_ORIGINAL, WAN_DIFFUSERS):
        if (d / layout["vae"]).exists():
            break
    else:
        raise InputError(f"{d}: no VAE (expected {WAN_ORIGINAL['vae']} or {WAN_DIFFUSERS['vae']}/): "
                         f"not a Wan2.1 folder")
    parts = {k: d / v for k, v in layout.items()}
    if not parts["text_encoder"].exists():
        raise InputError(f"{d}: no umT5 text encoder (expected {layout['text_encoder']})")
    if not parts["tokenizer"].is_dir():
        raise InputError(f"{d}: no umT5 tokenizer folder (expected {layout['tokenizer']}/)")
    from .codecs.text import load_tokenizer

    load_tokenizer(parts["tokenizer"])  # fails early, with the folder named, if it is not a tokenizer
    return parts


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def convert(src: str | Path, out: str | Path, config: str | None = None, preset_name: str = "wan-1.3b",
            fmt: str = "auto", lora: str | None = None, ema: bool = False, dtype: str = "bf16",
            lora_alpha: float | None = None, lora_rank: int | None = None, wan: str | None = None,
            wav2vec2: str | None = None, paper_engine: bool = False, cache_prompt: str | None = None) -> Path:
    """Write a model folder; returns its path. ``cache_prompt``: "" for the built-in default prompt."""
    cfg = Config.load(config) if config else preset(preset_name)
    parts = wan_parts(wan) if wan else {}
    if wav2vec2 is not None and not (Path(wav2vec2) / "config.json").is_file():
        raise InputError(f"{wav2vec2}: not a wav2vec2 model folder (expected config.json and weights)")
    if lora:
        sd, official = omniavatar_state_dict(src, lora, lora_alpha, lora_rank), False
    elif fmt == "avatarforcing":
        sd, official = avatarforcing_state_dict(src, ema, lora_alpha, lora_rank), True
    else:
        sd, official = read_checkpoint(src, ema, lora_alpha, lora_rank)
        official = official and fmt == "auto"  # only a detected official checkpoint gets the release's settings
    if "patch_embedding.weight" in sd and sd["patch_embedding.weight"].shape[1] != cfg.model.in_channels:
        plain = sd["patch_embedding.weight"].shape[1] == cfg.model.latent_channels
        if plain and "audio_proj.proj.weight" not in sd:  # a text-to-video Wan checkpoint
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, reference_conditioning=False,
                                                                     audio_dim=0))
    if official and not paper_engine:
        cfg = release(cfg)
    with torch.device("meta"):
        model = AvatarDiT(cfg.model)
    load_into(model, sd, str(src), assign=True)
    out = Path(out)
    save_model(model, cfg, out, dtype=dtype)
    components = {}
    if parts:
        _link_or_copy(parts["vae"], out / parts["vae"].name)
        components.update(text_encoder=str(parts["text_encoder"].resolve()),
                          tokenizer=str(parts["tokenizer"].resolve()))
    if wav2vec2:
        components["wav2vec2"] = str(Path(wav2vec2).resolve())
    if components:
        atomic_write(out / "components.yaml", lambda p: p.write_text(yaml.safe_dump(components, sort_keys=True)))
    if cache_prompt is not None:
        if not parts:
            raise InputError("--cache-prompt needs --wan (the umT5 encoder lives in the Wan folder)")
        from .codecs.text import DEFAULT_PROMPT, encode_prompt, save_prompt_embeds

        text = cache_prompt or DEFAULT_PROMPT
        ctx = encode_prompt(text, parts["text_encoder"], parts["tokenizer"], cfg.model.text_len)
        save_prompt_embeds(out / "prompt.safetensors", ctx, text)
    if cfg.codec.vae == "wan" and not parts and not any((out / n).exists() for n in ("vae", "Wan2.1_VAE.pth")):
        print(f"note: {out} has no VAE yet; pass --wan WAN_FOLDER, or put Wan2.1_VAE.pth (or vae/) beside the model")
    return out

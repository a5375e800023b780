"""Load and convert checkpoints: official AvatarForcing, OmniAvatar, Wan2.1 (original and diffusers
layouts) and our own format (safetensors + config.yaml). Our key names are the original Wan names.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import Config
from .errors import CheckpointError

StateDict = dict[str, Tensor]

WRAPPER_PREFIXES = ("model.", "module.", "_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
LORA_RANK, LORA_ALPHA = 128, 64.0  # AvatarForcing / OmniAvatar: rank 128, alpha 64 -> scale 0.5

# diffusers WanTransformer3DModel -> original Wan names (ours). Block-level names use {i}.
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # the trap: diffusers' norm2 is the affine cross-attention norm
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}


# ---------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> StateDict:
    """A .safetensors / .pt / .pth / .bin file, or a folder of (sharded) safetensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: folder holds no .safetensors files")
        sd: StateDict = {}
        for f in files:
            sd.update(read_state_dict(f))
        return sd
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def strip_prefixes(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
            k = k.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
        out[k] = v
    return out


def merge_lora(sd: StateDict, alpha: float | None = None, rank: int | None = None) -> StateDict:
    """peft layout -> plain weights: W = W_base + (alpha / rank) * B @ A; biases from base_layer.

    The rank is read from the checkpoint (``rank``, if given, must agree). ``alpha`` defaults to the
    release's 64 only for the release's rank 128: any other rank needs its alpha stated (the scale is
    alpha / rank, and a wrong one silently mis-scales every merged weight).
    """
    out: StateDict = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"(.*)\.lora_([AB])(?:\.default)?\.weight$", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k.replace(".base_layer.", ".")] = v
    ranks = sorted({ab["A"].shape[0] for ab in lora.values() if "A" in ab})
    if len(ranks) > 1:
        raise CheckpointError(f"LoRA ranks differ between layers ({ranks}); expected one rank")
    if ranks and rank is not None and ranks[0] != rank:
        raise CheckpointError(f"LoRA rank mismatch: the checkpoint's LoRA has rank {ranks[0]}, --lora-rank says {rank}")
    if ranks and alpha is None:
        if ranks[0] != LORA_RANK:
            raise CheckpointError(f"LoRA rank {ranks[0]} is not the release's {LORA_RANK}: pass the alpha it was "
                                  f"trained with (--lora-alpha); the merge scale is alpha / rank")
        alpha = LORA_ALPHA
    for name, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA for {name} is missing lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if f"{name}.weight" not in out:
            raise CheckpointError(f"LoRA for {name} has no base weight ({name}.weight or {name}.base_layer.weight)")
        w = out[f"{name}.weight"]
        r = a.shape[0]
        if b.shape != (w.shape[0], r) or a.shape[1] != w.shape[1]:
            raise CheckpointError(f"LoRA for {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                  f"the weight {tuple(w.shape)}")
        if w.is_meta:
            out[f"{name}.weight"] = w
        else:
            out[f"{name}.weight"] = (w.float() + (alpha / r) * (b.float() @ a.float())).to(w.dtype)
    return out


def diffusers_to_wan(sd: StateDict) -> StateDict:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to the original Wan layout."""
    out: StateDict = {}
    for k, v in sd.items():
        base, _, leaf = k.rpartition(".")
        m = re.match(r"blocks\.(\d+)\.(.+)$", base if leaf in ("weight", "bias") else k)
        if m:
            i, rest = m.groups()
            name = _DIFFUSERS_BLOCK.get(rest, rest)
            out[f"blocks.{i}.{name}" + (f".{leaf}" if leaf in ("weight", "bias") else "")] = v
        elif k == "scale_shift_table":
            out["head.modulation"] = v
        elif re.match(r"blocks\.\d+\.scale_shift_table$", k):
            out[k.replace("scale_shift_table", "modulation")] = v
        else:
            out[f"{_DIFFUSERS_TOP.get(base, base)}.{leaf}"] = v
    return out


def is_diffusers_layout(sd: StateDict) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd)


# ---------------------------------------------------------------- loading into a model


def load_into(model: nn.Module, sd: StateDict, source: str, strict: bool = True, assign: bool = False) -> None:
    """Load with a clear report of missing / unexpected / mis-shaped keys (first few of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped keys, e.g. {shapes[:5]}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False, assign=assign)


def avatarforcing_state_dict(path: str | Path, use_ema: bool = False, alpha: float | None = None,
                             rank: int | None = None) -> StateDict:
    """The official release's ``model.pt`` / ``ode_audio_init.pt`` as our plain state dict."""
    return _generator(read_state_dict(path), path, use_ema, alpha, rank)


def _generator(raw: dict, path, use_ema: bool, alpha: float | None, rank: int | None) -> StateDict:
    key = "generator_ema" if use_ema else "generator"
    if key not in raw:
        if use_ema and "generator" in raw:
            raise CheckpointError(f"{path}: has no 'generator_ema' (only 'generator'); drop the EMA option")
        raise CheckpointError(f"{path}: expected an AvatarForcing checkpoint with a '{key}' entry, "
                              f"found keys {sorted(raw)[:8]}")
    return merge_lora(strip_prefixes(raw[key]), alpha, rank)


def wan_state_dict(path: str | Path) -> StateDict:
    """Wan2.1 DiT in the original or the diffusers layout (file or folder) as our names."""
    sd = strip_prefixes(read_state_dict(path))
    return diffusers_to_wan(sd) if is_diffusers_layout(sd) else sd


def omniavatar_state_dict(base: str | Path, lora: str | Path, alpha: float | None = None,
                          rank: int | None = None) -> StateDict:
    """Wan2.1 base weights + the OmniAvatar checkpoint (LoRA, audio modules, 33-channel patch embedding)."""
    sd = wan_state_dict(base)
    sd.update(strip_prefixes(read_state_dict(lora)))  # merge_lora finds each base weight by the LoRA's name
    return merge_lora(sd, alpha, rank)


def read_checkpoint(path: str | Path, use_ema: bool = False, alpha: float | None = None,
                    rank: int | None = None) -> tuple[StateDict, bool]:
    """Any supported single checkpoint -> (our state dict, whether it is an official AvatarForcing one).
    The file is read once."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        raw = read_state_dict(path)
        if "generator" in raw or "generator_ema" in raw:
            return _generator(raw, path, use_ema, alpha, rank), True
        sd = strip_prefixes(raw)
        return merge_lora(diffusers_to_wan(sd) if is_diffusers_layout(sd) else sd, alpha, rank), False
    return merge_lora(wan_state_dict(path), alpha, rank), False


def detect_and_read(path: str | Path, use_ema: bool = False, alpha: float | None = None,
                    rank: int | None = None) -> StateDict:
    """Any supported single checkpoint -> our state dict (AvatarForcing .pt, Wan, our safetensors)."""
    return read_checkpoint(path, use_ema, alpha, rank)[0]


# ---------------------------------------------------------------- our format

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_model(model: nn.Module, cfg: Config, out_dir: str | Path, dtype: str = "fp32",
               name: str = "model.safetensors", extra: dict | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` (+ ``config.yaml``) atomically."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "avatarforcing", "dtype": dtype, **({"extra": json.dumps(extra)} if extra else {})}
    atomic_write(out / name, lambda p: save_file(sd, str(p), metadata=metadata))
    atomic_write(out / "config.yaml", lambda p: cfg.save(p))
    return out / name


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", name: str = "model.safetensors",
               dtype: torch.dtype = torch.float32):
    """Our format -> (AvatarDiT in ``dtype`` on ``device``, Config)."""
    from .model import AvatarDiT

    d = Path(model_dir)
    if not (d / "config.yaml").is_file():
        raise CheckpointError(f"{d}: not a model folder (expected config.yaml and {name})")
    cfg = Config.load(d / "config.yaml")
    model = AvatarDiT(cfg.model)
    sd = {k: v.float() for k, v in read_state_dict(d / name).items()}
    load_into(model, sd, str(d / name))
    return model.to(device, dtype).eval(), cfg

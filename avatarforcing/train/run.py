"""A training run's folder: what a stage leaves there, written so that a run cut at any moment resumes.

    out/model_config.yaml        the model config the run was started with (a resume with another is refused)
    out/STAGE.done               a finished stage, with its JSON info (steps, seconds, metrics)
    out/*.safetensors, *.npz     written atomically: a file that exists is complete
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..checkpoints import atomic_write
from ..config import Config
from ..errors import ConfigError


def save_tensors(tensors: dict, path: Path) -> None:
    """safetensors, written atomically (a file that exists is complete: resumption trusts existence)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp)))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """An .npz, written atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def done(out: Path, stage: str) -> bool:
    return (out / f"{stage}.done").exists()


def mark_done(out: Path, stage: str, info: dict | None = None) -> None:
    (out / f"{stage}.done").write_text(json.dumps(info or {}))


def done_info(out: Path, stages: tuple[str, ...]) -> dict:
    """The recorded info of each finished stage among ``stages``."""
    return {s: json.loads((out / f"{s}.done").read_text() or "{}") for s in stages if done(out, s)}


def check_run_config(out: Path, cfg: Config) -> None:
    """A run folder belongs to one model config: recorded on the first run, a resume with another is refused
    (its checkpoints would not fit the model)."""
    path = out / "model_config.yaml"
    if not path.exists():
        atomic_write(path, lambda tmp: cfg.save(tmp))
        return
    was = Config.load(path).to_dict()
    now = cfg.to_dict()
    changed = sorted(f"{part}.{k}" for part in now if isinstance(now[part], dict)
                     for k in now[part] if was.get(part, {}).get(k) != now[part][k])
    if changed or was.get("name") != now.get("name"):
        raise ConfigError(f"{out}: this run was started with another model config (differs in "
                          f"{changed or ['name']}; see {path}); resume it with that config or use a new --out")

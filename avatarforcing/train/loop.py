"""One training loop for every stage: AdamW, grad clipping, accumulation, EMA, bf16 autocast on GPU,
JSONL logs, atomic checkpoints and exact resume, DDP under torchrun.

Exact resume: a step's batch and noise depend only on (seed, step) — ``step_generator`` — never on
how many steps ran in this process, so a run killed at step k and resumed equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints import atomic_write


@dataclass
class LoopConfig:
    steps: int = 1000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.0  # 0: no EMA
    ema_start: int = 0
    log_every: int = 10
    save_every: int = 200
    seed: int = 0
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimiser state (FSDP2) instead of DDP


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _fully_shard(model: nn.Module) -> None:
    """FSDP2: one shard group per transformer block (when the model has ``blocks``), then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


class EMA:
    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)


class Trainer:
    """Holds the trainable module, its optimiser and EMA; ``run(step_fn)`` does the rest.

    ``step_fn(step, micro, generator) -> (loss, logs)`` computes one micro-batch's loss.
    """

    def __init__(self, name: str, model: nn.Module, out_dir: str | Path, cfg: LoopConfig,
                 device: torch.device, extra: dict[str, nn.Module] | None = None, params=None,
                 extra_optims: dict[str, torch.optim.Optimizer] | None = None):
        self.name, self.cfg, self.device = name, cfg, device
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.extra = extra or {}
        self.extra_optims = extra_optims or {}
        self.rank, self.world = world()
        self.ema = EMA(model) if cfg.ema_decay > 0 else None  # copied before sharding, then sharded alike
        self.ddp = None
        self.fsdp = cfg.fsdp and self.world > 1
        if self.fsdp:
            for m in [model] + ([self.ema.model] if self.ema else []):
                _fully_shard(m)
        elif self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(model)
        self.opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=cfg.lr,
                                     betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.step = 0
        self.seconds = 0.0  # wall-clock seconds spent in training steps, over every run (kept in the checkpoint)
        self._tb = None
        self.ckpt = self.out / f"{name}.ckpt"
        if self.ckpt.exists():
            self.load()

    @property
    def forward_model(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """Full (unsharded) state; under FSDP every rank must call this (it gathers). The extra modules and their
        optimisers (e.g. the DMD critic) are never sharded and are saved as they are in every mode."""
        extras = {"extra": {k: m.state_dict() for k, m in self.extra.items()},
                  "extra_optims": {k: o.state_dict() for k, o in self.extra_optims.items()}}
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {"step": self.step, "seconds": self.seconds, "model": get_model_state_dict(self.model, options=full),
                    "optim": get_optimizer_state_dict(self.model, self.opt, options=full),
                    "ema": get_model_state_dict(self.ema.model, options=full) if self.ema else None, **extras}
        return {"step": self.step, "seconds": self.seconds, "model": self.model.state_dict(),
                "optim": self.opt.state_dict(), "ema": self.ema.model.state_dict() if self.ema else None, **extras}

    def save(self) -> None:
        state = self.state()
        if self.rank == 0:
            atomic_write(self.ckpt, lambda p: torch.save(state, p))

    def load(self) -> None:
        s = torch.load(self.ckpt, map_location=self.device, weights_only=False)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, s["model"], options=full)
            set_optimizer_state_dict(self.model, self.opt, s["optim"], options=full)
            if self.ema and s["ema"] is not None:
                set_model_state_dict(self.ema.model, s["ema"], options=full)
        else:
            self.model.load_state_dict(s["model"])
            self.opt.load_state_dict(s["optim"])
            if self.ema and s["ema"] is not None:
                self.ema.model.load_state_dict(s["ema"])
        for k, m in self.extra.items():
            m.load_state_dict(s["extra"][k])
        for k, o in self.extra_optims.items():
            o.load_state_dict(s["extra_optims"][k])
        self.step, self.seconds = s["step"], s.get("seconds", 0.0)

    # ------------------------------------------------------------------ loop

    def log(self, record: dict) -> None:
        """One JSON line per record; also TensorBoard scalars when the tensorboard package is installed."""
        if self.rank != 0:
            return
        with open(self.out / f"{self.name}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard" / self.name))
            except Exception:  # noqa: BLE001 - tensorboard not installed
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{self.name}/{k}", v, record["step"])

    def run(self, step_fn: Callable, progress: bool = True, after_step: Callable | None = None,
            deadline: float | None = None, budget_seconds: float | None = None) -> None:
        """Train to ``cfg.steps``, or until the wall-clock ``deadline`` (a ``time.time()``) or until the stage has
        trained for ``budget_seconds`` in total over all its runs; then checkpoint and return."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, disable=not progress or self.rank != 0)
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            over_budget = budget_seconds is not None and self.seconds >= budget_seconds
            if over_budget or (deadline is not None and time.time() > deadline):
                self.save()
                self.log({"step": self.step, "stopped": "budget" if over_budget else "deadline"})
                break
            t_step = time.perf_counter()
            self.model.train()
            self.opt.zero_grad(set_to_none=True)
            logs: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                gen = step_generator(cfg.seed, self.step * cfg.grad_accum + micro, self.rank)
                with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                    loss, parts = step_fn(self.step, micro, gen)
                (loss / cfg.grad_accum).backward()
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.step += 1
            self.seconds += time.perf_counter() - t_step
            if self.ema:
                self.ema.update(self.model, 0.0 if self.step <= cfg.ema_start else cfg.ema_decay)
            if after_step:
                after_step(self.step)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                if self.world > 1:
                    t = torch.tensor([logs.get("loss", 0.0)])
                    dist.all_reduce(t)
                    logs["loss"] = float(t) / self.world
                self.log({"step": self.step, **logs, "grad_norm": float(gnorm),
                          "s_per_step": (time.perf_counter() - t0) / cfg.log_every})
                t0 = time.perf_counter()
                bar.set_postfix(loss=f"{logs.get('loss', 0):.4f}")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
            bar.update(1)
        bar.close()

    def trained(self) -> nn.Module:
        """The weights to use: the EMA copy when there is one."""
        return self.ema.model if self.ema else self.model

"""The training stages: mini VAE, teacher (flow matching), ODE trajectories, stage 1 (ODE backfill
regression), stage 2 (DMD). Each builds a ``step_fn`` for the shared loop in ``loop.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..codecs.audio import MelFrontEnd, with_anchor_row
from ..codecs.vae import MiniVAE
from ..config import Config
from ..model import AvatarDiT, pack_audio_rows
from ..stream.passes import Passes
from ..stream.positions import clean_layout, window_layout
from ..stream.schedule import add_noise, shift_sigma, teacher_sigmas, window_sigmas
from ..stream.teacher import teacher_velocity
from ..stream.window import WindowSampler

# ---------------------------------------------------------------------------- data


def batch(ds, gen: torch.Generator, size: int, device) -> dict:
    idx = torch.randint(len(ds), (size,), generator=gen).tolist()
    items = [ds[i] for i in idx]
    return {"frames": torch.stack([it["frames"] for it in items]).to(device),
            "audio": torch.stack([it["audio"] for it in items]),
            "reference": torch.stack([it["reference"] for it in items]).to(device),
            "opening": torch.stack([it["gt"]["opening"] for it in items]) if items[0]["gt"] else None}


def audio_rows(fe: MelFrontEnd, audio: Tensor, pack: int, device) -> Tensor:
    """[B, samples] -> anchored, packed rows [B, 1 + n, pack, D] (n latent frames after the reference)."""
    rows = [with_anchor_row(fe.offline(a)) for a in audio]  # [1 + T, D] each
    return pack_audio_rows(torch.stack(rows), pack).to(device)


@torch.no_grad()
def encode(vae: MiniVAE, frames: Tensor, reference: Tensor) -> Tensor:
    """Reference image as video frame 0, then the clip's 4n frames -> latents [B, C, 1 + n, h, w]."""
    return vae.encode_video(torch.cat([reference[:, :, None], frames], dim=2))


def sample_sigma(gen: torch.Generator, n: int, shift: float, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    u = lo + (hi - lo) * torch.rand(n, generator=gen)
    return shift_sigma(u, shift)


# ---------------------------------------------------------------------------- VAE


def vae_loss(vae: MiniVAE, frames: Tensor, train_encoder: bool = True) -> tuple[Tensor, dict]:
    """Reconstruction (L1 + MSE), image gradients (edges), the mouth region weighted x4, latent L2.

    ``train_encoder=False``: the latents are fixed (no gradient reaches the encoder): a decoder fine-tune."""
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        z = vae.encode_video(frames)
    rec = vae.decode_unclamped(z)
    h, w = frames.shape[-2:]
    weight = torch.ones(1, 1, 1, h, w, device=frames.device)
    weight[..., int(0.50 * h):int(0.80 * h), int(0.30 * w):int(0.70 * w)] = 4.0  # mouth region
    l1 = (weight * (rec - frames).abs()).mean()
    mse = F.mse_loss(rec, frames)

    def grads(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    gy, gx = grads(rec)
    ty, tx = grads(frames)
    edge = (gy - ty).abs().mean() + (gx - tx).abs().mean()
    reg = 1e-4 * z.pow(2).mean()
    loss = l1 + mse + 0.5 * edge + reg
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "edge": edge.item()}


@torch.no_grad()
def set_latent_stats(vae: MiniVAE, ds, device, n: int = 16) -> None:
    gen = torch.Generator().manual_seed(123)
    vae.latents_mean.zero_()
    vae.latents_std.fill_(1.0)
    zs = [vae.encode_video(batch(ds, gen, 4, device)["frames"]) for _ in range(n)]
    z = torch.cat(zs, 2).transpose(0, 1).flatten(1)
    vae.latents_mean.copy_(z.mean(1))
    vae.latents_std.copy_(z.std(1))


@torch.no_grad()
def psnr(vae: MiniVAE, frames: Tensor) -> tuple[float, float]:
    """(whole-frame PSNR, mouth-region PSNR) in dB for frames in [-1, 1] through encode/decode."""
    rec = vae.decode(vae.encode_video(frames))
    h, w = frames.shape[-2:]

    def p(a, b):
        mse = ((a - b) / 2).pow(2).mean().item()
        return 10 * math.log10(1.0 / max(mse, 1e-12))

    m = (..., slice(int(0.5 * h), int(0.8 * h)), slice(int(0.3 * w), int(0.7 * w)))
    return p(rec, frames), p(rec[m], frames[m])


# ---------------------------------------------------------------------------- teacher


def clip_input(model: AvatarDiT, cfg: Config, ref_lat: Tensor, x: Tensor, sigma: Tensor | float):
    """[reference (clean, t=0) | x (at sigma)] as the bidirectional models see a clip: (input, t, positions).

    sigma: a float, or a tensor [B] (one level per sample)."""
    b, _, n, _, _ = x.shape
    f = n + 1
    dev = x.device
    is_ref = torch.zeros(f, dtype=torch.bool, device=dev)
    is_ref[0] = True
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=dev).reshape(-1, 1).expand(b, n)
    t = torch.cat([torch.zeros(b, 1, device=dev), sig], 1) * cfg.stream.num_train_timesteps
    seq = torch.cat([ref_lat.expand(b, -1, -1, -1, -1), x], 2)
    return model.condition(seq, ref_lat, is_ref), t, torch.arange(f, device=dev)


def teacher_loss(model: AvatarDiT, cfg: Config, lat: Tensor, rows: Tensor, gen: torch.Generator,
                 audio_dropout: float) -> tuple[Tensor, dict]:
    """Flow matching over a clip: frame 0 is the clean reference, frames 1.. share one noise level."""
    b = lat.shape[0]
    sigma = sample_sigma(gen, b, cfg.stream.shift).to(lat.device)
    eps = torch.randn(lat.shape, generator=gen).to(lat.device)
    keep = (torch.rand(b, generator=gen) >= audio_dropout).float().to(lat.device)
    x0 = lat[:, :, 1:]
    x_t = add_noise(x0, eps[:, :, 1:], sigma.view(b, 1, 1, 1, 1))
    x_in, t, pos = clip_input(model, cfg, lat[:, :, :1], x_t, sigma)
    v = model(x_in, t, pos, audio=rows * keep.view(b, 1, 1, 1))
    loss = F.mse_loss(v[:, :, 1:].float(), (eps[:, :, 1:] - x0).float())
    return loss, {"loss": loss.item()}


@torch.no_grad()
def teacher_sample(model: AvatarDiT, cfg: Config, ref_lat: Tensor, rows: Tensor, n_frames: int,
                   gen: torch.Generator, steps: int, guidance: float, keep_levels: list[float] | None = None):
    """Euler over the teacher grid for frames 1..n with the clean reference at frame 0.

    Returns (clean [B, C, n, h, w], {sigma: state} for the grid levels in ``keep_levels``)."""
    b, c, _, h, w = ref_lat.shape
    grid = teacher_sigmas(steps, cfg.stream.shift)
    x = torch.randn((b, c, n_frames, h, w), generator=gen).to(ref_lat.device)
    kept = {}
    for s_now, s_next in zip(grid[:-1], grid[1:]):
        for lv in keep_levels or []:
            if abs(lv - s_now) < 1e-6:
                kept[lv] = x.clone()
        x_in, t, pos = clip_input(model, cfg, ref_lat, x, s_now)
        v = teacher_velocity(model, x_in, t, pos, rows, guidance)
        x = x + (s_next - s_now) * v[:, :, 1:]
    return x, kept


# ---------------------------------------------------------------------------- stage 1: ODE backfill


def backfill_window(rng: np.random.Generator, n_blocks: int, L: int) -> tuple[int, list[int]]:
    """A window the engine meets: warm-up (partial, newest levels), full, or drain (partial, oldest levels).

    Returns (oldest block index, level index per window block, oldest first)."""
    kind = rng.choice(["warmup", "full", "drain"], p=[0.25, 0.5, 0.25])
    m = L if kind == "full" else int(rng.integers(1, L))
    m = min(m, n_blocks)
    if kind == "warmup":
        return 0, list(range(L - m, L))
    k0 = int(rng.integers(0, n_blocks - m + 1))
    return k0, list(range(0, m)) if kind == "drain" else list(range(L - m, L))


def window_forward(model: AvatarDiT, cfg: Config, ref_lat: Tensor, prev_clean: Tensor | None,
                   prev_rows: Tensor | None, x: Tensor, sig: Tensor, rows: Tensor, k: int) -> Tensor:
    """The engine's window step as one differentiable function, made of the engine's own passes
    (``stream/passes.py``: the same DiT calls, positions and KV buffer): anchor pass -> clean pass of block
    k-1 (``prev_clean``; its last n_temporal frames become the temporal anchor) -> window pass over the
    window whose oldest block is block ``k``. Returns x0 of the window.

    Equal to the engine's step for k <= 1. For k >= 2 the clean pass of block k-1 sees the style anchor only,
    where the engine's also sees block k-2's temporal frames (one level of history is kept, not the chain)."""
    s = cfg.stream
    nt = s.temporal_anchor_frames
    dit = Passes(model, ref_lat, nt, s.num_train_timesteps)
    dit.anchor(rows)
    if prev_clean is not None and nt:
        clean = clean_layout(s.positions, nt, dit.kv.temporal_frames, k - 1, prev_clean.shape[2])
        dit.clean(prev_clean, prev_rows, clean, dit.prefix(clean))
    layout = window_layout(s.positions, nt, dit.kv.temporal_frames, k, s.block_frames)
    v = dit.window(x, sig, rows, layout, dit.prefix(layout))
    return x - sig.view(1, 1, x.shape[2], 1, 1) * v


def ode_loss(model: AvatarDiT, cfg: Config, sample: dict, rng: np.random.Generator) -> tuple[Tensor, dict]:
    """One backfilled window from one stored trajectory: block at window position j takes the trajectory
    state at level s_j; the block before the window is clean (temporal anchor); loss on x0."""
    s = cfg.stream
    B, L = s.block_frames, s.window_blocks
    clean = sample["clean"]  # [1, C, n, h, w]
    n_blocks = clean.shape[2] // B
    k0, levels = backfill_window(rng, n_blocks, L)
    sigmas = window_sigmas(tuple(s.denoising_steps), s.shift, s.num_train_timesteps)
    xs, sig = [], []
    for j, lv in enumerate(levels):
        blk = slice((k0 + j) * B, (k0 + j + 1) * B)
        xs.append(sample["states"][lv][:, :, blk])
        sig += [sigmas[lv]] * B
    x = torch.cat(xs, 2)
    rows = sample["rows"]  # [1, 1 + n, pack, D]
    win_rows = rows[:, 1 + k0 * B: 1 + (k0 + len(levels)) * B]
    prev, prev_rows = None, None
    if k0 > 0:
        prev = clean[:, :, (k0 - 1) * B: k0 * B]
        prev_rows = rows[:, 1 + (k0 - 1) * B: 1 + k0 * B]
    x0 = window_forward(model, cfg, sample["ref"], prev, prev_rows, x,
                        torch.tensor(sig, device=x.device), win_rows, k0)
    target = clean[:, :, k0 * B: (k0 + len(levels)) * B]
    loss = F.mse_loss(x0.float(), target.float())
    return loss, {"loss": loss.item(), "blocks": len(levels)}


# ---------------------------------------------------------------------------- stage 2: DMD


def dmd_generator_loss(x: Tensor, fake_x0: Tensor, real_x0: Tensor) -> Tensor:
    """docs/design.md s4: grad = (fake - real) / mean|x - real|; loss = 0.5 * MSE(x, sg(x - grad))."""
    with torch.no_grad():
        norm = (x - real_x0).abs().mean(dim=list(range(1, x.ndim)), keepdim=True).clamp_min(1e-6)
        grad = (fake_x0 - real_x0) / norm
        target = x - grad
    return 0.5 * F.mse_loss(x.float(), target.float(), reduction="mean")


def score_x0(model: AvatarDiT, cfg: Config, ref_lat: Tensor, x_t: Tensor, sigma: float, rows: Tensor,
             guidance: float) -> Tensor:
    """x0 prediction of a bidirectional score model for [reference | x_t] (CFG on audio if guidance != 1)."""
    x_in, t, pos = clip_input(model, cfg, ref_lat, x_t, sigma)
    rows_full = torch.cat([torch.zeros_like(rows[:, :1]), rows], 1)  # the reference's zero audio row
    v = teacher_velocity(model, x_in, t, pos, rows_full, guidance)
    return x_t - sigma * v[:, :, 1:]


def rollout_sample(student: AvatarDiT, cfg: Config, ref_lat: Tensor, rows: Tensor, gen: torch.Generator,
                   rng: np.random.Generator) -> tuple[Tensor, slice]:
    """Roll the student out with the real engine; keep the graph of one random full-window step.

    Returns (x: the window's x0 prediction at that step [1, C, F, h, w], the window's rows in ``rows``:
    ``rows[:, win]`` is [1, F, pack, D])."""
    s = cfg.stream
    B = s.block_frames
    n_blocks = (rows.shape[1] - 1) // B
    sampler = WindowSampler(student, cfg, ref_lat, gen)
    L = sampler.L
    k = int(rng.integers(L - 1, n_blocks)) if n_blocks > L - 1 else n_blocks - 1
    for i in range(k + 1):
        block_rows = rows[:, 1 + i * B: 1 + (i + 1) * B]
        sampler.push(block_rows, grad=(i == k))
    x = sampler.last_x0  # the window of that step: blocks lo..k
    lo = k - len(sampler.last_levels) + 1
    return x, slice(1 + lo * B, 1 + (k + 1) * B)


def critic_loss(critic: AvatarDiT, cfg: Config, ref_lat: Tensor, x: Tensor, rows: Tensor,
                gen: torch.Generator) -> tuple[Tensor, dict]:
    """Flow matching of the fake score on (detached) student samples."""
    s = cfg.stream
    sigma = float(sample_sigma(gen, 1, s.shift, cfg.train.min_score_t / 1000, cfg.train.max_score_t / 1000))
    eps = torch.randn(x.shape, generator=gen).to(x.device)
    x_t = add_noise(x, eps, sigma)
    x_in, t, pos = clip_input(critic, cfg, ref_lat, x_t, sigma)
    v = critic(x_in, t, pos, audio=torch.cat([torch.zeros_like(rows[:, :1]), rows], 1))
    loss = F.mse_loss(v[:, :, 1:].float(), (eps - x).float())
    return loss, {"critic_loss": loss.item()}


def dmd_loss(student: AvatarDiT, teacher: AvatarDiT, critic: AvatarDiT, cfg: Config, sample: dict,
             gen: torch.Generator, rng: np.random.Generator) -> tuple[Tensor, Tensor, dict]:
    """(generator loss, the detached sample and its rows for critic updates, logs).

    The student rolls out on ``sample["rows"]`` (what it hears); the real and fake scores judge the window
    on ``sample["score_rows"]`` when given (robust distillation: the clean speech's rows, train/robust.py),
    else on the same rows."""
    x, win = rollout_sample(student, cfg, sample["ref"], sample["rows"], gen, rng)
    rows = sample.get("score_rows", sample["rows"])[:, win]
    t = cfg.train
    sigma = float(sample_sigma(gen, 1, cfg.stream.shift, t.min_score_t / 1000, t.max_score_t / 1000))
    eps = torch.randn(x.shape, generator=gen).to(x.device)
    with torch.no_grad():
        x_t = add_noise(x.detach(), eps, sigma)
        real = score_x0(teacher, cfg, sample["ref"], x_t, sigma, rows, cfg.stream.guidance)
        fake = score_x0(critic, cfg, sample["ref"], x_t, sigma, rows, 1.0)
    loss = dmd_generator_loss(x, fake, real)
    return loss, (x.detach(), rows), {"loss": loss.item(), "score_sigma": sigma}


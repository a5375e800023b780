"""The mini recipe, stage by stage, each resumable (checkpoints in OUT/<stage>.ckpt, done-markers):

  1. vae        mini VAE on the corpus (frames in [-1, 1], 9-frame windows)
     decoder    (optional) the decoder fine-tuned with the encoder frozen: better pixels, the same latents
  2. latents    the corpus encoded once: latents [clips, 1+n, C, h, w] + anchored mel rows (fp16 npz);
                later stages read only this (small enough to move to a GPU machine)
  3. teacher    bidirectional flow matching over 1 + 8 latent frames, audio dropout for CFG
  4. ode-gen    teacher trajectories (CFG on audio) at the student's window levels + clean endpoints
  5. ode        stage 1: ODE backfill regression of the student (initialised from the teacher)
  6. dmd        stage 2: DMD with the frozen teacher (real score) and a critic (fake score)
  7. export     the student (EMA, fp16) + VAE as a model folder loadable by ``Avatar.load``
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints import load_into, read_state_dict, save_model
from ..codecs.factory import load_vae
from ..codecs.vae import MiniVAE
from ..config import Config, preset
from ..data.dataset import CorpusDataset
from ..errors import ConfigError
from ..model import AvatarDiT
from ..stream.schedule import window_sigmas
from .loop import LoopConfig, Trainer, step_generator
from .run import check_run_config, done, done_info, mark_done, save_npz, save_tensors
from .stages import (
    audio_rows,
    batch,
    critic_loss,
    dmd_loss,
    encode,
    ode_loss,
    psnr,
    set_latent_stats,
    teacher_loss,
    teacher_sample,
    vae_loss,
)


@dataclass
class RecipeConfig:
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    latent_clips: int = 0  # 0: all train clips
    latent_seconds: float = 0.0  # 0: whole clips
    teacher_steps: int = 4000
    teacher_batch: int = 16
    teacher_lr: float = 3e-4
    clip_latents: int = 8  # latent frames after the reference per training clip (32 video frames)
    ode_samples: int = 256
    ode_steps: int = 3000
    ode_accum: int = 4
    ode_lr: float = 1e-4
    decoder_steps: int = 0  # the optional decoder stage (encoder frozen)
    decoder_batch: int = 16
    decoder_lr: float = 3e-4
    dmd_steps: int = 300
    dmd_lr: float = 2e-5
    critic_lr: float = 1e-4
    critic_updates: int = 5
    seed: int = 0
    # optional training-time budget per stage (minutes, counted over every run of the stage): the stage stops
    # there and counts as done (a fixed-time run on a lent GPU, or the CPU recipe); a stop at the session's
    # --minutes deadline is not done: it raises and the stage resumes on the next run
    stage_minutes: dict | None = None
    sample_every: int = 500  # write a sample video of the model being trained every N steps (0: never)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP for the DiT stages
    # configs with codec.vae == "wan" use a pretrained Wan VAE (diffusers folder or Wan2.1_VAE.pth) instead of
    # the vae stage, and codec.audio == "wav2vec2" a local wav2vec2-base-960h folder
    vae_path: str | None = None
    audio_model: str | None = None


SMOKE = RecipeConfig(vae_steps=4, vae_batch=2, latent_clips=2, teacher_steps=4, teacher_batch=2, clip_latents=4,
                     ode_samples=2, ode_steps=4, ode_accum=1, dmd_steps=2, critic_updates=2, sample_every=2)


def sample_hook(out: Path, stage: str, cfg: Config, model: AvatarDiT, vae: MiniVAE | None, data,
                every: int, teacher: bool = False):
    """Every ``every`` steps: sample a fixed training clip with the engine (student) or the teacher sampler,
    decode it and write ``out/samples/<stage>-<step>.mp4`` (silent) for a person to look at."""
    if not every or vae is None:
        return None
    from ..data.image import to_uint8
    from ..data.video import VideoWriter
    from ..stream.teacher import TeacherSampler
    from ..stream.window import WindowSampler

    lat, rows = data.sample(torch.Generator().manual_seed(999), 1)
    B = cfg.stream.block_frames

    @torch.no_grad()
    def hook(step: int) -> None:
        if step % every:
            return
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(0)
        sampler = (TeacherSampler if teacher else WindowSampler)(model, cfg, lat[:, :, :1], gen)
        blocks = []
        for i in range(data.n // B):
            blocks += sampler.push(rows[:, 1 + i * B: 1 + (i + 1) * B])
        blocks += sampler.drain()
        dec = vae.stream_decoder()
        dec.decode(lat[:, :, :1])
        frames = torch.cat([dec.decode(z.float()) for z in blocks], 2)[0].transpose(0, 1)
        (out / "samples").mkdir(exist_ok=True)
        with VideoWriter(out / "samples" / f"{stage}-{step:06d}.mp4") as w:
            w.write(to_uint8(frames.cpu().numpy()))
        model.train(was_training)

    return hook


def _budget(r: RecipeConfig, stage: str) -> float | None:
    """The stage's training-time budget in seconds (``stage_minutes``), counted over all its runs, or None."""
    if r.stage_minutes and stage in r.stage_minutes:
        return 60 * float(r.stage_minutes[stage])
    return None


def _check_finished(tr: Trainer, steps: int, stage: str, budget: float | None) -> dict:
    """A stage is done at its step count or its time budget; a stop at the session deadline is not done."""
    if tr.step < steps and (budget is None or tr.seconds < budget):
        raise TimeoutError(f"{stage}: stopped at the deadline; run the recipe again to resume")
    return {"steps": tr.step, "planned_steps": steps, "train_seconds": tr.seconds}


def _train_stage(tr: Trainer, step_fn, r: RecipeConfig, stage: str, steps: int, out: Path, weights: str,
                 module: torch.nn.Module, deadline: float | None, after_step=None) -> torch.nn.Module:
    """Run a stage's loop, then save its final (EMA) weights, mark it done and load them into ``module``."""
    budget = _budget(r, stage)
    tr.run(step_fn, deadline=deadline, budget_seconds=budget, after_step=after_step)
    info = _check_finished(tr, steps, stage, budget)
    final = tr.trained()
    save_tensors(final.state_dict(), out / weights)
    mark_done(out, stage, info)
    module.load_state_dict(final.state_dict())
    return module


def stage_vae(corpus: Path, out: Path, cfg: Config, r: RecipeConfig, device, deadline=None) -> MiniVAE:
    vae = MiniVAE(cfg.model.latent_channels, cfg.codec.vae_base_dim).to(device)
    if done(out, "vae"):
        load_into(vae, read_state_dict(out / "vae.safetensors"), str(out / "vae.safetensors"))
        return vae.eval()
    ds = CorpusDataset(corpus, "train", window_frames=9, stride=4)
    tr = Trainer("vae", vae, out, LoopConfig(steps=r.vae_steps, lr=r.vae_lr, seed=r.seed, save_every=500,
                                            log_every=20), device)
    budget = _budget(r, "vae")
    tr.run(lambda step, micro, gen: vae_loss(vae, batch(ds, gen, r.vae_batch, device)["frames"]),
           deadline=deadline, budget_seconds=budget)
    steps = _check_finished(tr, r.vae_steps, "vae", budget)
    vae.eval()
    set_latent_stats(vae, ds, device)
    info = {**steps, **heldout_psnr(vae, corpus, device)}
    save_tensors(vae.state_dict(), out / "vae.safetensors")
    mark_done(out, "vae", info)
    return vae


def heldout_psnr(vae: MiniVAE, corpus: Path, device, windows: int = 16) -> dict:
    """Mean whole-frame and mouth-region PSNR (dB) over up to ``windows`` 33-frame held-out windows."""
    held = CorpusDataset(corpus, "heldout", window_frames=33, stride=200)
    scores = [psnr(vae, held[i]["frames"][None].to(device)) for i in range(min(windows, len(held)))]
    return {"psnr_db": float(np.mean([s[0] for s in scores])),
            "mouth_psnr_db": float(np.mean([s[1] for s in scores])), "heldout_windows": len(scores)}


def stage_decoder(corpus: Path, out: Path, r: RecipeConfig, vae: MiniVAE, device, deadline=None) -> MiniVAE:
    """Fine-tune the decoder with the encoder frozen: the latents (and every DiT trained on them) stay valid,
    the pixels get better. Held-out PSNR before and after goes in ``decoder.done``."""
    if done(out, "decoder"):
        load_into(vae, read_state_dict(out / "decoder.safetensors"), str(out / "decoder.safetensors"))
        return vae.eval()
    before = heldout_psnr(vae.eval(), corpus, device)
    ds = CorpusDataset(corpus, "train", window_frames=9, stride=4)
    vae.encoder.requires_grad_(False)
    tr = Trainer("decoder", vae, out, LoopConfig(steps=r.decoder_steps, lr=r.decoder_lr, seed=r.seed + 5,
                                                ema_decay=0.995, ema_start=50, save_every=500, log_every=20),
                 device, params=vae.decoder.parameters())
    vae.train()
    vae = _train_stage(tr, lambda step, micro, gen: vae_loss(
        vae, batch(ds, gen, r.decoder_batch, device)["frames"], train_encoder=False),
        r, "decoder", r.decoder_steps, out, "decoder.safetensors", vae, deadline).eval()
    info = json.loads((out / "decoder.done").read_text())
    info.update({**heldout_psnr(vae, corpus, device), "psnr_db_before": before["psnr_db"],
                 "mouth_psnr_db_before": before["mouth_psnr_db"], "encoder": "frozen (latents unchanged)"})
    mark_done(out, "decoder", info)
    return vae


def clips_to_encode(corpus: Path, cfg: Config, r: RecipeConfig) -> list[tuple[Path, int, int]]:
    """The train clips the latents stage encodes, in its order: (shard folder, clip index, video frames)."""
    out = []
    for d in sorted((corpus / "shards").glob("train-*")):
        n, t = np.load(d / "frames.npy", mmap_mode="r").shape[:2]
        t = int(r.latent_seconds * cfg.codec.fps) if r.latent_seconds else t
        stride = cfg.codec.temporal_stride
        out += [(d, c, t // stride * stride) for c in range(n)]
    return out[: r.latent_clips] if r.latent_clips else out


@torch.no_grad()
def stage_latents(corpus: Path, out: Path, cfg: Config, r: RecipeConfig, vae, device) -> Path:
    """Encode every train clip once: reference + 4n frames -> latents; audio rows with the anchor row."""
    from ..codecs.factory import make_front_end

    path = out / "latents.npz"
    if path.exists():
        return path
    fe = make_front_end(cfg.codec, r.audio_model)
    clips = clips_to_encode(corpus, cfg, r)
    bar = tqdm(total=len(clips), desc="latents", unit="clip")
    lats, rows = [], []
    for shard, group in groupby(clips, key=lambda clip: clip[0]):  # clips come shard by shard
        frames, refs, audio = (np.load(shard / f"{name}.npy", mmap_mode="r")
                               for name in ("frames", "references", "audio"))
        for _, c, t in group:
            fr = torch.from_numpy(np.array(frames[c, :t])).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
            ref = torch.from_numpy(np.array(refs[c])).permute(2, 0, 1).float()[None] / 127.5 - 1
            lats.append(encode(vae, fr.to(device), ref.to(device))[0].cpu().half().numpy())
            a = torch.from_numpy(np.array(audio[c, : t * cfg.codec.samples_per_frame]))
            rows.append(audio_rows(fe, a[None], cfg.model.audio_pack, "cpu")[0].half().numpy())
            bar.update(1)
    bar.close()

    save_npz(path, latents=np.stack(lats), rows=np.stack(rows))
    return path


class LatentClips:
    """Random windows of 1 + n latent frames (reference first) from the encoded corpus."""

    def __init__(self, path: Path, n: int, device):
        data = np.load(path)
        self.lat = torch.from_numpy(data["latents"]).float()  # [clips, C, 1 + N, h, w]
        self.rows = torch.from_numpy(data["rows"]).float()  # [clips, 1+N, pack, D]
        self.n, self.device = n, device

    def pick(self, gen: torch.Generator, b: int) -> list[tuple[int, int]]:
        """b random (clip, first latent frame after the reference) pairs."""
        clips = torch.randint(len(self.lat), (b,), generator=gen)
        starts = torch.randint(0, self.lat.shape[2] - 1 - self.n + 1, (b,), generator=gen)
        return list(zip(clips.tolist(), starts.tolist()))

    def crop(self, seq: torch.Tensor, s: int, dim: int) -> torch.Tensor:
        """The reference entry and the n entries from ``s`` along ``dim`` (latent frames or rows)."""
        return torch.cat([seq.narrow(dim, 0, 1), seq.narrow(dim, 1 + s, self.n)], dim)

    def take(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The picked windows' latents [b, C, 1 + n, h, w] and rows [b, 1 + n, pack, D] on the device."""
        lat = torch.stack([self.crop(self.lat[c], s, 1) for c, s in picks])
        rows = torch.stack([self.crop(self.rows[c], s, 0) for c, s in picks])
        return lat.to(self.device), rows.to(self.device)

    def sample(self, gen: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(self.pick(gen, b))

    def sample_heard(self, gen: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, the rows the teacher hears, the rows the student hears): here the same rows;
        ``robust.HeardClips`` gives the student the listener's rows of microphone-augmented speech."""
        lat, rows = self.sample(gen, b)
        return lat, rows, rows


def stage_teacher(out: Path, cfg: Config, r: RecipeConfig, data: LatentClips, device, deadline=None,
                  vae: MiniVAE | None = None) -> AvatarDiT:
    torch.manual_seed(r.seed)
    teacher = AvatarDiT(cfg.model).to(device)
    if done(out, "teacher"):
        load_into(teacher, read_state_dict(out / "teacher.safetensors"), "teacher")
        return teacher.eval()
    tr = Trainer("teacher", teacher, out, LoopConfig(steps=r.teacher_steps, lr=r.teacher_lr, seed=r.seed + 1,
                                                    ema_decay=0.995, ema_start=100, save_every=500,
                                                    fsdp=r.fsdp), device)

    def step(s, micro, gen):
        lat, rows = data.sample(gen, r.teacher_batch)
        return teacher_loss(tr.forward_model, cfg, lat, rows, gen, cfg.train.audio_dropout)

    hook = sample_hook(out, "teacher", cfg, teacher, vae, data, r.sample_every, teacher=True)
    return _train_stage(tr, step, r, "teacher", r.teacher_steps, out, "teacher.safetensors", teacher,
                        deadline, hook).eval()


@torch.no_grad()
def stage_ode_generate(out: Path, cfg: Config, r: RecipeConfig, data: LatentClips, teacher: AvatarDiT,
                       device) -> Path:
    """Trajectories at exactly the student's window levels (they lie on the teacher's grid) + endpoints.

    The teacher hears the clean rows; the stored rows are the student's input (``sample_heard``)."""
    from safetensors.torch import load_file

    path = out / "ode.safetensors"
    if path.exists():
        return path
    s = cfg.stream
    levels = window_sigmas(tuple(s.denoising_steps), s.shift, s.num_train_timesteps)  # oldest first
    tensors = {}
    per = 16
    for k in range(0, r.ode_samples, per):
        part = out / f"ode-part{k // per:04d}.safetensors"  # resumable parts
        if not part.exists():
            gen = step_generator(r.seed + 7, k)
            lat, rows, heard = data.sample_heard(gen, min(per, r.ode_samples - k))
            clean, kept = teacher_sample(teacher, cfg, lat[:, :, :1], rows, data.n, gen, s.teacher_steps,
                                         s.guidance, levels)
            if set(kept) != set(levels):
                raise RuntimeError(f"teacher grid misses student levels: {sorted(set(levels) - set(kept))}")
            t = {"ref": lat[:, :, :1], "rows": heard, "clean": clean}  # rows: the student's input
            for j, lv in enumerate(levels):
                t[f"state{j}"] = kept[lv]
            save_tensors(t, part)
        for n, v in load_file(str(part)).items():
            tensors.setdefault(n, []).append(v)
    save_tensors({n: torch.cat(v) for n, v in tensors.items()}, path)
    (out / "ode.json").write_text(json.dumps({"levels_oldest_first": levels, "samples": r.ode_samples}))
    return path


def stage_ode(out: Path, cfg: Config, r: RecipeConfig, ode_path: Path, teacher: AvatarDiT, device,
              deadline=None, vae: MiniVAE | None = None, data: LatentClips | None = None,
              init: AvatarDiT | None = None) -> AvatarDiT:
    """Stage 1 from ``init`` (default: the teacher; a fine-tune starts from a trained student)."""
    from safetensors.torch import load_file

    student = AvatarDiT(cfg.model).to(device)
    if done(out, "ode"):
        load_into(student, read_state_dict(out / "ode.student.safetensors"), "ode")
        return student
    student.load_state_dict((init or teacher).state_dict())
    traj = {k: v.to(device) for k, v in load_file(str(ode_path)).items()}
    n = traj["ref"].shape[0]
    L = cfg.stream.window_blocks
    tr = Trainer("ode", student, out, LoopConfig(steps=r.ode_steps, lr=r.ode_lr, seed=r.seed + 2,
                                                grad_accum=r.ode_accum, ema_decay=0.99, ema_start=100,
                                                save_every=500, fsdp=r.fsdp), device)

    def step(s, micro, gen):
        i = int(torch.randint(n, (1,), generator=gen))
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        sample = {"ref": traj["ref"][i:i + 1], "rows": traj["rows"][i:i + 1], "clean": traj["clean"][i:i + 1],
                  "states": [traj[f"state{j}"][i:i + 1] for j in range(L)]}
        return ode_loss(tr.forward_model, cfg, sample, rng)

    hook = sample_hook(out, "ode", cfg, student, vae, data, r.sample_every) if data is not None else None
    return _train_stage(tr, step, r, "ode", r.ode_steps, out, "ode.student.safetensors", student, deadline, hook)


def stage_dmd(out: Path, cfg: Config, r: RecipeConfig, data: LatentClips, teacher: AvatarDiT,
              student: AvatarDiT, device, deadline=None, vae: MiniVAE | None = None) -> AvatarDiT:
    if done(out, "dmd"):
        load_into(student, read_state_dict(out / "dmd.student.safetensors"), "dmd")
        return student
    critic = AvatarDiT(cfg.model).to(device)
    critic.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False).eval()
    copt = torch.optim.AdamW(critic.parameters(), lr=r.critic_lr, betas=(0.0, 0.999), weight_decay=0.01)
    tr = Trainer("dmd", student, out, LoopConfig(steps=r.dmd_steps, lr=r.dmd_lr, betas=(0.0, 0.999), seed=r.seed + 3,
                                                ema_decay=0.99, ema_start=20, save_every=50, log_every=5,
                                                fsdp=r.fsdp),
                 device, extra={"critic": critic}, extra_optims={"critic": copt})

    def step(s, micro, gen):
        lat, rows, heard = data.sample_heard(gen, 1)
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        sample = {"ref": lat[:, :, :1], "rows": heard, "score_rows": rows}
        loss, (x, xrows), logs = dmd_loss(student, teacher, critic, cfg, sample, gen, rng)
        for _ in range(r.critic_updates):  # the fake score follows the student's current samples
            copt.zero_grad(set_to_none=True)
            closs, clog = critic_loss(critic, cfg, sample["ref"], x, xrows, gen)
            closs.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            copt.step()
        logs.update(clog)
        return loss, logs

    hook = sample_hook(out, "dmd", cfg, student, vae, data, r.sample_every)
    return _train_stage(tr, step, r, "dmd", r.dmd_steps, out, "dmd.student.safetensors", student, deadline, hook)


def export_model(out: Path, cfg: Config, student: AvatarDiT, vae: MiniVAE, dest: Path, dtype: str = "fp16") -> Path:
    """The model folder: student (EMA) + teacher (the `teacher` baseline), fp16; the VAE in fp32."""
    save_model(student, cfg, dest, dtype=dtype)
    if (out / "teacher.safetensors").exists():
        teacher = AvatarDiT(cfg.model)
        load_into(teacher, read_state_dict(out / "teacher.safetensors"), "teacher")
        save_model(teacher, cfg, dest, dtype=dtype, name="teacher.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()},
              str(dest / "vae.safetensors"))
    (dest / "training.json").write_text(json.dumps(done_info(out, ("vae", "teacher", "ode", "dmd")), indent=1))
    return dest


def run_recipe(corpus: str | Path, out: str | Path, device: str = "cpu", r: RecipeConfig | None = None,
               cfg: Config | None = None, stages: tuple[str, ...] = ("vae", "latents", "teacher", "ode-gen", "ode",
                                                                       "dmd", "export"),
               export_to: str | Path | None = None, minutes: float | None = None) -> dict:
    r = r or RecipeConfig()
    cfg = cfg or preset("mini")
    dev = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(out, cfg)
    corpus = Path(corpus)
    deadline = time.time() + 60 * minutes if minutes else None
    times = {}
    t0 = time.time()
    vae = None
    if cfg.codec.vae == "wan":
        if not r.vae_path:
            raise ConfigError("a codec.vae == 'wan' recipe needs vae_path (the pretrained Wan2.1 VAE)")
        vae = load_vae(cfg, r.vae_path, device)
    elif "vae" in stages:
        vae = stage_vae(corpus, out, cfg, r, dev, deadline)
        times["vae"] = time.time() - t0
    if "latents" in stages:
        stage_latents(corpus, out, cfg, r, vae, dev)
        times["latents"] = time.time() - t0
    data = LatentClips(out / "latents.npz", r.clip_latents, dev)
    teacher = student = None
    if "teacher" in stages:
        teacher = stage_teacher(out, cfg, r, data, dev, deadline, vae)
        times["teacher"] = time.time() - t0
    if "ode-gen" in stages:
        stage_ode_generate(out, cfg, r, data, teacher, dev)
        times["ode-gen"] = time.time() - t0
    if "ode" in stages:
        student = stage_ode(out, cfg, r, out / "ode.safetensors", teacher, dev, deadline, vae, data)
        times["ode"] = time.time() - t0
    if "dmd" in stages:
        student = stage_dmd(out, cfg, r, data, teacher, student, dev, deadline, vae)
        times["dmd"] = time.time() - t0
    if "export" in stages and export_to:
        if cfg.codec.vae == "wan":
            save_model(student.cpu().float(), cfg, Path(export_to), dtype="bf16")  # the VAE stays where it is
        else:
            vae = vae if vae is not None else stage_vae(corpus, out, cfg, r, dev)
            export_model(out, cfg, student.cpu().float(), vae.cpu().float(), Path(export_to))
    (out / "recipe_times.json").write_text(json.dumps(times, indent=1))
    return times


__all__ = ["RecipeConfig", "SMOKE", "run_recipe", "dataclasses"]

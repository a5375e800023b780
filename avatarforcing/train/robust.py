"""Robust distillation: the student learns to hear speech through a microphone.

A shipped student was distilled on clean synthetic speech, but in use it hears the listener's rows
(codecs/listener.py) of whatever a microphone delivered. This fine-tune keeps the teacher on the clean
speech and gives the student the same speech through a random microphone and the listener:

    clean pcm --MelFrontEnd--> clean rows --> teacher (ODE targets, real score), critic (fake score)
        |
        +-- Microphone (no tempo change: the video stays aligned) --> ListeningFrontEnd --> heard rows
                                                                                 --> student

Stages in OUT, each resumable (recipe.py's, from the shipped model's teacher and student):

  decoder   (optional) the VAE decoder with the encoder frozen
  latents   the corpus encoded once, with the clean rows
  heard     ``versions`` heard rows per clip: version 0 the clean speech at a random level, the others
            through a Microphone chain (worker processes: augmentation is the cost)
  ode-gen   teacher trajectories on clean rows, stored with heard rows (the student's input)
  ode, dmd  stage 1 and stage 2 from the shipped student, the student on heard rows
  export    the model folder: this student, the decoder, the unchanged teacher, listener and config

    avatarforcing train robust --model mini --corpus data/corpus,data/corpus_flite --out runs/robust \\
        --config benchmarks/robust_gpu.yaml --device cuda --export models/mini-robust
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints import load_model, save_model
from ..codecs.factory import load_vae
from ..codecs.listener import ListeningFrontEnd
from ..codecs.vae import MiniVAE
from ..config import Config
from ..data.augment import Microphone
from ..errors import InputError
from .recipe import (
    LatentClips,
    RecipeConfig,
    clips_to_encode,
    stage_decoder,
    stage_dmd,
    stage_latents,
    stage_ode,
    stage_ode_generate,
)
from .run import done, save_npz, save_tensors
from .stages import audio_rows


@dataclass
class RobustConfig:
    versions: int = 4  # heard versions per clip (version 0: clean speech at a random level)
    workers: int = 2  # processes making heard rows
    microphone: dict = field(default_factory=dict)  # Microphone field overrides (p_tempo is always 0)
    recipe: RecipeConfig = field(default_factory=lambda: RecipeConfig(ode_samples=256, ode_steps=1000,
                                                                      dmd_steps=300))

    @classmethod
    def from_dict(cls, d: dict) -> RobustConfig:
        d = dict(d)
        recipe = RecipeConfig(**d.pop("recipe", {}))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"robust config: unknown fields {sorted(unknown)} (expected versions, workers, "
                             f"microphone, recipe)")
        return cls(**d, recipe=recipe)


class HeardSpeech:
    """Picklable maker of one clip's heard rows (a worker process builds its own front ends)."""

    def __init__(self, cfg: Config, listener_path: Path, versions: int, microphone: dict, seed: int):
        self.cfg, self.listener_path, self.versions, self.seed = cfg, listener_path, versions, seed
        self.mic = Microphone(cfg.codec.sample_rate, **{**microphone, "p_tempo": 0.0})
        self._fe = None

    @property
    def fe(self) -> ListeningFrontEnd:
        if self._fe is None:  # built where it runs (a worker process gets the pickled maker without it)
            self._fe = ListeningFrontEnd.load(self.cfg.codec, self.listener_path)
        return self._fe

    def __call__(self, job: tuple[int, Path, int, int]) -> np.ndarray:
        """(index, shard, clip, frames) -> heard rows [versions, 1 + n, pack, D] float16."""
        i, shard, c, t = job
        audio = np.load(shard / "audio.npy", mmap_mode="r")
        pcm = np.array(audio[c, : t * self.cfg.codec.samples_per_frame], np.float32)
        rng = np.random.default_rng([self.seed, i])
        out = []
        for v in range(self.versions):
            if v == 0:
                heard = np.clip(pcm * 10 ** (rng.uniform(-20, 20) / 20), -1, 1)
            else:
                babble = [np.asarray(audio[j], np.float32) for j in rng.integers(len(audio), size=4) if j != c]
                heard = self.mic.apply(pcm, rng, babble).pcm
            rows = audio_rows(self.fe, torch.from_numpy(heard)[None], self.cfg.model.audio_pack, "cpu")
            out.append(rows[0].half().numpy())
        return np.stack(out)


def stage_heard(corpus: Path, out: Path, cfg: Config, rc: RobustConfig, listener_path: Path) -> Path:
    """Heard rows for every clip of the latents stage, in its order: heard.npz [clips, versions, 1+n, pack, D]."""
    path = out / "heard.npz"
    if path.exists():
        return path
    jobs = [(i, d, c, t) for i, (d, c, t) in enumerate(clips_to_encode(corpus, cfg, rc.recipe))]
    make = HeardSpeech(cfg, listener_path, rc.versions, rc.microphone, rc.recipe.seed + 11)
    with ExitStack() as stack:
        if rc.workers > 1:  # spawn: the parent may hold a CUDA context; one thread each: the workers are the cores
            pool = stack.enter_context(mp.get_context("spawn").Pool(rc.workers, torch.set_num_threads, (1,)))
            made = pool.imap(make, jobs, chunksize=2)
        else:
            made = map(make, jobs)
        heard = list(tqdm(made, total=len(jobs), desc="heard rows", unit="clip"))
    save_npz(path, heard=np.stack(heard))
    return path


class HeardClips(LatentClips):
    """LatentClips whose student hears a random heard version of the same crop."""

    def __init__(self, path: Path, heard_path: Path, n: int, device):
        super().__init__(path, n, device)
        self.heard = torch.from_numpy(np.load(heard_path)["heard"]).float()  # [clips, V, 1+N, pack, D]
        if self.heard.shape[0] != self.rows.shape[0] or self.heard.shape[2:] != self.rows.shape[1:]:
            raise InputError(f"{heard_path}: heard rows {tuple(self.heard.shape)} do not match the latents' rows "
                             f"{tuple(self.rows.shape)} (delete it to rebuild)")

    def sample_heard(self, gen: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = self.pick(gen, b)
        versions = torch.randint(self.heard.shape[1], (b,), generator=gen).tolist()
        lat, rows = self.take(picks)
        heard = torch.stack([self.crop(self.heard[c, v], s, 0) for (c, s), v in zip(picks, versions)])
        return lat, rows, heard.to(self.device)




def run_robust(corpus: str | Path, model_dir: str | Path, out: str | Path, device: str = "cpu",
               rc: RobustConfig | None = None, export_to: str | Path | None = None,
               minutes: float | None = None) -> dict:
    """The stages above; returns what ``training.json`` records of this run."""
    rc = rc or RobustConfig()
    r = rc.recipe
    folder, out, corpus, dev = Path(model_dir), Path(out), Path(corpus), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    student, cfg = load_model(folder, dev)
    if cfg.codec.listener == "none" or cfg.codec.vae != "mini":
        raise InputError(f"{folder}: robust distillation needs a mini-VAE model with a listener "
                         f"(codec.listener is {cfg.codec.listener!r}, codec.vae {cfg.codec.vae!r})")
    teacher, _ = load_model(folder, dev, name="teacher.safetensors")
    clean_cfg = cfg.override({"codec.listener": "none"})  # the teacher's rows: the plain log-mel front end
    deadline = time.time() + 60 * minutes if minutes else None
    t0, times = time.time(), {}
    vae = load_vae(cfg, folder, dev).eval()
    if r.decoder_steps:
        vae = stage_decoder(corpus, out, r, vae, dev, deadline)
        times["decoder"] = time.time() - t0
    stage_latents(corpus, out, clean_cfg, r, vae, dev)
    times["latents"] = time.time() - t0
    heard = stage_heard(corpus, out, cfg, rc, folder / "listener.safetensors")
    times["heard"] = time.time() - t0
    data = HeardClips(out / "latents.npz", heard, r.clip_latents, dev)
    teacher.requires_grad_(False).eval()
    if r.ode_steps:
        stage_ode_generate(out, cfg, r, data, teacher, dev)
        times["ode-gen"] = time.time() - t0
        student = stage_ode(out, cfg, r, out / "ode.safetensors", teacher, dev, deadline, data=data, init=student)
        times["ode"] = time.time() - t0
    if r.dmd_steps:
        student = stage_dmd(out, cfg, r, data, teacher, student, dev, deadline)
        times["dmd"] = time.time() - t0
    info = {"recipe": "robust distillation (train/robust.py): the student hears the listener's rows of "
                      "microphone-augmented speech, the teacher and critic the clean rows",
            "from": str(folder), "versions": rc.versions, "microphone": {**rc.microphone, "p_tempo": 0.0},
            "clips": len(data.lat), "seconds": times}
    for stage in ("decoder", "ode", "dmd"):
        if done(out, stage):
            info[stage] = json.loads((out / f"{stage}.done").read_text() or "{}")
    (out / "robust.json").write_text(json.dumps(info, indent=1))
    if export_to:
        export_robust(folder, cfg, student, vae, Path(export_to), info)
    return info


def export_robust(folder: Path, cfg: Config, student, vae: MiniVAE, dest: Path, info: dict) -> Path:
    """A model folder: the new student and VAE; teacher and listener copied; training.json extended."""
    dest.mkdir(parents=True, exist_ok=True)
    save_model(student.cpu().float(), cfg, dest, dtype="fp16")
    if folder.resolve() != dest.resolve():
        for name in ("teacher.safetensors", "listener.safetensors"):
            shutil.copy2(folder / name, dest / name)
    save_tensors(vae.state_dict(), dest / "vae.safetensors")  # float32, as trained
    old = folder / "training.json"
    training = json.loads(old.read_text()) if old.is_file() else {}
    training["robust"] = info
    (dest / "training.json").write_text(json.dumps(training, indent=1))
    return dest


__all__ = ["RobustConfig", "HeardClips", "run_robust", "stage_heard"]

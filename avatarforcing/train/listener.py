"""Training the listener (codecs/listener.py) on microphone-augmented corpus speech.

Each example is a random crop of a corpus clip, passed through a random ``Microphone`` chain (seeded by
(seed, step, index), so a resumed run sees the same examples); the targets are the clean crop's mel rows
(retimed when the chain changed the tempo), its ground-truth visemes and mouth opening. Examples are made
in worker processes ahead of the loop: augmentation, not the small net, is the cost.

    avatarforcing train listener --corpus data/corpus --model mini --out runs/listener --minutes 30 \\
        --export models/mini-listener
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..codecs.audio import MelFrontEnd
from ..codecs.listener import Listener, ListeningFrontEnd
from ..config import Config
from ..data.augment import Microphone
from ..errors import InputError
from .loop import LoopConfig, Trainer


@dataclass
class ListenerTrainConfig:
    steps: int = 3000
    batch: int = 8
    crop_seconds: float = 8.0
    lr: float = 1e-3
    viseme_weight: float = 0.1
    opening_weight: float = 1.0
    injection_weight: float = 1.0  # what the DiT adds to its tokens from these rows, against clean speech's
    p_clean: float = 0.15  # examples with the level change only: clean speech must come back unchanged
    ema_decay: float = 0.995  # averages over the last ~200 steps
    workers: int = 1
    seed: int = 0


def load_split(corpus: str | Path | list, split: str) -> dict[str, np.ndarray]:
    """Every shard of a split, of one corpus or several (same clip length): audio [clips, samples] float32,
    visemes / opening [clips, frames]."""
    corpora = corpus if isinstance(corpus, (list, tuple)) else [corpus]
    shards = [s for c in corpora for s in sorted((Path(c) / "shards").glob(f"{split}-*"))]
    if not shards:
        raise InputError(f"{corpus}: no {split} shards (make them with `avatarforcing data synth --split {split}`)")
    audio = np.concatenate([np.load(s / "audio.npy") for s in shards])
    gts = [np.load(s / "gt.npz") for s in shards]
    return {"audio": audio, "viseme": np.concatenate([g["viseme"] for g in gts]).astype(np.int64),
            "opening": np.concatenate([g["opening"] for g in gts]).astype(np.float32)}


def _retime(a: np.ndarray, n: int, tempo: float, nearest: bool) -> np.ndarray:
    """Per-frame values of the original crop, read at the frames of the stretched audio (n of them)."""
    src = np.arange(n) / tempo
    if nearest:
        return a[np.clip(np.round(src).astype(int), 0, len(a) - 1)]
    return np.interp(src, np.arange(len(a)), a) if a.ndim == 1 else \
        np.stack([np.interp(src, np.arange(len(a)), a[:, j]) for j in range(a.shape[1])], 1)


class Examples:
    """``make(step, i)`` -> one augmented example; picklable, for worker processes."""

    def __init__(self, data: dict[str, np.ndarray], cfg: Config, tcfg: ListenerTrainConfig):
        self.data, self.tcfg = data, tcfg
        self.fe = MelFrontEnd(cfg.codec)
        self.spf = cfg.codec.samples_per_frame
        self.frames = int(tcfg.crop_seconds * cfg.codec.fps)
        self.mic = Microphone(cfg.codec.sample_rate)

    def make(self, step: int, i: int, seed: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.tcfg.seed if seed is None else seed, step, i])
        audio = self.data["audio"]
        c = int(rng.integers(len(audio)))
        total = min(audio.shape[1] // self.spf, self.data["viseme"].shape[1])
        s = int(rng.integers(0, max(1, total - self.frames)))
        crop = audio[c, s * self.spf:(s + self.frames) * self.spf]
        clean_rows = self.fe.offline(crop).numpy()
        if rng.random() < self.tcfg.p_clean:
            pcm, tempo = np.clip(crop * 10 ** (rng.uniform(-20, 20) / 20), -1, 1), 1.0
        else:
            babble = [audio[j] for j in rng.integers(len(audio), size=6) if j != c]
            aug = self.mic.apply(crop, rng, babble)
            pcm, tempo = aug.pcm, aug.tempo
        x = self.fe.offline(pcm).numpy()
        n = len(x)
        return {"x": x.astype(np.float32),
                "rows": _retime(clean_rows, n, tempo, nearest=False).astype(np.float32),
                "viseme": _retime(self.data["viseme"][c, s:s + self.frames], n, tempo, nearest=True),
                "opening": _retime(self.data["opening"][c, s:s + self.frames], n, tempo, nearest=False)
                .astype(np.float32)}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        items = [self.make(step, i) for i in range(self.tcfg.batch)]
        n = min(len(it["x"]) for it in items)  # tempo changes lengths: crop to the shortest
        return {k: torch.from_numpy(np.stack([it[k][:n] for it in items])) for k in items[0]}


def corpus_prior(data: dict[str, np.ndarray], fe: MelFrontEnd, clips: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and std of clean corpus rows (the listener's normalisation prior and output scale)."""
    rows = torch.cat([fe.offline(a) for a in data["audio"][:clips]])
    bands = rows.view(len(rows), -1, fe.cfg.n_mels).reshape(-1, fe.cfg.n_mels)
    return bands.mean(0).float(), bands.std(0).float()


class Injection(torch.nn.Module):
    """The DiT's audio path up to what it adds to the tokens: every ``pack`` rows -> AudioPack -> each audio
    block's projection (frozen, from the model's weights). The listener is judged by this, not only by rows:
    what matters is what the DiT receives."""

    def __init__(self, model_dir: str | Path, cfg: Config):
        super().__init__()
        from ..checkpoints import read_state_dict
        from ..model.layers import AudioPack

        m = cfg.model
        sd = read_state_dict(Path(model_dir) / "model.safetensors")
        self.pack = m.audio_pack
        # the DiT's own audio modules (same names as in AvatarDiT, so its weights load as they are)
        self.audio_proj = AudioPack(m.audio_dim, m.audio_pack, m.audio_token_dim)
        self.audio_cond_projs = torch.nn.ModuleList(torch.nn.Linear(m.audio_token_dim, m.dim)
                                                    for _ in m.audio_block_ids())
        own = {k: v.float() for k, v in sd.items() if k.startswith(("audio_proj.", "audio_cond_projs."))}
        if len(own) != len(self.state_dict()):
            raise InputError(f"{model_dir}: the model has no audio path to adapt to (audio_proj / audio_cond_projs)")
        self.load_state_dict(own)
        self.requires_grad_(False)

    def forward(self, rows: Tensor) -> Tensor:
        """rows [N, T, D] -> [N, T // pack, blocks, dim] (the last T % pack rows dropped)."""
        n, t, d = rows.shape
        t = t // self.pack * self.pack
        tok = self.audio_proj(rows[:, :t].reshape(n, t // self.pack, self.pack, d))
        return torch.stack([p(tok) for p in self.audio_cond_projs], dim=2)

    def loss(self, rows: Tensor, target_rows: Tensor) -> Tensor:
        """Squared error of the injection relative to the clean injection's energy."""
        a, b = self(rows), self(target_rows)
        return (a - b).pow(2).mean() / b.pow(2).mean().clamp(min=1e-8)


def losses(net: Listener, b: dict[str, torch.Tensor], tcfg: ListenerTrainConfig,
           injection: Injection | None = None) -> tuple[torch.Tensor, dict]:
    rows, vis, opening = net.batch(b["x"])
    l_rows = F.mse_loss(rows, b["rows"])
    l_vis = F.cross_entropy(vis.reshape(-1, vis.shape[-1]), b["viseme"].reshape(-1))
    l_open = F.mse_loss(opening, b["opening"])
    loss = l_rows + tcfg.viseme_weight * l_vis + tcfg.opening_weight * l_open
    extra = {}
    if injection is not None and tcfg.injection_weight:
        l_inj = injection.loss(rows, b["rows"])
        loss = loss + tcfg.injection_weight * l_inj
        extra["injection_rel"] = l_inj.item()
    acc = (vis.argmax(-1) == b["viseme"]).float().mean()
    return loss, {"loss": loss.item(), "rows_mse": l_rows.item(), "viseme_ce": l_vis.item(),
                  "viseme_acc": acc.item(), "opening_mse": l_open.item(), **extra}


@torch.no_grad()
def evaluate(net: Listener, ex: Examples, n: int = 32, seed: int = 12345, injection: Injection | None = None) -> dict:
    """Held-out crops under fixed augmentation chains: the listener against the raw rows and against its own
    normalisation alone (the net's correction zeroed)."""
    net.eval()
    out = {"rows_mse": 0.0, "rows_mse_raw": 0.0, "rows_mse_norm_only": 0.0, "viseme_acc": 0.0, "opening_r": 0.0}
    if injection is not None:
        out.update({"injection_rel": 0.0, "injection_rel_raw": 0.0, "injection_rel_norm_only": 0.0})
    for i in range(n):
        it = ex.make(0, i, seed=seed)
        x, target = torch.from_numpy(it["x"]), torch.from_numpy(it["rows"])
        rows, vis, opening = net(x)
        z = net.normalise(x).view(len(x), net.hops, net.n_mels) * net.prior_std + net.prior_mean
        out["rows_mse"] += float(F.mse_loss(rows, target)) / n
        out["rows_mse_raw"] += float(F.mse_loss(x, target)) / n
        out["rows_mse_norm_only"] += float(F.mse_loss(z.view(x.shape), target)) / n
        if injection is not None:
            for key, r in (("injection_rel", rows), ("injection_rel_raw", x),
                           ("injection_rel_norm_only", z.view(x.shape))):
                out[key] += float(injection.loss(r[None], target[None])) / n
        out["viseme_acc"] += float((vis.argmax(-1).numpy() == it["viseme"]).mean()) / n
        o = it["opening"]
        out["opening_r"] += float(np.corrcoef(opening.numpy(), o)[0, 1]) / n if o.std() > 0 else 0.0
    net.train()
    return out


def train_listener(corpus: str | Path | list, model_dir: str | Path, out: str | Path, cfg: Config,
                   tcfg: ListenerTrainConfig, minutes: float | None = None, export: str | Path | None = None,
                   progress: bool = True) -> dict:
    from multiprocessing import get_context

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    train, heldout = load_split(corpus, "train"), load_split(corpus, "heldout")
    fe = MelFrontEnd(cfg.codec)
    net = Listener(fe.dim, cfg.codec.n_mels, lookahead=cfg.codec.listener_lookahead_frames,
                   history=cfg.codec.listener_history_frames)
    mean, std = corpus_prior(train, fe)
    net.prior_mean.copy_(mean)
    net.prior_std.copy_(std)
    loop = LoopConfig(steps=tcfg.steps, lr=tcfg.lr, betas=(0.9, 0.99), weight_decay=0.01, grad_clip=1.0,
                      ema_decay=tcfg.ema_decay, ema_start=100, log_every=min(20, tcfg.steps), save_every=100,
                      seed=tcfg.seed)
    trainer = Trainer("listener", net, out, loop, torch.device("cpu"))
    injection = Injection(model_dir, cfg)
    ex = Examples(train, cfg, tcfg)
    ctx = get_context("spawn")
    pool = ctx.Pool(tcfg.workers, initializer=torch.set_num_threads, initargs=(1,)) if tcfg.workers > 0 else None
    upcoming = range(trainer.step, tcfg.steps)
    batches = pool.imap(ex.batch, upcoming, chunksize=1) if pool else map(ex.batch, upcoming)

    def step_fn(step, micro, gen):
        return losses(net, next(batches), tcfg, injection)

    try:
        trainer.run(step_fn, progress=progress, deadline=None if minutes is None else time.time() + 60 * minutes)
    finally:
        if pool:
            pool.terminate()
    trained = trainer.trained()
    report = {"steps": trainer.step, "minutes": trainer.seconds / 60, "config": asdict(tcfg),
              "corpora": [str(c) for c in (corpus if isinstance(corpus, (list, tuple)) else [corpus])],
              "train_clips": len(train["audio"]), "heldout_clips": len(heldout["audio"]),
              "heldout": evaluate(trained, Examples(heldout, cfg, tcfg), injection=injection)}
    (out / "listener_eval.json").write_text(json.dumps(report, indent=1))
    if export:
        export_model(model_dir, trained, export, cfg, report)
    return report


def export_model(model_dir: str | Path, net: Listener, export: str | Path, cfg: Config, report: dict) -> None:
    """The model folder plus listener.safetensors, its config switched to ``codec.listener: mel-adapter``."""
    from safetensors.torch import save_file

    from ..checkpoints import atomic_write

    src, dst = Path(model_dir), Path(export)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.yaml", "listener.safetensors"):
            shutil.copy2(f, dst / f.name)
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write(dst / "listener.safetensors", lambda p: save_file(sd, str(p)))
    cfg.override({"codec.listener": "mel-adapter"}).save(dst / "config.yaml")
    ListeningFrontEnd.load(cfg.override({"codec.listener": "mel-adapter"}).codec, dst / "listener.safetensors")
    meta = dst / "training.json"
    record = json.loads(meta.read_text()) if meta.exists() else {}
    record["listener"] = report
    meta.write_text(json.dumps(record, indent=1))

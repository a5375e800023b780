"""Small evaluation networks trained on the synthetic corpus (``avatarforcing train syncnet``):

* ``SyncNet``: the SyncNet design (an audio stream and a video stream mapped to a shared space where
  in-sync pairs are close; Chung & Zisserman 2016) at corpus scale: 5 video frames of the mouth region vs
  the log-mel rows of the same 5 frames; trained with the contrastive loss on in-sync / off-sync pairs.
* ``MouthReader``: mouth crop -> opening, width, rounding (regression) and viseme (classification).
* ``IdentityNet``: face -> unit embedding, trained to tell the corpus's training identities apart; applied to
  unseen identities it is an identity embedding (distance to the reference = identity drift).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

EVAL_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "eval"
SYNC_FRAMES = 5


def mouth_crop(frames: Tensor) -> Tensor:
    """[N, 3, H, W] in [-1, 1] -> the lower-middle face region resized to [N, 3, 32, 32]."""
    h, w = frames.shape[-2:]
    crop = frames[..., int(0.45 * h):int(0.85 * h), int(0.28 * w):int(0.72 * w)]
    return F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)


def face_crop(frames: Tensor) -> Tensor:
    return F.interpolate(frames, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class MouthReader(nn.Module):
    def __init__(self, n_visemes: int = 16):
        super().__init__()
        self.body = nn.Sequential(_conv(3, 32), _conv(32, 32, 2), _conv(32, 64), _conv(64, 64, 2), _conv(64, 96, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.reg = nn.Linear(96, 3)
        self.cls = nn.Linear(96, n_visemes)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(crops)
        return self.reg(h), self.cls(h)


class SyncNet(nn.Module):
    def __init__(self, audio_dim: int = 128, dim: int = 128):
        super().__init__()
        self.video = nn.Sequential(_conv(3 * SYNC_FRAMES, 64), _conv(64, 64, 2), _conv(64, 128, 2),
                                   _conv(128, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, dim))
        self.audio = nn.Sequential(nn.Conv1d(audio_dim, 128, 3, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
                                   nn.Conv1d(128, 128, 3, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
                                   nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, dim))

    def embed_video(self, crops: Tensor) -> Tensor:
        """[N, 5, 3, 32, 32] -> [N, dim] (unit length)."""
        return F.normalize(self.video(crops.flatten(1, 2)), dim=-1)

    def embed_audio(self, rows: Tensor) -> Tensor:
        """[N, 5, audio_dim] -> [N, dim] (unit length)."""
        return F.normalize(self.audio(rows.transpose(1, 2)), dim=-1)


class IdentityNet(nn.Module):
    def __init__(self, n_ids: int, dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(_conv(3, 32, 2), _conv(32, 64, 2), _conv(64, 96, 2), _conv(96, 128, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, dim))
        self.head = nn.Linear(dim, n_ids)

    def embed(self, faces: Tensor) -> Tensor:
        return F.normalize(self.body(faces), dim=-1)

    def forward(self, faces: Tensor) -> Tensor:
        return self.head(self.body(faces))


def windows(x: Tensor, n: int = SYNC_FRAMES) -> Tensor:
    """[T, ...] -> [T - n + 1, n, ...] sliding windows."""
    return x.unfold(0, n, 1).movedim(-1, 1)


def offset_distances(v: Tensor, a: Tensor, max_offset: int = 15) -> Tensor:
    """Mean distance between video window embeddings ``v`` [N, d] and audio window embeddings ``a`` [N, d] for
    audio offsets -max..max (SyncNet procedure): offset o compares video window t with audio window t + o."""
    n = min(len(v), len(a))
    dists = []
    for o in range(-max_offset, max_offset + 1):
        lo, hi = max(0, -o), min(n, n - o)
        dists.append((v[lo:hi] - a[lo + o:hi + o]).norm(dim=-1).mean())
    return torch.stack(dists)


def sync_distances(net: SyncNet, crops: Tensor, rows: Tensor, max_offset: int = 15) -> Tensor:
    """``offset_distances`` of mouth crops [T, 3, 32, 32] and audio rows [T, audio_dim]."""
    with torch.no_grad():
        return offset_distances(net.embed_video(windows(crops)), net.embed_audio(windows(rows)), max_offset)


def scores_of(d: Tensor, max_offset: int = 15) -> dict:
    """Sync-D: the smallest mean distance; Sync-C: median - smallest; offset: where the smallest is."""
    i = int(d.argmin())
    return {"sync_d": float(d[i]), "sync_c": float(d.median() - d[i]), "offset": i - max_offset}


def sync_scores(net: SyncNet, crops: Tensor, rows: Tensor, max_offset: int = 15) -> dict:
    return scores_of(sync_distances(net, crops, rows, max_offset), max_offset)


# ---------------------------------------------------------------------------- training


def train_eval_nets(corpus: str | Path, out: str | Path = EVAL_WEIGHTS, steps: int = 1500, device: str = "cpu",
                    seed: int = 0, progress: bool = True) -> dict:
    """Train the three nets on the corpus's train split; write ``eval_nets.safetensors`` + ``eval_nets.json``."""
    import json

    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..codecs.audio import MelFrontEnd
    from ..config import preset

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shards = sorted((Path(corpus) / "shards").glob("train-*"))
    frames = [np.load(d / "frames.npy", mmap_mode="r") for d in shards]
    audio = [np.load(d / "audio.npy", mmap_mode="r") for d in shards]
    gts = [dict(np.load(d / "gt.npz")) for d in shards]
    fe = MelFrontEnd(preset("mini").codec)
    n_clips = [f.shape[0] for f in frames]
    ids = np.cumsum([0] + n_clips)
    mel_cache: dict[tuple[int, int], Tensor] = {}

    def mel(s, c):
        if (s, c) not in mel_cache:
            mel_cache[(s, c)] = fe.offline(np.array(audio[s][c]))
        return mel_cache[(s, c)]

    def to_t(x):
        return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).float() / 127.5 - 1

    reader, sync, ident = MouthReader(), SyncNet(fe.dim), IdentityNet(int(ids[-1]))
    nets = nn.ModuleDict({"reader": reader, "sync": sync, "ident": ident}).to(device)
    opt = torch.optim.AdamW(nets.parameters(), lr=1e-3, weight_decay=1e-4)
    log = {}
    for step in tqdm(range(steps), desc="eval nets", disable=not progress):
        nets.train()
        b = 24
        crops, targets, vis, v5, a5, labels, faces, cls = [], [], [], [], [], [], [], []
        for _ in range(b):
            s = int(torch.randint(len(shards), (1,), generator=gen))
            c = int(torch.randint(n_clips[s], (1,), generator=gen))
            t_len = frames[s].shape[1]
            t = int(torch.randint(0, t_len - SYNC_FRAMES - 16, (1,), generator=gen))
            clip = to_t(frames[s][c, t:t + SYNC_FRAMES]).to(device)
            mc = mouth_crop(clip)
            crops.append(mc[0])
            g = gts[s]
            targets.append(torch.tensor([g["opening"][c, t], g["width"][c, t], g["rounding"][c, t]]))
            vis.append(int(g["viseme"][c, t]))
            faces.append(face_crop(clip[:1])[0])
            cls.append(int(ids[s] + c))
            # in sync (label 1) or shifted by 3..15 frames (label 0)
            shift = 0 if torch.rand(1, generator=gen) < 0.5 else int(torch.randint(3, 16, (1,), generator=gen))
            rows = mel(s, c)[t + shift:t + shift + SYNC_FRAMES]
            if len(rows) < SYNC_FRAMES:
                rows, shift = mel(s, c)[t:t + SYNC_FRAMES], 0
            v5.append(mc)
            a5.append(rows)
            labels.append(1.0 if shift == 0 else 0.0)
        pred, logits = reader(torch.stack(crops))
        l_reader = F.mse_loss(pred, torch.stack(targets).float().to(device)) * 10 + \
            F.cross_entropy(logits, torch.tensor(vis, device=device)) * 0.3
        dv = sync.embed_video(torch.stack(v5))
        da = sync.embed_audio(torch.stack(a5).to(device))
        d = (dv - da).norm(dim=-1)
        y = torch.tensor(labels, device=device)
        l_sync = (y * d.pow(2) + (1 - y) * F.relu(1.0 - d).pow(2)).mean()  # SyncNet's contrastive loss
        l_id = F.cross_entropy(ident(torch.stack(faces)), torch.tensor(cls, device=device))
        loss = l_reader + l_sync + l_id
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log = {"step": step, "reader": l_reader.item(), "sync": l_sync.item(), "ident": l_id.item()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in nets.state_dict().items()},
              str(out / "eval_nets.safetensors"))
    meta = {"n_ids": int(ids[-1]), "audio_dim": fe.dim, "steps": steps, "final_losses": log}
    (out / "eval_nets.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_eval_nets(path: str | Path = EVAL_WEIGHTS) -> nn.ModuleDict:
    import json

    from ..checkpoints import load_into, read_state_dict
    from ..errors import InputError

    path = Path(path)
    if not (path / "eval_nets.safetensors").is_file():
        raise InputError(f"{path}: no eval_nets.safetensors; run `avatarforcing train syncnet` first")
    meta = json.loads((path / "eval_nets.json").read_text())
    nets = nn.ModuleDict({"reader": MouthReader(), "sync": SyncNet(meta["audio_dim"]),
                          "ident": IdentityNet(meta["n_ids"])})
    load_into(nets, read_state_dict(path / "eval_nets.safetensors"), str(path / "eval_nets.safetensors"))
    return nets.eval()

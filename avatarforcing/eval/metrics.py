"""Video metrics: lip sync against ground truth, mouth opening against loudness (any clip), SyncNet-style
Sync-C / Sync-D, identity drift, colour drift, temporal flicker. Inputs: uint8 frames [T, H, W, 3] at 25 fps
and float32 16 kHz audio. The networks run where ``nets`` lives (``load_eval_nets().to("cuda")`` for a
benchmark of hundreds of clips)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..codecs.audio import MelFrontEnd
from ..config import preset
from ..errors import InputError
from .nets import face_crop, mouth_crop, offset_distances, scores_of, sync_scores, windows
from .stats import pearson, permutation_p

FPS = 25
RATE = 16000  # audio samples per second, as the eval nets and mini hear it
MIN_FLOOR_S = 4  # seconds a time-shifted floor needs (shifts of at least 1 s, not past the end)
# a mouth whose opening as read (0 closed .. 1 fully open) spans less than this over a clip does not move: its
# correlations are 0, not whatever a video codec's flicker happens to correlate with (a frozen frame through
# H.264 reads as a tiny step when the encoder settles)
STILL_OPENING = 0.02


def _still(opening: np.ndarray) -> bool:
    return len(opening) == 0 or float(np.ptp(opening)) < STILL_OPENING


def _device(nets) -> torch.device:
    return next(nets.parameters()).device


def frames_tensor(frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, H, W] in [-1, 1] on ``device``; such a tensor is passed through
    (``evaluate_video`` converts a video once for all its metrics)."""
    if isinstance(frames, torch.Tensor):
        return frames
    x = torch.from_numpy(np.array(frames, np.uint8)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> CIE Lab (D65) [..., 3]."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _seconds(n: int) -> list[slice]:
    return [slice(s, min(n, s + FPS)) for s in range(0, n, FPS)]


def colour_drift(frames: np.ndarray) -> dict:
    """Per second: |mean Lab - mean Lab of the first second| for the face region and the background."""
    h, w = frames.shape[1:3]
    face = (slice(int(0.25 * h), int(0.75 * h)), slice(int(0.3 * w), int(0.7 * w)))
    bg = (slice(0, int(0.12 * h)), slice(0, int(0.15 * w)))
    out = {}
    for name, (ys, xs) in (("face", face), ("background", bg)):
        per = [srgb_to_lab(frames[s, ys, xs]).reshape(-1, 3).mean(0) for s in _seconds(len(frames))]
        out[name] = [float(np.linalg.norm(p - per[0])) for p in per]
    return out


@torch.no_grad()
def flicker(frames: np.ndarray, device: torch.device | str = "cpu") -> list[float]:
    """Per second: mean absolute difference between consecutive frames (0..255 scale), after 4x4 pooling."""
    f = torch.nn.functional.avg_pool2d((frames_tensor(frames, device) + 1) * 127.5, 4)  # [T, 3, H/4, W/4]
    d = (f[1:] - f[:-1]).abs().mean((1, 2, 3)).double().cpu().numpy()
    d = np.concatenate([[d[0] if len(d) else 0.0], d])
    return [float(d[s].mean()) for s in _seconds(len(frames))]


@torch.no_grad()
def mouth_readings(nets, frames: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(opening/width/rounding [T, 3], viseme [T]) read from the pixels."""
    regs, vis = [], []
    for i in range(0, len(frames), batch):
        r, logits = nets["reader"](mouth_crop(frames_tensor(frames[i:i + batch], _device(nets))))
        regs.append(r.cpu().numpy())
        vis.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(regs), np.concatenate(vis)


def loudness_sync(opening: np.ndarray, audio: np.ndarray, rate: int = RATE, max_lag: int = 3,
                  shifts: int = 200, seed: int = 0) -> dict:
    """Mouth opening read from the pixels against speech loudness, for any clip with audio (no ground truth).

    Loudness: RMS level of each video frame's audio, in dB. ``loudness_r``: the Pearson r at the best lag
    within +-``max_lag`` frames (``loudness_lag``: positive = the mouth follows the sound). The floor is the
    same statistic with the audio circularly shifted by at least one second (``shifts`` random shifts):
    ``loudness_r_floor95`` is its 95th percentile, so a clip whose r exceeds it follows its own audio
    better than 95% of time-shifted versions of it.
    """
    spf = rate // FPS
    n = min(len(opening), len(audio) // spf)
    if n < MIN_FLOOR_S * FPS:
        return {}
    frames = np.asarray(audio[: n * spf], np.float64).reshape(n, spf)
    loud = 20 * np.log10(np.sqrt((frames ** 2).mean(1)) + 1e-4)
    mouth = np.asarray(opening[:n], np.float64)
    if _still(mouth):
        mouth = np.zeros_like(mouth)  # r = 0 against every shift: never above the floor

    def best(level: np.ndarray) -> tuple[float, int]:
        rs = []
        for lag in range(-max_lag, max_lag + 1):  # mouth[t] against level[t - lag]
            a, b = (mouth[lag:], level[: n - lag]) if lag >= 0 else (mouth[:lag], level[-lag:])
            rs.append((pearson(a, b), lag))
        return max(rs)

    r, lag = best(loud)
    rng = np.random.default_rng(seed)
    floor = [best(np.roll(loud, int(k)))[0] for k in rng.integers(FPS, n - FPS, size=shifts)]
    return {"loudness_r": r, "loudness_lag": lag, "loudness_r_floor95": float(np.percentile(floor, 95)),
            "loudness_r_floor_mean": float(np.mean(floor)), "loudness_r_p": permutation_p(r, floor)}


def lip_sync(nets, frames: np.ndarray, gt: dict, readings: tuple | None = None) -> dict:
    """Pearson r between the mouth opening read from pixels and the ground truth; viseme accuracy."""
    reg, vis = readings or mouth_readings(nets, frames)
    n = min(len(reg), len(gt["opening"]))
    opening = reg[:n, 0]
    r = 0.0 if _still(opening) else pearson(opening, np.asarray(gt["opening"][:n]))  # never NaN
    truth = np.asarray(gt["viseme"][:n])
    acc = float((vis[:n] == truth).mean())
    # what always answering the clip's most common viseme scores: the floor viseme accuracy must beat
    majority = float(np.bincount(truth.astype(int)).max() / len(truth)) if len(truth) else 0.0
    return {"lipsync_r": r, "viseme_acc": acc, "viseme_majority": majority}


# the face in the corpus's portraits (face-centred, render.py): an ellipse about the face with a small margin,
# as fractions of the frame (centre x, centre y, radius x, radius y)
FACE_ELLIPSE = (0.50, 0.44, 0.21, 0.28)


def face_mask(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, H, W]: 1 inside FACE_ELLIPSE, 0 outside, with a 2-pixel soft edge."""
    cx, cy, rx, ry = FACE_ELLIPSE
    y = (torch.arange(h, device=device).float() + 0.5) / h
    x = (torch.arange(w, device=device).float() + 0.5) / w
    d = ((x[None] - cx) / rx) ** 2 + ((y[:, None] - cy) / ry) ** 2  # < 1 inside
    edge = 2 / (min(rx * w, ry * h))  # about two pixels in units of d's square root
    return ((1 - d.sqrt()) / edge + 0.5).clamp(0, 1)[None, None]


@torch.no_grad()
def identity_drift(nets, frames: np.ndarray, reference: np.ndarray) -> list[float]:
    """Per second: cosine distance between the mean identity embedding of that second and the reference's.

    Only the face counts: every frame is shown to the identity net with the reference's pixels outside the
    face ellipse (the net was trained on whole portraits, so the input keeps that layout), so background,
    hair outline and clothes changing does not read as identity drift."""
    dev = _device(nets)
    ref = frames_tensor(reference[None], dev)
    mask = face_mask(*ref.shape[-2:], dev)
    embed = nets["ident"].embed
    ref_emb = embed(face_crop(ref))[0]
    emb = torch.cat([embed(face_crop(ref * (1 - mask) + frames_tensor(frames[i:i + 256], dev) * mask))
                     for i in range(0, len(frames), 256)])
    means = torch.stack([emb[s].mean(0) for s in _seconds(len(frames))])  # [seconds, D]
    return (1 - torch.nn.functional.cosine_similarity(means, ref_emb[None], dim=1)).double().cpu().tolist()


@functools.cache
def _sync_front_end() -> MelFrontEnd:
    return MelFrontEnd(preset("mini").codec)  # the rows the SyncNet-style model was trained on


def _sync_inputs(nets, frames: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(mouth crops, audio rows) of the frames both cover, on the nets' device."""
    rows = _sync_front_end().offline(audio)
    n = min(len(rows), len(frames))
    crops = mouth_crop(frames_tensor(frames[:n], _device(nets)))
    return crops, rows[:n].to(crops.device)


def sync(nets, frames: np.ndarray, audio: np.ndarray) -> dict:
    return sync_scores(nets["sync"], *_sync_inputs(nets, frames, audio))


def sync_floor(nets, frames: np.ndarray, audio: np.ndarray, shifts: int = 99, seed: int = 0) -> dict:
    """Sync-C with the audio circularly shifted by at least one second: what a video scores against speech
    that is not its own (``sync_c_floor95``: the 95th percentile over ``shifts`` shifts). One audio row per
    video frame, so shifting the audio by k frames is rolling its rows by k (crops and rows computed once)."""
    crops, rows = _sync_inputs(nets, frames, audio)
    n = len(rows)
    if n < MIN_FLOOR_S * FPS:
        return {}
    rng = np.random.default_rng(seed)
    net = nets["sync"]
    with torch.no_grad():  # the video's embeddings do not change with the audio's shift: once
        video = net.embed_video(windows(crops))
        vals = [scores_of(offset_distances(video, net.embed_audio(windows(torch.roll(rows, int(k), 0)))))["sync_c"]
                for k in rng.integers(FPS, n - FPS, shifts)]
        observed = scores_of(offset_distances(video, net.embed_audio(windows(rows))))["sync_c"]
    return {"sync_c_floor95": float(np.percentile(vals, 95)), "sync_c_floor_mean": float(np.mean(vals)),
            "sync_c_p": permutation_p(observed, vals), "sync_c_shifts": shifts}


def evaluate_video(nets, frames: np.ndarray, audio: np.ndarray, reference: np.ndarray | None = None,
                   gt: dict | None = None, syncnet_v2=None, floors: bool = False) -> dict:
    """All metrics of one video. Scalars plus per-second curves (``curves``). With ``syncnet_v2`` (the public
    SyncNet, ``eval.syncnet_v2.load_syncnet_v2``) also LSE-C / LSE-D; with ``floors`` also Sync-C's
    time-shifted floor (99 more Sync-C runs: for one video, not for a benchmark of hundreds). Loudness sync and
    the floors need ``MIN_FLOOR_S`` seconds (they shift the audio by at least one); shorter clips omit them.
    ``above_floor``: the mouth follows its own speech's loudness better than 95% of time-shifted versions; the
    drift and flicker scores of a clip without it say nothing about stability (a still video scores best)."""
    covered = min(len(frames), len(audio) // (RATE // FPS))
    if covered < FPS:  # Sync-C compares windows at +-15 frames
        raise InputError(f"{len(frames)} frames with {len(audio) / RATE:.2f} s of audio cover {covered / FPS:.2f} s; "
                         "the metrics need at least 1 s")
    res: dict = {"frames": int(len(frames))}
    x = frames_tensor(frames, _device(nets))  # once, for every metric that runs a network
    res.update(sync(nets, x, audio))
    if floors:
        res.update(sync_floor(nets, x, audio))
    if syncnet_v2 is not None:
        from .syncnet_v2 import lse_scores

        res.update(lse_scores(syncnet_v2, frames, audio))
    readings = mouth_readings(nets, x)
    res.update(loudness_sync(readings[0][:, 0], audio))
    if "loudness_r_floor95" in res:  # the drift scores are evidence of stability only for a mouth that talks
        res["above_floor"] = bool(res["loudness_r"] > res["loudness_r_floor95"])
    if gt is not None:
        res.update(lip_sync(nets, x, gt, readings))
    colour = colour_drift(frames)
    curves = {"colour_drift_face": colour["face"], "colour_drift_background": colour["background"],
              "flicker": flicker(x)}
    if reference is not None:
        curves["identity_drift"] = identity_drift(nets, x, reference)
    res["curves"] = curves
    for k, v in curves.items():
        first = v[: min(len(v), 60)]  # the first minute
        res[f"{k}_end"] = float(np.mean(v[-3:]))
        res[f"{k}_first_minute"] = float(np.mean(first))
        res[f"{k}_first_minute_std"] = float(np.std(first))
    return res

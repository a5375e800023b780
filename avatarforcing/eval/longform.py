"""The long-form benchmark: unseen clips, every mode and ablation on the same clips and seeds; JSON, a
markdown table and per-second drift plots.

Clips are synthesised on demand (seed 1234 namespace), so the benchmark needs no corpus on disk:
``make_clip(split, i, seed, seconds)`` gives audio, ground truth and the reference. ``split``: "heldout", the
development split every training choice was checked on, or "test", for the numbers a claim rests on (voices of
timbres no training clip has; data/corpus.py).

What a score may be read as: every comparison is paired (``paired``: per-clip differences against
``avatarforcing``, clips resampled jointly); drift and flicker count only on clips whose mouth follows its own
speech above the time-shifted floor (``above_floor``), since a still video scores best on them; flicker is also
given relative to the clip's real render (``flicker_vs_real``: 1 = as much frame-to-frame change as the real
video); FID/FVD carry clip-bootstrap intervals and the real-vs-real split value (frechet.py).
``batch`` clips run through the engine together and ``workers`` processes synthesise the next clips
meanwhile: that is what makes 400 clips x every mode fit a few minutes of an accelerator.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..api import MODES, Avatar, Options
from ..checkpoints import atomic_write
from ..data.corpus import make_clip, reference_frame
from ..errors import InputError
from . import stats
from .frechet import RESAMPLES, CorpusClips, CorpusFrames, TorchScriptClips, TorchScriptFrames, frechet_intervals
from .metrics import evaluate_video, flicker
from .nets import EVAL_WEIGHTS, load_eval_nets
from .report import PER_CLIP, write_report
from .syncnet_v2 import load_syncnet_v2

ABLATIONS = {f"no-{name}": Options.without(name) for name in Options.names()}  # the paper's ablations
# the method with a config field changed: the release's position scheme (stream/positions.py)
VARIANTS = {"release-positions": {"stream.positions": "release"}}
# "real": the held-out render itself, scored the same way (the ceiling of every metric); "codec": the render
# through the model's VAE alone (the ceiling of any DiT that generates its latents)
# "frozen": the reference portrait held still for the clip's length; "reversed": the real render played
# backwards; "late": the real render LATE_FRAMES late (its first frame held): videos no sync metric should prefer
# to the real one, the checks that a metric sees stillness, time order and offsets
LATE_FRAMES = 12
ALL_MODES = ["avatarforcing", "ar", "teacher", "shuffled", *ABLATIONS, *VARIANTS, "codec", "real", "frozen",
             "reversed", "late"]
REFERENCE_ROWS = ("real", "frozen", "reversed", "late")  # made from the clip itself, not generated
# scores a still video wins: counted only on clips whose lip sync beats its floor (metrics.evaluate_video)
STILLNESS = ["identity_drift_end", "identity_drift_first_minute", "colour_drift_face_end",
             "colour_drift_background_end", "flicker_end", "flicker_vs_real"]
GATES = {k: ("above_floor", "lip sync not above its time-shifted floor (or the clip is too short for one): "
                            "a still mouth's drift is no evidence of stability") for k in STILLNESS}
SPLITS = ("heldout", "test")


def clip_summary(details: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over clips of every per-clip score, its 95% bootstrap interval and what was excluded (stats.py)."""
    return stats.clip_summary(details, PER_CLIP, resamples, seed, gates=GATES)


BASELINE = "avatarforcing"  # paired differences are against this mode when it ran


def _clip(args: tuple[int, str, int, float, int, tuple[str, ...]]) -> dict:
    """Clip ``index`` of ``split``: its render, speech, ground truth and reference portrait (picklable, so a
    process pool can synthesise clips while the model runs)."""
    index, split, seed, seconds, size, synthesisers = args
    spec, real, audio, gt = make_clip(split, index, seed, seconds, size=size, synthesisers=synthesisers)
    return {"name": spec.name, "voice": spec.voice, "real": real, "audio": audio, "gt": gt,
            "ref": reference_frame(spec, size)}


class _Clips:
    """Clips by index, synthesised in-process or ahead of time by ``workers`` processes; each clip once."""

    def __init__(self, split: str, seed: int, seconds: float, size: int, workers: int,
                 synthesisers: tuple[str, ...]):
        self.args = (split, seed, seconds, size, synthesisers)
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.pending: dict[int, Future] = {}
        self.ready: dict[int, dict] = {}

    def prefetch(self, indices) -> None:
        if self.pool is not None:
            for i in indices:
                if i not in self.pending and i not in self.ready:
                    self.pending[i] = self.pool.submit(_clip, (i, *self.args))

    def get(self, i: int) -> dict:
        if i not in self.ready:
            self.ready[i] = self.pending.pop(i).result() if i in self.pending else _clip((i, *self.args))
        return self.ready[i]

    def keep_only(self, indices) -> None:
        """Forget the clips that are done with (a clip borrowed as a shuffled partner may be needed next)."""
        self.ready = {i: c for i, c in self.ready.items() if i in set(indices)}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _shuffled_partner(i: int, clips: int) -> int:
    """The clip whose speech drives clip i in the shuffled-audio baseline: the next one, cyclically (a one-clip
    run borrows held-out clip 1, outside the evaluated set)."""
    return (i + 1) % clips if clips > 1 else 1


def run_longform(model: str, clips: int, frames: int, modes: list[str], json_path: str | Path | None,
                 report_dir: str | Path | None, seed: int = 1234, eval_nets: str | Path = EVAL_WEIGHTS,
                 device: str = "cpu", progress: bool = True, fid_extractor: str | None = None, batch: int = 1,
                 workers: int = 0, deadline_minutes: float | None = None, first: int = 0,
                 syncnet_v2: str | Path | None = None, voices: tuple[str, ...] = ("espeak",), split: str = "test",
                 fvd_extractor: str | None = None, fvd_frames: int = 16) -> dict:
    """Every mode on clips first..clips-1 of ``split``, ``batch`` clips per engine run (``Avatar.generate_batch``).

    Clip i is generated with seed i in every mode. The JSON is rewritten after every batch, so an interrupted
    run leaves the clips done so far; with ``deadline_minutes`` the run stops after the batch that passes it.
    ``syncnet_v2``: path of the public SyncNet's weights, to add LSE-C / LSE-D. ``first`` resumes such a run:
    per-clip results do not depend on how the clips are split into runs (the shuffled-audio partner is defined
    over all ``clips``); FID/FVD cover the clips of this run only. ``fid_extractor``: a TorchScript frame
    network for FID; ``fvd_extractor``: a TorchScript video network (I3D-style input, ``fvd_frames`` frames) for
    a true FVD; by default the corpus-trained extractors (FID* / FVD*, frechet.py).
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise InputError(f"unknown modes {unknown}; expected some of {ALL_MODES}")
    if clips < 1 or frames < 1 or batch < 1 or not 0 <= first < clips:
        raise InputError(f"need clips, frames, batch >= 1 and 0 <= first < clips (got {clips}, {frames}, {batch}, "
                         f"{first})")
    t_start = time.perf_counter()
    avatar = Avatar.load(model, device)
    nets = load_eval_nets(eval_nets).to(device)
    lse_net = load_syncnet_v2(syncnet_v2, device) if syncnet_v2 else None
    size = avatar.cfg.codec.height
    fid_net = TorchScriptFrames(fid_extractor) if fid_extractor else CorpusFrames(nets)
    fvd_net = TorchScriptClips(fvd_extractor, fvd_frames) if fvd_extractor else CorpusClips(nets)
    acc = {"real_f": [], "real_c": [], "gen_f": {m: [] for m in modes}, "gen_c": {m: [] for m in modes},
           "per_mode": {m: [] for m in modes}, "gen_s": {m: 0.0 for m in modes}, "extractors": (fid_net, fvd_net)}
    real_flicker = {}  # clip index -> mean flicker of its real render over the clip
    source = _Clips(split, seed, frames / 25, size, workers, tuple(voices))
    groups = [list(range(lo, min(clips, lo + batch))) for lo in range(first, clips, batch)]
    bar = tqdm(total=(clips - first) * len(modes), desc="longform", disable=not progress)
    result: dict = {}
    try:
        for g, idx in enumerate(groups):
            partners = [_shuffled_partner(i, clips) for i in idx] if "shuffled" in modes else []
            source.prefetch(idx + partners)
            if g + 1 < len(groups):  # synthesise the next batch while this one runs
                source.prefetch(groups[g + 1])
            data = {i: source.get(i) for i in idx}
            others = {j: source.get(j)["audio"] for j in set(partners)}
            source.keep_only(groups[g + 1] if g + 1 < len(groups) else [])
            for i in idx:
                acc["real_f"].append(fid_net(data[i]["real"]))
                acc["real_c"].append(fvd_net(data[i]["real"]))
                real_flicker[i] = float(np.mean(flicker(data[i]["real"])))
            for m in modes:
                # "shuffled": the method driven by another clip's speech, scored against this clip's own
                drive = [others[p] for p in partners] if m == "shuffled" else [data[i]["audio"] for i in idx]
                t0 = time.perf_counter()
                if m == "real":
                    videos = [data[i]["real"] for i in idx]
                elif m == "frozen":  # the portrait held still: what metrics that reward stillness give it
                    videos = [np.repeat(data[i]["ref"][None], len(data[i]["real"]), 0) for i in idx]
                elif m == "reversed":
                    videos = [data[i]["real"][::-1].copy() for i in idx]
                elif m == "late":
                    videos = [np.concatenate([np.repeat(data[i]["real"][:1], LATE_FRAMES, 0),
                                              data[i]["real"][:-LATE_FRAMES]]) for i in idx]
                elif m == "codec":
                    videos = [avatar.reconstruct(data[i]["real"]) for i in idx]
                else:
                    engine = avatar
                    if m in VARIANTS:
                        engine = copy.copy(avatar)
                        engine.cfg = avatar.cfg.override(VARIANTS[m])
                    videos = engine.generate_batch([data[i]["ref"] for i in idx], drive, idx,
                                                   mode=m if m in MODES else "avatarforcing", options=ABLATIONS.get(m))
                acc["gen_s"][m] += time.perf_counter() - t0
                for i, video in zip(idx, videos):
                    res = evaluate_video(nets, video, data[i]["audio"], data[i]["ref"], data[i]["gt"], lse_net)
                    res.update(clip=data[i]["name"], voice=data[i]["voice"], mode=m,
                               flicker_vs_real=float(np.mean(res["curves"]["flicker"])) / max(real_flicker[i], 1e-6))
                    acc["gen_f"][m].append(fid_net(video))
                    acc["gen_c"][m].append(fvd_net(video))
                    acc["per_mode"][m].append(res)
                    bar.update(1)
            done = idx[-1] + 1
            last = g + 1 == len(groups) or (deadline_minutes is not None
                                            and time.perf_counter() - t_start > 60 * deadline_minutes)
            # FID/FVD intervals (hundreds of Fréchet distances) for the final result only; the JSON written
            # after each earlier batch has the distances without them
            result = _result(model, clips, first, done, frames, seed, modes, batch, device, acc,
                             time.perf_counter() - t_start, resamples=RESAMPLES if last else 0)
            result["voices"], result["split"] = list(voices), split
            if len(voices) > 1:  # the same scores per synthesiser (flite clips: the held-out real speaker)
                result["by_synthesiser"] = {
                    m: {syn: clip_summary(part) for syn in voices
                        if (part := [r for r in rs if r.get("voice", "").startswith("flite:") == (syn == "flite")])}
                    for m, rs in acc["per_mode"].items()}
            if json_path:
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                text = json.dumps(result, indent=1)
                atomic_write(Path(json_path), lambda tmp, text=text: tmp.write_text(text))
            if last:
                break
    finally:
        bar.close()
        source.close()
    if report_dir:
        write_report(result, Path(report_dir))
    return result


def _result(model, clips, first, done, frames, seed, modes, batch, device, acc, wall_s, resamples) -> dict:
    per_mode = acc["per_mode"]
    summary = {m: clip_summary(rs) for m, rs in per_mode.items()}
    pairs = stats.paired(per_mode, BASELINE, PER_CLIP, gates=GATES)
    base = BASELINE if BASELINE in modes else None
    frechet = {}
    for key, gen, real in (("fid", "gen_f", "real_f"), ("fvd", "gen_c", "real_c")):
        # distribution distances against the real renders of the same clips, with clip-bootstrap intervals
        fd = frechet_intervals(acc[gen], acc[real], base, resamples)
        frechet[key] = {"real_split": fd["real_split"], "resamples": fd["resamples"]}
        for m in modes:
            summary[m][key] = fd["value"][m]
            if m in fd["ci95"]:
                summary[m]["ci95"][key] = fd["ci95"][m]
            if m in fd["paired"]:
                pairs[m][key] = fd["paired"][m]
    for m in modes:
        if m not in REFERENCE_ROWS:  # frames generated per second, all streams of a batch together
            summary[m]["fps"] = (done - first) * frames / acc["gen_s"][m]
    curves = {m: {k: np.mean([r["curves"][k] for r in rs], axis=0).tolist() for k in rs[0]["curves"]}
              for m, rs in per_mode.items()}
    return {"model": str(model), "clips": done - first, "first": first, "clips_requested": clips - first,
            "frames": frames, "seed": seed,
            "modes": modes, "batch": batch, "device": device, "wall_s": wall_s,
            "feature_extractors": {"sync": "corpus-trained SyncNet-style (assets/eval)",
                                   "fid": acc["extractors"][0].name, "fvd": acc["extractors"][1].name,
                                   "lipsync": "corpus-trained mouth reader",
                                   "identity": "corpus-trained IdentityNet (face region)"},
            "summary": summary, "curves_per_second": curves, "frechet": frechet,
            "paired": pairs, "paired_baseline": BASELINE,
            "clips_detail": {m: [{k: v for k, v in r.items() if k != "curves"} for r in rs]
                             for m, rs in per_mode.items()}}


def merge_longform(parts: list[dict]) -> dict:
    """One result from runs over consecutive clip ranges (``run_longform(first=...)``) of the same benchmark.

    Per-clip scores are averaged over all clips and the curves weighted by clip count, exactly as one run would
    have done; FID/FVD are distribution distances of each run's own clips, so they are kept per part
    (``fid_parts``/``fvd_parts``) and the summary's ``fid``/``fvd`` is their clip-weighted mean.
    """
    parts = sorted(parts, key=lambda r: r.get("first", 0))
    keys = ("model", "frames", "seed", "modes", "split")
    for r in parts:
        r.setdefault("split", "heldout")  # runs before the test split existed
    for r in parts[1:]:
        if any(r[k] != parts[0][k] for k in keys):
            raise InputError(f"runs differ in {[k for k in keys if r[k] != parts[0][k]]}; cannot merge")
    pos = 0
    for r in parts:
        if r.get("first", 0) != pos:
            raise InputError(f"clip ranges are not consecutive: a run starts at clip {r.get('first', 0)}, "
                             f"expected {pos}")
        pos += r["clips"]
    modes, n = parts[0]["modes"], [r["clips"] for r in parts]
    detail = {m: [d for r in parts for d in r["clips_detail"][m]] for m in modes}
    summary = {m: clip_summary(detail[m]) for m in modes}
    for m in modes:
        for k in ("fid", "fvd"):
            summary[m][f"{k}_parts"] = [r["summary"][m][k] for r in parts]
            summary[m][k] = float(np.average(summary[m][f"{k}_parts"], weights=n))
        if all("fps" in r["summary"][m] for r in parts):
            gen_s = sum(c * r["frames"] / r["summary"][m]["fps"] for c, r in zip(n, parts))
            summary[m]["fps"] = sum(n) * parts[0]["frames"] / gen_s
    curves = {m: {k: np.average([r["curves_per_second"][m][k] for r in parts], axis=0, weights=n).tolist()
                  for k in parts[0]["curves_per_second"][m]} for m in modes}
    out = {k: parts[0][k] for k in (*keys, "batch", "device", "feature_extractors")}
    out.update(clips=sum(n), first=0, clips_requested=sum(n), wall_s=sum(r["wall_s"] for r in parts),
               parts=[{"first": r.get("first", 0), "clips": r["clips"], "wall_s": r["wall_s"]} for r in parts],
               summary=summary, curves_per_second=curves, clips_detail=detail,
               paired=stats.paired(detail, BASELINE, PER_CLIP, gates=GATES), paired_baseline=BASELINE)
    return out

"""The long-form benchmark: held-out clips (unseen identities, voices, sentences), every mode and ablation
on the same clips and seeds; JSON, a markdown table and per-second drift plots.

Clips are synthesised on demand from the held-out split (seed 1234 namespace), so the benchmark needs no
corpus on disk: ``make_clip("heldout", i, seed, seconds)`` gives audio, ground truth and the reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..api import Avatar, Options
from ..data.corpus import make_clip, reference_frame
from .metrics import CorpusFeatures, TorchScriptFeatures, evaluate_video, frechet_distance
from .nets import EVAL_WEIGHTS, load_eval_nets

ABLATIONS = {
    "no-style-anchor": Options(style_anchor=False),
    "no-rope-reindex": Options(rope_reindex=False),
    "no-audio-zero-pad": Options(audio_zero_pad=False),
    "no-temporal-anchor": Options(temporal_anchor=False),
}
ALL_MODES = ["avatarforcing", "ar", "teacher", "shuffled", *ABLATIONS]
SCALARS = ["lipsync_r", "viseme_acc", "sync_c", "sync_d", "identity_drift_end", "identity_drift_first_minute",
           "colour_drift_face_end", "colour_drift_background_end", "flicker_end", "fid", "fvd", "fps"]


def _run(avatar: Avatar, mode: str, ref: np.ndarray, audio: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    if mode in ABLATIONS:
        frames = avatar.generate(ref, audio, seed=seed, options=ABLATIONS[mode])
    else:  # "shuffled" is the plain sampler driven by another clip's audio (chosen by the caller)
        frames = avatar.generate(ref, audio, seed=seed, mode="avatarforcing" if mode == "shuffled" else mode)
    return frames, len(frames) / (time.perf_counter() - t0)


def run_longform(model: str, clips: int, frames: int, modes: list[str], json_path: str | Path | None,
                 report_dir: str | Path | None, seed: int = 1234, eval_nets: str | Path = EVAL_WEIGHTS,
                 device: str = "cpu", progress: bool = True, fid_extractor: str | None = None) -> dict:
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; expected some of {ALL_MODES}")
    avatar = Avatar.load(model, device)
    nets = load_eval_nets(eval_nets)
    seconds = frames / 25
    extractor = TorchScriptFeatures(fid_extractor) if fid_extractor else CorpusFeatures(nets)
    real_f, real_c = [], []
    gen_f: dict[str, list] = {m: [] for m in modes}
    gen_c: dict[str, list] = {m: [] for m in modes}
    per_mode: dict[str, list[dict]] = {m: [] for m in modes}
    bar = tqdm(total=clips * len(modes), desc="longform", disable=not progress)
    for i in range(clips):
        spec, real, audio, gt = make_clip("heldout", i, seed, seconds, size=avatar.cfg.codec.height)
        ref = reference_frame(spec, avatar.cfg.codec.height)
        real_f.append(extractor.frames(real))
        real_c.append(extractor.clips(real))
        # the shuffled-audio baseline: driven by another held-out clip's speech, scored against this clip's
        other = make_clip("heldout", clips + i, seed, seconds)[2] if "shuffled" in modes else None
        for m in modes:
            drive = other if m == "shuffled" else audio
            video, fps = _run(avatar, m, ref, drive, seed=i)
            res = evaluate_video(nets, video, audio, ref, gt)  # always scored against the clip's own speech
            res.update(fps=fps, clip=spec.name, mode=m)
            gen_f[m].append(extractor.frames(video))
            gen_c[m].append(extractor.clips(video))
            per_mode[m].append(res)
            bar.update(1)
    bar.close()
    summary = {m: {k: float(np.mean([r[k] for r in rs if k in r])) for k in SCALARS if any(k in r for r in rs)}
               for m, rs in per_mode.items()}
    for m in modes:  # distribution distances against the real held-out renders of the same clips
        summary[m]["fid"] = frechet_distance(np.concatenate(gen_f[m]), np.concatenate(real_f))
        summary[m]["fvd"] = frechet_distance(np.concatenate(gen_c[m]), np.concatenate(real_c))
    curves = {m: {k: np.mean([r["curves"][k] for r in rs], axis=0).tolist() for k in rs[0]["curves"]}
              for m, rs in per_mode.items()}
    result = {"model": str(model), "clips": clips, "frames": frames, "seed": seed, "modes": modes,
              "feature_extractors": {"sync": "corpus-trained SyncNet-style (assets/eval)",
                                     "fid_fvd": extractor.name,
                                     "lipsync": "corpus-trained mouth reader",
                                     "identity": "corpus-trained IdentityNet"},
              "summary": summary, "curves_per_second": curves,
              "clips_detail": {m: [{k: v for k, v in r.items() if k != "curves"} for r in rs]
                               for m, rs in per_mode.items()}}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    if report_dir:
        write_report(result, Path(report_dir))
    return result


def markdown_table(result: dict) -> str:
    cols = [c for c in SCALARS if any(c in s for s in result["summary"].values())]
    lines = ["| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, s in result["summary"].items():
        lines.append(f"| {m} | " + " | ".join(f"{s.get(c, float('nan')):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def write_report(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Long-form benchmark: {result['model']}",
          f"{result['clips']} held-out clips x {result['frames']} frames (seed {result['seed']}); "
          f"extractors: {result['feature_extractors']}", "", markdown_table(result), ""]
    keys = list(next(iter(result["curves_per_second"].values())).keys())
    for k in keys:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for m, c in result["curves_per_second"].items():
            ax.plot(np.arange(len(c[k])), c[k], label=m)
        ax.set_xlabel("second")
        ax.set_ylabel(k.replace("_", " "))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{k}.png", dpi=110)
        plt.close(fig)
        md.append(f"![{k}]({k}.png)")
    (out / "report.md").write_text("\n".join(md) + "\n")

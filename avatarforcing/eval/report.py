"""What a long-form result holds and how it is shown: its score columns and their names, the markdown table
(means with intervals, exclusions, paired differences, the real split) and the per-second plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import stats

SCALARS = ["lipsync_r", "viseme_acc", "viseme_majority", "sync_c", "sync_d", "lse_c", "lse_d", "loudness_r",
           "identity_drift_end",
           "identity_drift_first_minute", "colour_drift_face_end", "colour_drift_background_end", "flicker_end",
           "flicker_vs_real", "fid", "fvd", "fps"]
PER_CLIP = [k for k in SCALARS if k not in ("fid", "fvd", "fps")]  # means over clips, with bootstrap intervals
# how the tables name the scores: the corpus SyncNet's are not the published LSE-C / LSE-D (docs/evaluation.md)
NAMES = {"flicker_vs_real": "flicker vs real", "flicker_end": "flicker (end)",
         "identity_drift_end": "identity drift (end)", "identity_drift_first_minute": "identity drift (1st min)",
         "colour_drift_face_end": "colour drift face (end)", "colour_drift_background_end": "colour drift bg (end)",
         "lipsync_r": "lip-sync r", "viseme_acc": "viseme acc", "viseme_majority": "viseme majority",
         "sync_c": "Sync-C*", "sync_d": "Sync-D*",
         "lse_c": "LSE-C", "lse_d": "LSE-D", "loudness_r": "loudness r", "fid": "FID*", "fvd": "FVD*"}


def markdown_table(result: dict) -> str:
    """Means over clips with their 95% bootstrap interval where there is one ([lo, hi] after the mean), then
    the paired differences against the baseline mode (the comparisons to draw conclusions from)."""
    cols = [c for c in SCALARS if any(c in s for s in result["summary"].values())]
    lines = ["| mode | " + " | ".join(NAMES.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, s in result["summary"].items():
        cells = []
        for c in cols:
            lo_hi = s.get("ci95", {}).get(c)
            cell = f"{s.get(c, float('nan')):.3f}"
            cells.append(cell + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi and result["clips"] > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    excluded = {m: s["excluded"] for m, s in result["summary"].items() if s.get("excluded")}
    if excluded:
        lines += ["", "Excluded from the means: " + "; ".join(
            f"{m}: {k} on {e['clips']} clip(s) ({e['why']})" for m, ex in excluded.items() for k, e in ex.items())]
    if result.get("paired"):
        lines += ["", f"Paired differences against `{result['paired_baseline']}` (same clips and seeds; mean "
                      "[95% bootstrap interval over clips]; * where the interval excludes 0):", "",
                  stats.paired_markdown(result["paired"], result["paired_baseline"],
                                        [k for k in (*PER_CLIP, "fid", "fvd") if k != "viseme_majority"], NAMES)]
    split = {k: v["real_split"] for k, v in result.get("frechet", {}).items() if v.get("real_split") is not None}
    if split:
        lines += ["", "Real vs real (the first half of every clip's real render against the second: a perfect "
                      "generator's distance, at half the frames): "
                  + ", ".join(f"{NAMES[k]} {v:.3f}" for k, v in split.items())]
    lines += ["", "Drift and flicker count only clips whose lip sync beats its time-shifted floor (a still video "
                  "scores best on them); flicker vs real: 1 = the real render's frame-to-frame change.",
              "Sync-C* / Sync-D*: the corpus-trained SyncNet with unit-norm embeddings (distances 0-2), not "
              "comparable with published LSE-C / LSE-D; FID* / FVD*: corpus-trained extractors "
              f"({result['feature_extractors'].get('fid', '')}; {result['feature_extractors'].get('fvd', '')})."]
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

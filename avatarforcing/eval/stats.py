"""Statistics that claim no more than they show.

* ``pearson``: r of two series, 0 (never NaN) when either is constant: a mouth that does not move scores no
  correlation rather than dropping out of a mean.
* ``clip_summary``: means over clips with 95% percentile-bootstrap intervals, and what was excluded and why.
* ``paired``: every comparison between modes is paired (the same clips and seeds in every mode): the mean
  per-clip difference against a named baseline, with its 95% bootstrap interval over clips resampled jointly.
  An interval that excludes 0 is a difference; two marginal intervals that overlap are not evidence of
  "no difference".
* ``permutation_p``: the p-value of an observed statistic against its values under circular shifts
  (``(1 + #null >= observed) / (1 + n)``; n >= 99 so that p can reach 0.01).
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000


def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:  # constant (exactly: std may round to 1e-17)
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ci(values: np.ndarray, rng: np.random.Generator, resamples: int) -> list[float]:
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


Gates = dict[str, tuple[str, str]]  # score -> (a per-clip flag that must be true for it to count, why)


def _counts(d: dict, k: str, gates: Gates | None) -> bool:
    return not gates or k not in gates or bool(d.get(gates[k][0], False))


def clip_summary(details: list[dict], keys: list[str], resamples: int = RESAMPLES, seed: int = 0,
                 gates: Gates | None = None) -> dict:
    """Mean over clips of every per-clip score in ``keys`` (``ci95``: {score: [lo, hi]}, percentile bootstrap
    over clips, fixed seed); ``excluded``: {score: {"clips": n, "why": ...}} for clips without a finite value,
    or whose flag in ``gates`` is not true (``gates``: {score: (flag, why)})."""
    out: dict = {}
    ci: dict = {}
    excluded: dict = {}
    rng = np.random.default_rng(seed)
    for k in keys:
        have = [d for d in details if k in d]
        gated = [d for d in have if _counts(d, k, gates)]
        v = np.array([d[k] for d in gated if d[k] is not None and np.isfinite(d[k])], dtype=float)
        why = [(n, text) for n, text in ((len(have) - len(gated), gates[k][1] if gates and k in gates else ""),
                                         (len(gated) - len(v), "not a finite number (NaN or infinite)")) if n]
        if why:
            excluded[k] = {"clips": len(have) - len(v),
                           "why": why[0][1] if len(why) == 1 else "; ".join(f"{n} clip(s): {t}" for n, t in why)}
        if not len(v):
            continue
        out[k] = float(v.mean())
        ci[k] = _ci(v, rng, resamples)
    out["ci95"] = ci
    if excluded:
        out["excluded"] = excluded
    return out


def paired(details: dict[str, list[dict]], baseline: str, keys: list[str], resamples: int = RESAMPLES,
           seed: int = 0, gates: Gates | None = None) -> dict:
    """{mode: {score: {"diff": mean(mode - baseline), "ci95": [lo, hi], "clips": n}}} over the clips both
    modes scored (matched by ``clip``; with ``gates``, only clips that count in both), for every mode but the
    baseline."""
    if baseline not in details:
        return {}
    base = {d["clip"]: d for d in details[baseline]}
    rng = np.random.default_rng(seed)
    out: dict = {}
    for mode, rows in details.items():
        if mode == baseline:
            continue
        res = {}
        for k in keys:
            diffs = np.array([d[k] - base[d["clip"]][k] for d in rows
                              if d.get("clip") in base and k in d and k in base[d["clip"]]
                              and _counts(d, k, gates) and _counts(base[d["clip"]], k, gates)
                              and np.isfinite(d[k]) and np.isfinite(base[d["clip"]][k])], dtype=float)
            if len(diffs):
                res[k] = {"diff": float(diffs.mean()), "ci95": _ci(diffs, rng, resamples), "clips": int(len(diffs))}
        out[mode] = res
    return out


def permutation_p(observed: float, null: list[float] | np.ndarray) -> float:
    null = np.asarray(null, float)
    return float((1 + (null >= observed).sum()) / (1 + len(null)))


def paired_markdown(pairs: dict, baseline: str, keys: list[str], names: dict[str, str] | None = None) -> str:
    """The paired differences as a table: mean [95% interval]; a star where the interval excludes 0."""
    names = names or {}
    cols = [k for k in keys if any(k in r for r in pairs.values())]
    lines = [f"| mode - {baseline} | " + " | ".join(names.get(c, c) for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for mode, res in pairs.items():
        cells = []
        for c in cols:
            if c not in res:
                cells.append("")
                continue
            lo, hi = res[c]["ci95"]
            star = " *" if lo > 0 or hi < 0 else ""
            cells.append(f"{res[c]['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

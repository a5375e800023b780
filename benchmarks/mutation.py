"""Mutation testing of the core, one module group at a time against its own tests (mutmut 3).

    .venv/bin/pip install mutmut==3.8.1
    .venv/bin/python benchmarks/mutation.py [--groups stream,lora,...] [--out benchmarks/results/mutation.json]

Each group is copied into ``out/mutation/<group>/`` (the package and tests, nothing else), mutmut mutates the
group's files there and runs, for every mutant of the group's functions, only the tests of that group that
executed the mutated function. A mutant is *killed* when a test fails (or times out), *survived* otherwise;
a survivor listed in ``benchmarks/mutation_equivalent.json`` with its reason counts as *equivalent* (it
changes no behaviour: e.g. a default argument every caller passes). The kill rate is
killed / (killed + survived). Not part of ``make test``: about 50 minutes for all groups on 2 cores (half of
it the training group, whose load/state mutants each run the 2-process test).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# group -> files mutmut may mutate, the functions whose mutants count (fnmatch on mutmut's names), the tests
GROUPS = {
    "stream": {
        "files": ["avatarforcing/stream/window.py", "avatarforcing/stream/positions.py",
                  "avatarforcing/stream/kv.py", "avatarforcing/stream/schedule.py"],
        "functions": ["avatarforcing.stream.*"],
        "tests": ["tests/test_sampler_reference.py", "tests/test_positions.py", "tests/test_stream.py"],
    },
    "lora": {
        "files": ["avatarforcing/checkpoints.py"],
        "functions": ["avatarforcing.checkpoints.x_merge_lora__*", "avatarforcing.checkpoints.x__generator__*",
                      "avatarforcing.checkpoints.x_omniavatar_state_dict__*"],
        "tests": ["tests/test_checkpoints.py"],
    },
    "vae_stream": {
        "files": ["avatarforcing/codecs/vae.py"],
        "functions": ["avatarforcing.codecs.vae.xǁMiniVAEǁdecode*", "avatarforcing.codecs.vae.xǁMiniVAEǁ_denorm*",
                      "avatarforcing.codecs.vae.xǁMiniStreamingDecoderǁ*"],
        "tests": ["tests/test_codecs.py"],
    },
    "serve_admission": {
        "files": ["avatarforcing/serve/admission.py"],
        "functions": ["avatarforcing.serve.admission.*"],
        "tests": ["tests/test_serve_admission.py", "tests/test_serve.py", "tests/test_serve_hardening.py"],
    },
    "train_resume": {
        "files": ["avatarforcing/train/loop.py"],
        "functions": ["avatarforcing.train.loop.xǁTrainerǁstate__*", "avatarforcing.train.loop.xǁTrainerǁload__*",
                      "avatarforcing.train.loop.xǁTrainerǁsave__*", "avatarforcing.train.loop.xǁTrainerǁ__init____*",
                      "avatarforcing.train.loop.xǁEMAǁ*", "avatarforcing.train.loop.x_step_generator__*"],
        "tests": ["tests/test_train.py"],
    },
    "eval_intervals": {
        "files": ["avatarforcing/eval/longform.py"],
        "functions": ["avatarforcing.eval.longform.x_clip_summary__*"],
        "tests": ["tests/test_eval_intervals.py", "tests/test_eval.py"],
    },
}


def setup_cfg(group: dict) -> str:
    # forkserver: torch's thread pool is not fork-safe (children forked from a process that ran the suite hang)
    lines = ["[mutmut]", "source_paths = avatarforcing", "process_isolation = forkserver", "only_mutate ="]
    lines += [f"    {f}" for f in group["files"]]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in group["tests"]]
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -q"]
    return "\n".join(lines) + "\n"


def statuses(work: Path) -> dict[str, str]:
    """mutant name -> mutmut's status, from ``mutmut results --all true``."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=True).stdout
    return {m[1]: m[2] for m in re.finditer(r"^\s*(\S+): (.+?)\s*$", out, re.M)}


def run_group(name: str, group: dict, children: int, recount: bool = False) -> dict:
    work = ROOT / "out" / "mutation" / name
    if recount:  # re-read the last run's statuses (after editing mutation_equivalent.json), run nothing
        return count(name, group, work, None)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "avatarforcing", work / "avatarforcing", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    (work / "setup.cfg").write_text(setup_cfg(group))
    (work / "mutants").mkdir()  # exists before Python starts, so the PYTHONPATH entry below is searched
    # one thread per mutant child; processes the tests spawn (the 2-process training test) import the mutants too
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(work / "mutants"))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *group["functions"]],
                   cwd=work, env=env, check=False)
    return count(name, group, work, round(time.time() - t0))


def count(name: str, group: dict, work: Path, seconds: int | None) -> dict:
    every = statuses(work)
    counted = {m: s for m, s in every.items() if any(fnmatch.fnmatchcase(m, p) for p in group["functions"])}
    equivalent = json.loads((ROOT / "benchmarks" / "mutation_equivalent.json").read_text()).get(name, {})
    rows = {"killed": [], "survived": [], "equivalent": [], "other": []}
    for m, s in sorted(counted.items()):
        if s in ("killed", "timeout", "segfault"):
            rows["killed"].append(m)
        elif s in ("survived", "no tests"):
            rows["equivalent" if m in equivalent else "survived"].append(m)
        else:  # skipped, suspicious, not checked: reported, not counted
            rows["other"].append(f"{m}: {s}")
    k, s = len(rows["killed"]), len(rows["survived"])
    return {"files": group["files"], "functions": group["functions"], "tests": group["tests"],
            "killed": k, "survived": s, "equivalent": len(rows["equivalent"]),
            "kill_rate": round(k / max(k + s, 1), 3), "seconds": seconds,
            "survivors": rows["survived"], "equivalents": {m: equivalent[m] for m in rows["equivalent"]},
            "not_counted": rows["other"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation.json"))
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--recount", action="store_true", help="recount the last run (equivalents edited), run nothing")
    args = ap.parse_args()
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.exists() else {}
    for name in args.groups.split(","):
        seconds = report.get(name, {}).get("seconds")
        report[name] = run_group(name, GROUPS[name], args.children, args.recount)
        if args.recount:
            report[name]["seconds"] = seconds
        r = report[name]
        print(f"{name}: killed {r['killed']}, survived {r['survived']}, equivalent {r['equivalent']}, "
              f"kill rate {r['kill_rate']:.1%} ({r['seconds']} s)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")  # after each group: a long run keeps what it did
    total = {k: sum(report[g][k] for g in report if g in GROUPS) for k in ("killed", "survived", "equivalent")}
    print(f"all: {total}, kill rate {total['killed'] / max(total['killed'] + total['survived'], 1):.1%}")


if __name__ == "__main__":
    main()

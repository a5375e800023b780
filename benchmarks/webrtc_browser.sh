#!/usr/bin/env bash
# What a browser receives over WebRTC, over several runs: tests/test_webrtc.py's browser test (headless Chromium,
# fake media devices; the server in-process with --compute-threads 1) run RUNS times, each run's report kept, then
# summarised: per speech onset (a typed sentence, then the fake microphone) the A/V offset (mouth opening vs
# voice onset as presented, less the same measure on the frames the server made), the interrupt's latency to
# silence, the presented frame rate. Usage: benchmarks/webrtc_browser.sh [RUNS] (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
OUT=benchmarks/results/webrtc_browser_cpu.json
TMP=$(mktemp -d)
for i in $(seq 1 "$RUNS"); do
  AVATARFORCING_WEBRTC_REPORT="$TMP/run$i.json" .venv/bin/python -m pytest -q -x tests/test_webrtc.py \
    -k browser -p no:cacheprovider >/dev/null || echo "run $i failed"
done
.venv/bin/python - "$TMP" "$OUT" "$RUNS" <<'PY'
import json, sys, pathlib, platform
import numpy as np
tmp, out, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
reports = [json.loads(p.read_text()) for p in sorted(tmp.glob("run*.json"))]
av = [e["av_offset_ms"] for r in reports for e in r["events"]]
stop = [r["interrupt_to_silence_ms"] for r in reports]
summary = {"command": f"benchmarks/webrtc_browser.sh {runs}", "machine": f"cpu, {platform.processor() or platform.machine()}",
           "runs": len(reports), "runs_failed": runs - len(reports),
           "av_offset_ms": {"events": len(av), "median": float(np.median(av)), "mean_abs": float(np.mean(np.abs(av))),
                            "min": min(av), "max": max(av), "within_40ms": int(sum(abs(x) <= 40 for x in av))},
           "interrupt_to_silence_ms": {"median": float(np.median(stop)), "max": max(stop)},
           "video_fps_presented": [r["video_fps"] for r in reports],
           "server_slipped_ms": [r.get("server_slipped_ms") for r in reports], "reports": reports}
out.write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "reports"}, indent=1))
PY

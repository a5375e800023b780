#!/usr/bin/env bash
# Issue 18 on a lent H100/H200 in one device call (~9 minutes): a corpus of espeak-ng + flite voices made
# there, then `avatarforcing train robust` from the shipped mini (decoder fine-tune, heard rows, ODE + DMD with
# the student on microphone-augmented speech through the listener). Writes $OUT/mini/ (the model folder),
# $OUT/logs.tar.gz and $OUT/log.txt.
#
#   run(command="bash benchmarks/gpu_robust.sh", carry=[".gpu"], timeout_s=570)
#
# .gpu/ (git-ignored) holds what the GPU image lacks: the wheels espeakng-loader, soundfile, cffi, pycparser
# (`pip download --no-deps --python-version 3.12 ...`, device README) and flite.tar.xz (Debian's libflite.so.1,
# cmulex, usenglish, the cmu_us_{kal,kal16,awb,rms,slt} voices and libasound.so.2, dereferenced).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-540}; CLIPS=${CLIPS:-400}; HELD=${HELD:-16}; DEVICE=${DEVICE:-cuda}; WORK=${WORK:-/tmp/robust}
CONFIG=${CONFIG:-benchmarks/robust_gpu.yaml}
T0=$(date +%s)
exec > >(tee "$OUT/log.txt") 2>&1
. benchmarks/gpu_env.sh
synth_corpus $WORK/c train $CLIPS 21 16
synth_corpus $WORK/c heldout $HELD 22 16
# the DMD stage gets what is left of the limit after the other stages (~250 s measured on an H200 + margin)
SPENT=$(( $(date +%s) - T0 ))
python3 - "$CONFIG" "$SPENT" "$LIMIT" > $WORK/robust.yaml <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
spent, limit = int(sys.argv[2]), int(sys.argv[3])
m = cfg["recipe"]["stage_minutes"]
fixed = 60 * (m["decoder"] + m["ode"]) + 110  # latents, heard rows, ODE trajectories, PSNR, export, start-ups
m["dmd"] = round(max(0.3, min(m["dmd"], (limit - spent - fixed) / 60)), 2)
print(yaml.safe_dump(cfg), end="")
print(f"spent {spent} s: dmd gets {m['dmd']} min", file=sys.stderr)
PY
$AF train robust --model mini --corpus $WORK/c --out $WORK/r --device $DEVICE --config $WORK/robust.yaml \
    --export "$OUT/mini" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -40
(cd $WORK/r && tar czf "$OUT/logs.tar.gz" *.jsonl *.done robust.json 2>/dev/null)
cp $WORK/c/corpus.json "$OUT/corpus.json" 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"; ls -la "$OUT" "$OUT/mini"

#!/usr/bin/env bash
# Does a wider latent lift the codec's ceiling on lip sync? (issue 18's follow-up; prepared, not yet run.)
# On a lent H100/H200: a corpus of espeak-ng + flite voices made there; the whole mini recipe with 16 latent
# channels (benchmarks/mini_wide.yaml); the VAE stage alone with 8 (the shipped design) on the same corpus and
# budget as the control; then the long-form benchmark's avatarforcing / codec / real rows for the wide model.
# Compare with benchmarks/results/robust_codec_ceiling_16x400.json (the shipped mini's rows).
#
#   run(command="bash benchmarks/gpu_mini_wide.sh", carry=[".gpu"], timeout_s=590)
#   # ~10 min on an H200 (corpus 75 s, recipe stages 5.2 min + overheads, control VAE 1.5 min, long-form ~1 min);
#   # if the limit cuts it, the same command again on the warm machine continues: every step resumes
#   # (the corpus is kept, the recipe's stages and the control's checkpoints resume, /tmp survives)
#
# Writes $OUT/log.txt, $OUT/vae8.json, $OUT/vae16.json (held-out PSNR of each VAE), $OUT/mini-wide/ (the model
# folder) and $OUT/longform.json. .gpu/ as for gpu_robust.sh. A CPU dry run of the whole path:
#   OUT=/tmp/o DEVICE=cpu CLIPS=2 HELD=1 SECONDS_PER_CLIP=4 SMOKE=--smoke LF="--clips 1 --frames 50" \
#       PY=.venv/bin/python bash benchmarks/gpu_mini_wide.sh   (PY set: the .gpu wheels, built for the GPU
#       image's Python 3.12, are not installed)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CLIPS=${CLIPS:-400}; HELD=${HELD:-16}; SECONDS_PER_CLIP=${SECONDS_PER_CLIP:-16}; DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/wide}; SMOKE=${SMOKE:-}
RECIPE=${RECIPE:-benchmarks/mini_gpu_recipe.yaml}; LF=${LF:---clips 16 --frames 400 --batch 16 --workers 8}
T0=$(date +%s)
exec > >(tee -a "$OUT/log.txt") 2>&1
. benchmarks/gpu_env.sh
CFG="--config $RECIPE"; [ -n "$SMOKE" ] && CFG=$SMOKE
quiet() { tr '\r' '\n' | grep -v "it/s\|s/it" | tail -${1:-6}; }
for split in "train $CLIPS 31" "heldout $HELD 32"; do  # each step resumes: a second call continues the first
  set -- $split
  ls -d $WORK/c/shards/$1-* >/dev/null 2>&1 || synth_corpus $WORK/c $1 $2 $3 $SECONDS_PER_CLIP
done
echo "corpus $(( $(date +%s) - T0 )) s"
$AF train recipe --model-config benchmarks/mini_wide.yaml --corpus $WORK/c --out $WORK/r16 --device $DEVICE \
    $CFG --export "$OUT/mini-wide" 2>&1 | quiet 12
cp $WORK/r16/vae.done "$OUT/vae16.json"
(cd $WORK/r16 && tar czf "$OUT/logs.tar.gz" *.jsonl *.done model_config.yaml 2>/dev/null)
echo "16 channels trained $(( $(date +%s) - T0 )) s"
$AF train vae --corpus $WORK/c --out $WORK/r8 --device $DEVICE $CFG 2>&1 | quiet 2  # the control: 8 channels
cp $WORK/r8/vae.done "$OUT/vae8.json"
echo "8 channels: $(cat $OUT/vae8.json)"; echo "16 channels: $(cat $OUT/vae16.json)"
$AF eval longform --model "$OUT/mini-wide" $LF --modes avatarforcing,codec,real --device $DEVICE \
    --json "$OUT/longform.json" 2>&1 | quiet 3
$PY - "$OUT/longform.json" <<'EOF_PY'
import json, sys
r = json.load(open(sys.argv[1]))
for m, s in r["summary"].items():
    print(m, {k: round(s[k], 3) for k in ("lipsync_r", "viseme_acc", "sync_c", "loudness_r") if k in s})
EOF_PY
echo "total $(( $(date +%s) - T0 )) s"; ls -la "$OUT"

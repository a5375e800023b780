#!/usr/bin/env bash
# The 400-clip long-form benchmark of the shipped mini model on a lent GPU (device tool), in one call:
# espeak-ng unpacked from the Debian packages carried in .debs/ (held-out clips are synthesised on the fly
# by worker processes), then `avatarforcing eval longform` with 50 clips per engine run on the GPU.
# The JSON is rewritten after every batch, so a run cut short by the time limit still reports the clips
# it finished. Usage: bash benchmarks/gpu_longform.sh   (writes $OUT/longform_mini_400x400.json + report)
# Knobs (env): CLIPS (400), FIRST (0: resume a cut run at that clip, writes ..._from<FIRST>.json), FRAMES (400), BATCH (50), WORKERS (14), DEVICE (cuda), MODES, DEADLINE_MIN (6.5)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=/tmp/esp; mkdir -p $D
for f in .debs/*.deb; do dpkg -x "$f" $D; done
cp .debs/libpcaudio.so.0 $D/usr/lib/x86_64-linux-gnu/
L=$D/usr/lib/x86_64-linux-gnu
export ESPEAK_NG_LIB=$L/libespeak-ng.so.1 ESPEAK_DATA_PATH=$L LD_LIBRARY_PATH=$L PYTHONPATH=$PWD PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
nproc
time python3 -m avatarforcing.cli eval longform --model mini --clips "${CLIPS:-400}" --first "${FIRST:-0}" --frames "${FRAMES:-400}" \
    --modes "${MODES:-avatarforcing,teacher,shuffled,ar}" --batch "${BATCH:-50}" --workers "${WORKERS:-14}" \
    --device "${DEVICE:-cuda}" --deadline-min "${DEADLINE_MIN:-6.5}" \
    --json "$OUT/longform_mini_400x400${FIRST:+_from$FIRST}.json" --report "$OUT/longform_400x400${FIRST:+_from$FIRST}" 2>&1 | tr '\r' '\n' | grep -v "it/s]\|s/it]$" | tail -25
ls -la "$OUT"

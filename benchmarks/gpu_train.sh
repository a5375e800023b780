#!/usr/bin/env bash
# The mini recipe on a lent GPU, end to end in ~7 minutes: corpus synthesis (espeak-ng unpacked from the
# Debian packages carried in .debs/, with a no-op libpcaudio stub), then `avatarforcing train recipe`.
# Usage (device tool): bash benchmarks/gpu_train.sh  (writes $OUT/mini/ and $OUT/logs.tar.gz)
set -u
D=/tmp/esp; mkdir -p $D
for f in .debs/*.deb; do dpkg -x "$f" $D; done
cp .debs/libpcaudio.so.0 $D/usr/lib/x86_64-linux-gnu/
L=$D/usr/lib/x86_64-linux-gnu
export ESPEAK_NG_LIB=$L/libespeak-ng.so.1 ESPEAK_DATA_PATH=$L LD_LIBRARY_PATH=$L PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
AF="python3 -m avatarforcing.cli"
$AF data synth --out /tmp/c --clips 400 --seconds 16 --split train --seed 0 --workers 16 --shards-only 2>&1 | tail -1
$AF data synth --out /tmp/c --clips 16 --seconds 16 --split heldout --seed 1234 --workers 16 --shards-only 2>&1 | tail -1
$AF train recipe --corpus /tmp/c --out /tmp/r --device cuda --config benchmarks/mini_gpu_recipe.yaml \
    --export $OUT/mini 2>&1 | grep -v "it/s\]\|s/it\]" | tail -20
(cd /tmp/r && tar czf $OUT/logs.tar.gz *.jsonl *.done *.json 2>/dev/null)
ls -la $OUT $OUT/mini

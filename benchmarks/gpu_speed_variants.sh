#!/usr/bin/env bash
# Issue 15 on a lent H100/H200, in one device call (about 9 minutes): every engine variant of model/fast.py
# against eager on the same card, inputs and noise, then a second process for the warm start (inductor's
# on-disk cache filled by the first), then mini's trained weights for the FP8 tolerance.
#
#   run(command="bash benchmarks/gpu_speed_variants.sh", carry=[".whl"], timeout_s=600)
#
# .whl/ holds the diffusers wheel the GPU image lacks (`pip download --no-deps -d .whl diffusers==0.42.1`).
# Every JSON is rewritten after each variant, so a run cut short keeps what finished. Results: $OUT/*.json.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$OUT/card.txt"
FRAMES=${FRAMES:-240}  # 60 blocks of 4 latent frames: 57 full-window steps per variant

# 1. cold: eager, compiled, CUDA graphs, FP8 (+graphs) on wan-1.3b, random weights, bf16, 832x480
time timeout 330 python3 -m avatarforcing.cli bench speed --model wan-1.3b --device cuda --dtype bf16 \
    --frames "$FRAMES" --variants "${VARIANTS:-eager,compiled,graphs,fp8+graphs}" \
    --json "$OUT/wan_variants_cold.json" 2>&1 | tr '\r' '\n' | grep -v "it/s]\|s/it]$" | tail -3
# 2. warm start: a new process, the compile cache from 1 on disk
time timeout 150 python3 -m avatarforcing.cli bench speed --model wan-1.3b --device cuda --dtype bf16 \
    --frames 80 --variants eager,graphs --json "$OUT/wan_variants_warm.json" 2>&1 | tail -3
# 3. mini, trained weights: the variants' difference from eager where it means something
time timeout 90 python3 -m avatarforcing.cli bench speed --model mini --weights mini --device cuda \
    --dtype bf16 --frames 400 --variants eager,compiled,graphs,fp8,fp8+graphs \
    --json "$OUT/mini_variants.json" 2>&1 | tail -3
python3 - "$OUT" <<'EOF'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*variants*.json")):
    rows = json.load(open(f))
    for r in rows if isinstance(rows, list) else [rows]:
        print(f.split("/")[-1], r["variant"], "ms/frame %.1f (DiT %.1f VAE %.1f) p95 %.0f startup %.0f s rel-rms %.4f"
              % (r["ms_per_frame"], r["dit_ms_per_frame"], r["vae_ms_per_frame"], r["step_ms_p95"],
                 r["startup_s"], r["latents_rel_rms_diff"]))
EOF

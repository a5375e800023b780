"""The GPU benchmark run for a lent H100/H200 (see benchmarks/README.md). Random weights, bf16.

    python benchmarks/gpu_bench.py OUT_DIR [frames]
"""

import json
import sys
import time

import torch

from avatarforcing.config import preset
from avatarforcing.eval.bench import build, run_codec, run_speed

out = sys.argv[1]
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 1600
dev, dt = torch.device("cuda"), torch.bfloat16
cfg = preset("wan-1.3b")
t0 = time.time()
model, vae = build(cfg, dev, dt)
print(f"built wan-1.3b + Wan VAE in {time.time() - t0:.1f}s", flush=True)
results = []
for mode, n in (("avatarforcing", frames), ("ar", frames // 2)):
    r = run_speed(cfg, n, dev, dt, model, vae, mode=mode, progress=False)
    print(json.dumps(r), flush=True)
    results.append(r)
    json.dump(results, open(f"{out}/wan_speed.json", "w"), indent=2)
c = run_codec(cfg, dev, dt, latents=24)
print(json.dumps(c), flush=True)
json.dump({"speed": results, "codec": c}, open(f"{out}/wan_speed.json", "w"), indent=2)

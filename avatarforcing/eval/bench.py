"""Speed benchmarks: ``avatarforcing bench speed`` and ``avatarforcing bench codec``. Random weights.

``speed`` drives the real engine (window sampler + streaming VAE decoder) step by step and reports
per-step times (DiT and VAE separately), steady-state ms/frame, memory over the run, the algorithmic
look-ahead and the compute latency to the first frame. Several window variants run in one call.
"""

from __future__ import annotations

import json
import platform
import resource
import time

import numpy as np
import torch
from tqdm import tqdm

from ..codecs.vae import MiniVAE
from ..config import Config, preset
from ..model import AvatarDiT
from ..stream.window import WindowSampler


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem_mb(device) -> float:
    """Memory in use now: allocated GPU memory, or this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_vae(cfg: Config, device: torch.device, dtype: torch.dtype):
    if cfg.codec.vae == "mini":
        return MiniVAE(cfg.model.latent_channels, cfg.codec.vae_base_dim).to(device, dtype).eval()
    from diffusers import AutoencoderKLWan

    from ..codecs.wan_vae import WanVAE

    return WanVAE(AutoencoderKLWan().to(device, dtype))


def build(cfg: Config, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    return AvatarDiT(cfg.model).to(device, dtype).eval(), build_vae(cfg, device, dtype)


@torch.no_grad()
def run_speed(cfg: Config, frames: int, device: torch.device, dtype: torch.dtype, model=None, vae=None,
              mode: str = "avatarforcing", progress: bool = True, keep_latents: int = 0) -> dict:
    """One streamed run; ``keep_latents`` > 0 also returns the first emitted latent blocks (``latents``) to
    compare variants on the same inputs and noise."""
    model, vae = (model, vae) if model is not None else build(cfg, device, dtype)
    s, c = cfg.stream, cfg.codec
    h, w = c.latent_hw
    inputs = torch.Generator().manual_seed(1)  # the same inputs for every run (variants are compared on them)

    def randn(*shape):
        return torch.randn(*shape, generator=inputs).to(device, dtype)

    ref = randn(1, cfg.model.latent_channels, 1, h, w)
    context = randn(1, cfg.model.text_len, cfg.model.text_dim) if cfg.model.text_dim else None
    kw = dict(window_blocks=1, denoising_steps=(s.num_train_timesteps,)) if mode == "ar" else {}
    sampler = WindowSampler(model, cfg, ref, torch.Generator().manual_seed(0), context=context, **kw)
    decoder = vae.stream_decoder()
    decoder.decode(ref)
    fpb = s.block_frames * c.temporal_stride
    n_blocks = -(-frames // fpb)
    audio = randn(1, s.block_frames, cfg.model.audio_pack, cfg.model.audio_dim)
    dit_ms, vae_ms, mem = [], [], []
    first_frame_ms = None
    t_start = time.perf_counter()
    out_frames = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = range(n_blocks + sampler.L - 1)
    kept: list[torch.Tensor] = []
    for i in tqdm(steps, desc=f"{cfg.name} {mode}", disable=not progress):
        _sync(device)
        t0 = time.perf_counter()
        latents = sampler.push(audio) if i < n_blocks else sampler._step()
        _sync(device)
        t1 = time.perf_counter()
        kept += [z.float().cpu() for z in latents][: max(0, keep_latents - len(kept))]
        for z in latents:
            x = decoder.decode(z)
            out_frames += x.shape[2]
        _sync(device)
        t2 = time.perf_counter()
        dit_ms.append(1000 * (t1 - t0))
        vae_ms.append(1000 * (t2 - t1))
        if latents and first_frame_ms is None:
            first_frame_ms = 1000 * (t2 - t_start)
        mem.append(_mem_mb(device))
    total_s = time.perf_counter() - t_start
    # full-window steps (warm-up and drain excluded), when the run is long enough to have them
    steady = slice(sampler.L - 1, n_blocks) if n_blocks > sampler.L - 1 else slice(0, len(dit_ms))
    step_ms = np.array(dit_ms) + np.array(vae_ms)
    per_frame = float(np.median(step_ms[steady])) / fpb
    res = {
        "model": cfg.name, "mode": mode, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "resolution": f"{c.width}x{c.height}", "B": s.block_frames, "L": sampler.L, "N": s.passes,
        "frames": out_frames, "wall_s": total_s,
        "ms_per_frame": per_frame, "fps": 1000.0 / per_frame,
        "fps_overall": out_frames / total_s,
        "dit_ms_per_frame": float(np.median(np.array(dit_ms)[steady])) / fpb,
        "vae_ms_per_frame": float(np.median(np.array(vae_ms)[steady])) / fpb,
        "step_ms_p50": float(np.median(step_ms[steady])),
        "step_ms_p95": float(np.percentile(step_ms[steady], 95)),
        "step_ms_first100": float(np.median(step_ms[steady][:100])),
        "step_ms_last100": float(np.median(step_ms[steady][-100:])),
        "first_frame_latency_ms": first_frame_ms,
        "lookahead_ms": 1000.0 * (sampler.L * fpb * c.samples_per_frame) / c.sample_rate,
        "peak_mem_mb": _peak_mb(device), "mem_mb_first100": float(np.median(mem[:100])),
        "mem_mb_last100": float(np.median(mem[-100:])),
        "kv_buffer_mb": sampler.kv.nbytes() / 2**20,
    }
    if first_frame_ms is not None:  # compute to the first frame: the first L steps (warm-up) + decode
        res["first_frame_latency_ms"] = float(sum(step_ms[: sampler.L]))
    if keep_latents:
        res["latents"] = torch.cat(kept, dim=2) if kept else None
    return res


def compare_variants(cfg: Config, frames: int, device: torch.device, dtype: torch.dtype, variants: list[str],
                     progress: bool = True, keep_latents: int = 8, weights: str | None = None,
                     on_result=None) -> list[dict]:
    """Every engine variant in this process on the same card, inputs and noise: speed (``run_speed``),
    start-up (the first window step, which pays compilation), and the max / rms difference of its first
    ``keep_latents`` emitted latent blocks from eager's. ``weights``: a model folder (or shipped name) whose
    trained DiT replaces the random one (differences on random weights overstate what trained ones do)."""
    import copy

    from ..model.fast import engine

    base, vae = build(cfg, device, dtype)
    if weights:
        from ..api import model_folder
        from ..checkpoints import load_model

        base, cfg = load_model(model_folder(weights), device, dtype=dtype)
    results, ref = [], None
    for spec in ["eager"] + [v for v in variants if v != "eager"]:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        engine(model, spec)
        t_engine = time.perf_counter() - t0
        res = run_speed(cfg, frames, device, dtype, model, vae, progress=progress, keep_latents=keep_latents)
        res["variant"] = spec
        res["weights"] = weights or "random"
        # variant set-up + compute to the first frame (the warm-up steps, where compilation happens)
        res["startup_s"] = t_engine + res["first_frame_latency_ms"] / 1000
        lat = res.pop("latents")
        if ref is None:
            ref = lat
        d = (lat - ref).float()
        res["latents_max_diff"] = float(d.abs().max())
        res["latents_rms_diff"] = float(d.pow(2).mean().sqrt())
        res["latents_rel_rms_diff"] = float(d.pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt())
        if spec in variants:
            results.append(res)
            if on_result:
                on_result(results)  # e.g. rewrite the JSON: a run cut short keeps the variants it finished
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


@torch.no_grad()
def run_codec(cfg: Config, device: torch.device, dtype: torch.dtype, latents: int = 64) -> dict:
    vae = build_vae(cfg, device, dtype)
    h, w = cfg.codec.latent_hw
    z = torch.randn(1, cfg.model.latent_channels, latents + 1, h, w, device=device, dtype=dtype)
    dec = vae.stream_decoder()
    dec.decode(z[:, :, :1])
    for k in range(1, 4):  # warm-up
        dec.decode(z[:, :, k:k + 1])
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for k in range(4, latents + 1):
        n += dec.decode(z[:, :, k:k + 1]).shape[2]
    _sync(device)
    dt = time.perf_counter() - t0
    return {"model": cfg.name, "vae": cfg.codec.vae, "device": device_name(device), "resolution":
            f"{cfg.codec.width}x{cfg.codec.height}", "decode_frames_per_s": n / dt, "ms_per_frame": 1000 * dt / n}


def speed_main(model: str, frames: int, device: str, dtype: str, json_path: str | None, modes: list[str],
               variants: list[str] | None = None, weights: str | None = None) -> list:
    dev = torch.device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = preset(model)

    def write(results: list) -> str:
        text = json.dumps(results if len(results) > 1 else results[0], indent=2)
        if json_path:
            with open(json_path, "w") as f:
                f.write(text + "\n")
        return text

    if variants:
        results = compare_variants(cfg, frames, dev, dt, variants, weights=weights, on_result=write)
    else:
        net, vae = build(cfg, dev, dt)
        results = [run_speed(cfg, frames, dev, dt, net, vae, mode=m) for m in modes]
    print(write(results))
    return results


def audio_rows_main(audio_model: str, audio: str, lefts: list[int], lookaheads: list[int],
                    block_frames: int = 16, json_path: str | None = None) -> list[dict]:
    """``bench audio-rows``: how far bounded streaming wav2vec2 rows are from the whole-clip rows.

    For each (left context, look-ahead) the streaming rows of every block of ``block_frames`` video frames
    (16 = one wan-1.3b block) are compared with the release's rows over the whole clip: relative L2 over all
    14 x 768 dims and for the last hidden state alone, mean cosine, and the look-ahead the setting adds.
    """
    import dataclasses

    from ..codecs.audio import Wav2Vec2FrontEnd
    from ..data.audio import load_audio

    base = preset("wan-1.3b").codec
    pcm = torch.from_numpy(load_audio(audio, base.sample_rate))
    n = len(pcm) // base.samples_per_frame // block_frames * block_frames
    if n == 0:
        raise ValueError(f"{audio}: shorter than one block of {block_frames} frames")
    fe = Wav2Vec2FrontEnd(base, audio_model)
    offline = fe.clip_rows(pcm, n)
    width = fe.model.config.hidden_size
    results = []
    for left in lefts:
        for la in lookaheads:
            fe.cfg = dataclasses.replace(base, audio_left_context_frames=left, audio_lookahead_frames=la)
            fe.lookahead_frames, fe.lookahead_samples = la, la * fe.spf
            t0 = time.perf_counter()
            stream = torch.cat([fe.features(pcm, a, a + block_frames) for a in range(0, n, block_frames)])
            dt = time.perf_counter() - t0
            diff = stream - offline
            results.append({
                "left_context_frames": left, "lookahead_frames": la, "lookahead_ms": 1000 * la / base.fps,
                "rel_l2": float(diff.norm() / offline.norm()),
                "rel_l2_last_hidden": float(diff[:, :width].norm() / offline[:, :width].norm()),
                "cosine_mean": float(torch.nn.functional.cosine_similarity(stream, offline, dim=-1).mean()),
                "ms_per_block": 1000 * dt / (n // block_frames),
            })
    out = {"audio": str(audio), "audio_model": str(audio_model), "frames": n, "block_frames": block_frames,
           "device": device_name(torch.device("cpu")), "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    if json_path:
        from pathlib import Path

        Path(json_path).write_text(text + "\n")
    return results

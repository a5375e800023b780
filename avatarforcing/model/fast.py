"""Inference variants of the DiT: the same function, faster kernels. ``engine(model, "fp8+compiled")``.

    eager      the model as written
    compiled   every block through torch.compile (inductor, static shapes): RoPE, modulation, norms and
               the fp32 round trips around them fuse into a few kernels; the block's code is compiled once
               and reused by every layer
    graphs     compiled with CUDA graphs (mode "reduce-overhead"): a steady window step replays without
               launch overhead; CUDA only (on the CPU it is ``compiled``)
    fp8        the blocks' linear layers (attention q/k/v/o, FFN) in FP8 e4m3 through torch._scaled_mm:
               weights quantised once per output row, activations per token at run time; accumulation
               and output in the activation dtype

Variants compose with "+" (``fp8+graphs``). Positions, noise and KV buffers are untouched, so every
variant runs the same sampler; ``bench speed --variants`` measures each against eager on the same inputs
and noise. Compiled kernels persist in inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``), so a
second start skips most of the compile time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError

VARIANTS = ("eager", "compiled", "graphs", "fp8")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SPECIALISATIONS = 256  # compiled shapes kept per block: ~5 per batch size (window phases, clean pass)


def parse(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    bad = [p for p in parts if p not in VARIANTS]
    if not parts or bad:
        raise InputError(f"unknown engine variant {spec!r}; expected one of {VARIANTS}, joined with '+'")
    if "compiled" in parts and "graphs" in parts:
        raise InputError("'graphs' already compiles: use one of 'compiled' and 'graphs'")
    return parts


def default_variant(device: torch.device | str) -> str:
    """What runs when nobody asks: compiled blocks on CUDA (the issue's H200 profile: plain compile 28.9 vs eager
    41.9 ms/frame DiT; our variants are not yet measured on a GPU, see benchmarks/gpu_speed_variants.sh); eager
    on the CPU, where compile time would not pay for itself in one clip."""
    return "compiled" if torch.device(device).type == "cuda" else "eager"


def engine(model: nn.Module, spec: str = "eager") -> nn.Module:
    """Turn ``model`` (an AvatarDiT, in place) into the variant ``spec``; returns it."""
    parts = parse(spec)
    if "fp8" in parts:
        quantise_fp8(model)
    if "compiled" in parts or "graphs" in parts:
        mode = "reduce-overhead" if "graphs" in parts and _on_cuda(model) else "default"

        for block in model.blocks:
            block.compile(mode=mode, dynamic=False, fullgraph=False)
        _keep_specialisations(model)
    model.engine_variant = "+".join(parts)
    return model


def _keep_specialisations(model: nn.Module) -> None:
    """Warm-up steps see a few prefix lengths before the steady state, and a server's batches of 1..K sessions:
    each is one specialisation, and past dynamo's limit (8) the block silently runs eagerly. The limit is a
    thread-local setting (``recompile_limit``; ``cache_size_limit`` in older torch), and the model runs in
    whichever thread steps it (a server's scheduler), so every forward raises it for its own call."""
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    inner = model.forward

    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(**{name: SPECIALISATIONS}):
            return inner(*args, **kwargs)

    model.forward = forward


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


class FP8Linear(nn.Module):
    """y = x W^T + b with W stored as float8_e4m3fn and one float32 scale per output row.

    Activations are quantised per token (row) with scale amax / 448; ``torch._scaled_mm`` multiplies the
    FP8 operands and applies both scales. The result equals the matmul of the dequantised operands up to
    accumulation order (tests/test_fast.py).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # [out, 1]
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        a = x.reshape(-1, self.in_features)
        m = a.shape[0]
        if x.is_cuda and m % 16:  # cuBLASLt's FP8 GEMM wants every dimension a multiple of 16
            a = torch.nn.functional.pad(a, (0, 0, 0, 16 - m % 16))
        a_fp8, a_scale = quantise_rows(a)
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # rowwise scales on CUDA give bf16
        y = torch._scaled_mm(a_fp8, self.weight_fp8.t(), scale_a=a_scale, scale_b=self.weight_scale,
                             out_dtype=out_dtype)[:m]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantised_weight(self) -> Tensor:
        return self.weight_fp8.float() * self.weight_scale.t()


def quantise_rows(a: Tensor) -> tuple[Tensor, Tensor]:
    """a [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]) with a ~= q * scale, |q| <= 448."""
    scale = (a.detach().abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (a.float() / scale).to(torch.float8_e4m3fn), scale


def quantise_fp8(model: nn.Module) -> int:
    """Swap the linear layers inside the model's blocks for FP8Linear; returns how many were swapped.
    Embeddings, the head and the audio projections stay in the model dtype (small, and closest to the
    numbers that matter most)."""
    n = 0
    for block in model.blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and _fp8_shape_ok(child):
                    setattr(module, child_name, FP8Linear(child))
                    n += 1
    return n


def _fp8_shape_ok(linear: nn.Linear) -> bool:
    """_scaled_mm on CUDA needs both matrix dims to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

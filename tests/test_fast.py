"""Engine variants (model/fast.py): each is the eager model's function within its stated tolerance."""

import copy
import shutil

import pytest
import torch

from avatarforcing.errors import InputError
from avatarforcing.model import AvatarDiT
from avatarforcing.model.fast import FP8Linear, default_variant, engine, parse, quantise_fp8, quantise_rows
from avatarforcing.stream.window import WindowSampler

from .conftest import audio, tiny_cfg

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="torch.compile on the CPU needs a C++ compiler")


def stream(model, cfg, steps=7, seed=0):
    torch.manual_seed(1)
    ref = torch.randn(1, cfg.model.latent_channels, 1, 4, 4)
    rows = [audio(cfg) for _ in range(steps)]
    s = WindowSampler(model, cfg, ref, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = [z for a in rows for z in s.push(a)] + s.drain()
    return torch.cat(out, dim=2)


def test_parse():
    assert parse("fp8+graphs") == ["fp8", "graphs"]
    for bad in ("", "turbo", "fp8+turbo", "compiled+graphs"):
        with pytest.raises(InputError):
            parse(bad)
    assert default_variant("cpu") == "eager"


def test_fp8_linear_is_the_dequantised_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    f = FP8Linear(lin)
    x = torch.randn(5, 7, 64) * 3
    q, s = quantise_rows(x.reshape(-1, 64))
    expected = (q.float() * s) @ f.dequantised_weight().t() + lin.bias
    assert torch.allclose(f(x).reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    assert q.float().abs().max() <= 448
    # and close to the full-precision layer: e4m3 keeps 3 mantissa bits
    rel = (f(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.06


def test_fp8_swaps_only_the_block_linears():
    cfg = tiny_cfg()
    model = AvatarDiT(cfg.model)
    n = quantise_fp8(model)
    assert n == cfg.model.num_layers * 6  # q, k, v, o, 2 FFN per block (no text: no cross-attention)
    assert isinstance(model.head.head, torch.nn.Linear) and isinstance(model.audio_proj.proj, torch.nn.Linear)


def test_fp8_window_step_within_tolerance():
    """One window pass of a trained-scale model: FP8 output within 10% relative rms of fp32 eager."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval()
    fast = engine(copy.deepcopy(model), "fp8")
    x = torch.randn(1, cfg.model.in_channels, 3, 4, 4)
    t = torch.tensor([[900.0, 600.0, 300.0]])
    pos = torch.arange(3)
    a = torch.randn(1, 3, 4, cfg.model.audio_dim)
    with torch.no_grad():
        ref, out = model(x, t, pos, audio=a), fast(x, t, pos, audio=a)
    assert (out - ref).norm() / ref.norm() < 0.1


@needs_compiler
@pytest.mark.parametrize("spec", ["compiled", "graphs"])
def test_compiled_stream_equals_eager(spec):
    """The whole stream (warm-up, steady state, drain: every shape the compiler specialises) equals eager;
    ``graphs`` on the CPU compiles without CUDA graphs."""
    cfg = tiny_cfg(block_frames=2, window_blocks=2, denoising_steps=[1000, 500], temporal_anchor_frames=1)
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval()
    ref = stream(model, cfg)
    fast = engine(copy.deepcopy(model), spec)
    assert fast.engine_variant == spec
    assert torch.allclose(stream(fast, cfg), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_on_cuda_equal_eager_bf16():
    cfg = tiny_cfg(block_frames=2, window_blocks=2, denoising_steps=[1000, 500], temporal_anchor_frames=1)
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval().cuda().to(torch.bfloat16)
    ref = stream(model, cfg)
    fast = engine(copy.deepcopy(model), "graphs")
    out = stream(fast, cfg)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 0.02


def test_bench_compares_variants_on_the_same_inputs():
    from avatarforcing.eval.bench import compare_variants

    cfg = tiny_cfg(block_frames=1, window_blocks=2, denoising_steps=[1000, 500], temporal_anchor_frames=1)
    res = compare_variants(cfg, 16, torch.device("cpu"), torch.float32, ["eager", "fp8"], progress=False)
    assert [r["variant"] for r in res] == ["eager", "fp8"]
    assert res[0]["latents_max_diff"] == 0.0
    assert 0 < res[1]["latents_rel_rms_diff"] < 1.0
    for r in res:
        assert r["startup_s"] > 0 and r["step_ms_p95"] >= r["step_ms_p50"] > 0


def test_compiled_specialisation_limit_holds_in_any_thread():
    """Dynamo's recompile limit is thread-local: a server's scheduler thread must see the raised limit when it
    steps the model, or every batch size past the 8th runs eagerly (silently, at a fraction of the speed)."""
    import threading

    import torch._dynamo
    from torch import nn

    from avatarforcing.model import fast

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    class Probe(nn.Module):
        def forward(self):
            return getattr(torch._dynamo.config, name)

    m = Probe()
    fast._keep_specialisations(m)
    seen = []
    t = threading.Thread(target=lambda: seen.append(m()))
    t.start()
    t.join()
    assert seen == [fast.SPECIALISATIONS]
    seen_plain = []
    t = threading.Thread(target=lambda: seen_plain.append(Probe()()))
    t.start()
    t.join()
    assert seen_plain[0] < fast.SPECIALISATIONS  # the default elsewhere: the wrapper is what raises it

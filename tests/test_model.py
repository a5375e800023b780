import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarforcing.checkpoints import diffusers_to_wan, load_into
from avatarforcing.config import preset
from avatarforcing.model import AvatarDiT, KVPrefix, count_parameters, pack_audio_rows
from avatarforcing.model.math import apply_rope, attention, rope_freqs, token_ids

from .conftest import TINY, tiny_model


def test_wan_1_3b_parameter_count():
    cfg = preset("wan-1.3b").model
    base = dataclasses.replace(cfg, reference_conditioning=False, audio_dim=0)
    with torch.device("meta"):
        assert count_parameters(AvatarDiT(base)) == 1_418_996_800
        full = count_parameters(AvatarDiT(cfg))
    audio = (4 * 10752 * 32 + 32) + 2 * 32 + 14 * (32 * 1536 + 1536)
    patch_extra = 17 * 1536 * 1 * 2 * 2
    assert full == 1_418_996_800 + audio + patch_extra


def test_parity_with_diffusers_per_frame_timesteps():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=3).eval()
    ours = AvatarDiT(dataclasses.replace(TINY, reference_conditioning=False, audio_dim=0)).eval()
    load_into(ours, diffusers_to_wan(ref.state_dict()), "diffusers")
    x = torch.randn(2, 4, 3, 8, 6)
    t = torch.tensor([[999.0, 500.0, 0.0], [250.0, 37.0, 800.0]])
    ctx = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = ref(x, t.repeat_interleave(4 * 3, dim=1), ctx, return_dict=False)[0]
        got = ours(x, t, torch.arange(3), context=ctx)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-5, rel


def test_streaming_prefix_equals_dense_with_mask():
    m = tiny_model()
    h = w = 4
    # anchor frame (1), block of 2 clean frames, window of 3 frames
    x = torch.randn(1, m.cfg.in_channels, 6, h, w)
    t = torch.tensor([[0.0, 0.0, 0.0, 300.0, 600.0, 900.0]])
    audio = torch.randn(1, 6, 4, 6)
    pos = torch.tensor([10_000, 10_003, 10_004, 10_005, 10_006, 10_007])
    allow = torch.zeros(6, 6, dtype=torch.bool)
    allow[0, 0] = True
    allow[1:3, :3] = True
    allow[3:, :] = True
    with torch.no_grad():
        dense = m(x, t, pos, audio=audio, frame_mask=allow)
        _, kv_a = m(x[:, :, :1], t[:, :1], pos[:1], audio=audio[:, :1], return_kv=True)
        cos, sin = m.rope(pos[:1], h, w)
        pre = KVPrefix([k for k, _ in kv_a], [v for _, v in kv_a], cos, sin)
        _, kv_b = m(x[:, :, 1:3], t[:, 1:3], pos[1:3], audio=audio[:, 1:3], prefix=pre, return_kv=True)
        cos, sin = m.rope(pos[:3], h, w)
        pre = KVPrefix([torch.cat([a[0], b[0]], 1) for a, b in zip(kv_a, kv_b)],
                       [torch.cat([a[1], b[1]], 1) for a, b in zip(kv_a, kv_b)], cos, sin)
        window = m(x[:, :, 3:], t[:, 3:], pos[3:], audio=audio[:, 3:], prefix=pre)
    assert torch.allclose(window, dense[:, :, 3:], atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(offset=st.integers(-50_000, 50_000), seed=st.integers(0, 1000))
def test_rope_shift_invariance(offset, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 3 * 4, 2, 12, generator=g) for _ in range(3))
    pos = torch.tensor([3, 7, 8])

    def attn(p):
        cos, sin = rope_freqs(token_ids(p, 2, 2), (4, 4, 4), 10000.0)
        return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    assert torch.allclose(attn(pos), attn(pos + offset), atol=2e-4)


def test_rope_positions_beyond_table_and_negative():
    cos, sin = rope_freqs(token_ids(torch.tensor([-5, 0, 123_456]), 1, 1), (4, 4, 4), 10000.0)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    assert torch.allclose(cos[1], torch.ones(6))


def test_audio_injection_changes_only_with_audio_and_pack_layout():
    m = tiny_model()
    x = torch.randn(1, m.cfg.in_channels, 2, 4, 4)
    t = torch.full((1, 2), 500.0)
    a = torch.randn(1, 2, 4, 6)
    with torch.no_grad():
        y0 = m(x, t, torch.arange(2))
        y1 = m(x, t, torch.arange(2), audio=a)
    assert not torch.allclose(y0, y1)
    rows = torch.arange(5 * 3, dtype=torch.float32).view(1, 5, 3)  # 1 anchor row + 4
    packed = pack_audio_rows(rows, 4)
    assert packed.shape == (1, 2, 4, 3)
    assert torch.equal(packed[0, 0], rows[0, :1].expand(4, 3))
    assert torch.equal(packed[0, 1], rows[0, 1:5])


def test_audio_pack_is_time_major_like_omniavatar():
    m = tiny_model()
    rows = torch.randn(1, 1, 4, 6)
    want = m.audio_proj.norm_out(rows.reshape(1, 1, 24) @ m.audio_proj.proj.weight.T + m.audio_proj.proj.bias)
    assert torch.allclose(m.audio_proj(rows), want)


def test_condition_builds_33_channel_layout():
    cfg = preset("wan-1.3b").model
    with torch.device("meta"):
        m = AvatarDiT(cfg)
    lat = torch.zeros(1, 16, 3, 2, 2)
    ref = torch.ones(1, 16, 1, 2, 2)
    x = m.condition(lat, ref, torch.tensor([True, False, False]))
    assert x.shape[1] == 33
    assert torch.equal(x[0, 32, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(x[0, 16:32], ref[0].expand(16, 3, 2, 2))


def test_bad_input_shapes_raise():
    m = tiny_model()
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 3, 1, 4, 4), torch.zeros(1, 1), torch.arange(1))
    with pytest.raises(ValueError, match="patch size"):
        m(torch.randn(1, m.cfg.in_channels, 1, 5, 4), torch.zeros(1, 1), torch.arange(1))

"""Many streams in one window step (stream/batch.py): a stream's latents do not depend on who it is batched with."""

import dataclasses

import pytest
import torch

from avatarforcing.model import AvatarDiT
from avatarforcing.stream.batch import push_together
from avatarforcing.stream.window import WindowSampler

from .conftest import TINY, tiny_cfg


def _cfg(scheme):
    return dataclasses.replace(tiny_cfg(positions=scheme), model=TINY)


def _model(cfg):
    torch.manual_seed(0)
    m = AvatarDiT(cfg.model).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _streams(cfg, n):
    """n different streams: identity (reference), prompt (text context), seed and audio each their own."""
    g = torch.Generator().manual_seed(123)
    out = []
    for i in range(n):
        ref = torch.randn(1, cfg.model.latent_channels, 1, 4, 4, generator=g)
        ctx = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=g)
        audio = [torch.randn(1, cfg.stream.block_frames, cfg.model.audio_pack, cfg.model.audio_dim, generator=g)
                 for _ in range(12)]
        out.append((ref, ctx, 100 + i, audio))
    return out


def _sampler(model, cfg, stream):
    ref, ctx, seed, _ = stream
    return WindowSampler(model, cfg, ref, [torch.Generator().manual_seed(seed)], context=ctx)


class Calls:
    """Counts the DiT's forward calls."""

    def __init__(self, model):
        self.n = 0
        inner = model.forward

        def counted(*a, **k):
            self.n += 1
            return inner(*a, **k)

        model.forward = counted


# stream i is pushed at ticks [join, leave): joins and leaves at different ticks
PLAN = [(0, 10), (1, 9), (3, 12), (6, 11)]


@pytest.mark.parametrize("scheme", ["reindexed", "release"])
def test_a_stream_in_a_batch_equals_the_stream_alone(scheme):
    cfg = _cfg(scheme)
    model = _model(cfg)
    streams = _streams(cfg, len(PLAN))
    alone = []
    for st, (join, leave) in zip(streams, PLAN):
        s = _sampler(model, cfg, st)
        alone.append([z for k in range(leave - join) for z in s.push(st[3][k])] + s.drain())
    calls = Calls(model)
    together = [[] for _ in PLAN]
    samplers = [_sampler(model, cfg, st) for st in streams]
    for tick in range(max(leave for _, leave in PLAN)):
        active = [i for i, (join, leave) in enumerate(PLAN) if join <= tick < leave]
        outs = push_together([samplers[i] for i in active], [streams[i][3][tick - PLAN[i][0]] for i in active])
        for i, out in zip(active, outs):
            together[i] += out
        for i, (_, leave) in enumerate(PLAN):
            if tick == leave - 1:
                together[i] += samplers[i].drain()
    for i, (a, b) in enumerate(zip(alone, together)):
        assert len(a) == len(b) == PLAN[i][1] - PLAN[i][0]
        for za, zb in zip(a, b):
            assert za.shape == zb.shape == (1, cfg.model.latent_channels, cfg.stream.block_frames, 4, 4)
            torch.testing.assert_close(zb, za, atol=2e-6, rtol=1e-5)
    # the streams were really batched: fewer DiT calls than the streams' steps alone
    alone_calls = sum(s.dit.calls for s in samplers)
    assert calls.n < alone_calls


def test_steady_state_streams_share_one_window_pass_per_tick():
    """Four reindexed streams past their warm-up, at different block numbers: one window pass and one clean pass
    per tick for all of them."""
    cfg = _cfg("reindexed")
    model = _model(cfg)
    streams = _streams(cfg, 4)
    samplers = [_sampler(model, cfg, st) for st in streams]
    L = cfg.stream.window_blocks
    for i, s in enumerate(samplers):  # different ages: stream i is i blocks ahead
        for k in range(L + i):
            s.push(streams[i][3][k])
    calls = Calls(model)
    push_together(samplers, [st[3][-1] for st in streams])
    assert calls.n == 1 + (1 if cfg.stream.clean_cache_pass else 0)


def test_batched_push_refuses_a_sampler_twice():
    cfg = _cfg("reindexed")
    s = _sampler(_model(cfg), cfg, _streams(cfg, 1)[0])
    with pytest.raises(ValueError, match="twice"):
        push_together([s, s], [None, None])

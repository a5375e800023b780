"""The position schemes as tables: every pass of a stream, in the paper's and in the release's scheme."""

import pytest
import torch

from avatarforcing.stream.positions import Layout, clean_layout, window_layout
from avatarforcing.stream.window import Options

from .conftest import audio, sampler, tiny_cfg


def L(anchor, temporal, start):
    return Layout(anchor, tuple(temporal), start)


# (pass, first block k, temporal frames present) -> layout, for B=4 and 2 temporal-anchor frames (wan-1.3b)
RELEASE = [
    (("window", 0, 0), L(0, [], 1)),        # warm-up windows: anchor 1 frame before the window
    (("clean", 0, 0), L(0, [], 1)),         # clean pass of block 0: anchor 1 frame away
    (("window", 1, 2), L(0, [1, 2], 3)),    # steady: anchor | 2 temporal frames | window
    (("clean", 1, 2), L(0, [3, 4], 5)),     # clean pass of block 1: anchor at absolute 0, 1 + 4 frames away
    (("clean", 7, 2), L(0, [27, 28], 29)),  # block 7: 1 + 4*7 frames away
    (("window", 7, 2), L(0, [1, 2], 3)),    # windows stay re-indexed in the release
]
REINDEXED = [
    (("window", 0, 0), L(0, [], 3)),        # the anchor sits n_temporal + 1 before the window from the start
    (("clean", 0, 0), L(0, [], 3)),
    (("window", 1, 2), L(0, [1, 2], 3)),
    (("clean", 1, 2), L(0, [1, 2], 3)),
    (("clean", 7, 2), L(0, [1, 2], 3)),     # constant: nothing grows with the stream
]


@pytest.mark.parametrize("scheme,table", [("release", RELEASE), ("reindexed", REINDEXED)])
def test_position_table(scheme, table):
    for (kind, k, present), want in table:
        pick = window_layout if kind == "window" else clean_layout
        assert pick(scheme, 2, present, k, 4) == want, (scheme, kind, k, present)


def test_absolute_scheme_is_the_ablation():
    assert window_layout("absolute", 2, 2, 5, 4) == L(0, [19, 20], 21)
    assert clean_layout("absolute", 2, 2, 5, 4) == L(0, [19, 20], 21)
    with pytest.raises(ValueError, match="unknown position scheme"):
        window_layout("nope", 2, 0, 0, 4)


@pytest.mark.parametrize("scheme", ["release", "reindexed"])
def test_sampler_uses_the_table_for_every_pass(scheme):
    """A stream of 5 blocks with B=2, L=3, 1 temporal frame: every pass's positions, in order."""
    cfg = tiny_cfg(block_frames=2, window_blocks=3, denoising_steps=[1000, 600, 300], temporal_anchor_frames=1,
                   positions=scheme)
    s = sampler(cfg)
    handed, roped = [], [None]  # per model call: (query frame positions, positions roped onto the cached keys)
    forward, rope = s.model.forward, s.model.rope
    s.model.rope = lambda frames, h, w: (roped.__setitem__(0, frames.tolist()), rope(frames, h, w))[1]
    s.model.forward = lambda x, t, pos, **kw: (handed.append((pos.tolist(), roped[0])), forward(x, t, pos, **kw))[1]
    for _ in range(5):
        s.push(audio(cfg))
    s.drain()
    got = s.trace.layouts
    # what the model was handed, call by call, against the table (not against the recorded layouts)
    assert handed[0] == ([0], None) and len(handed) == 1 + len(got)  # the style anchor's own pass first
    for (pos, keys), (kind, k, _) in zip(handed[1:], got):
        lay = (window_layout if kind == "window" else clean_layout)(scheme, 1, 0 if k == 0 else 1, k, 2)
        assert pos == list(range(lay.start, lay.start + len(pos))), (kind, k, pos, lay)
        assert keys == [lay.anchor, *lay.temporal], (kind, k, keys, lay)
    assert [(kind, k) for kind, k, _ in got] == [
        ("window", 0), ("window", 0), ("window", 0), ("clean", 0), ("window", 1), ("clean", 1), ("window", 2),
        ("clean", 2), ("window", 3), ("clean", 3), ("window", 4), ("clean", 4)]
    for kind, k, layout in got:
        present = 0 if k == 0 else 1  # the temporal anchor exists once block 0 is final
        pick = window_layout if kind == "window" else clean_layout
        assert layout == pick(scheme, 1, present, k, 2)
    if scheme == "release":
        assert [lay.offset for kind, _, lay in got if kind == "clean"] == [1, 3, 5, 7, 9]
        assert [lay.offset for kind, _, lay in got if kind == "window"] == [1, 1, 1, 2, 2, 2, 2]


def test_release_scheme_changes_the_output_and_ablation_overrides_it():
    cfg = tiny_cfg(block_frames=2, window_blocks=2, denoising_steps=[1000, 500], temporal_anchor_frames=1)
    outs = {}
    for scheme in ("reindexed", "release"):
        s = sampler(cfg.override({"stream.positions": scheme}))
        outs[scheme] = torch.cat([x for _ in range(4) for x in s.push(audio(cfg))] + s.drain(), 2)
    assert not torch.allclose(outs["reindexed"], outs["release"])
    s = sampler(cfg.override({"stream.positions": "release"}), Options(rope_reindex=False))
    assert s.scheme == "absolute"

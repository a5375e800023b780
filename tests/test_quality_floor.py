"""The one end-to-end guard with trained weights: the shipped ``mini`` on one held-out clip keeps its lip sync.

Held-out clip 3 (seed 1234, 10 s: an identity, a voice variant and sentences outside training), generated
by the shipped model from the clip's portrait and speech, scored by the corpus-trained mouth reader against
the clip's ground-truth mouth opening. Measured on 2026-11-30: lip-sync r 0.644 (the same portrait driven
by another clip's speech: -0.005; the 16-clip mean is 0.659). The floor, 0.50, sits well below the
measurement and far above no sync; a regression in the sampler, the audio path or the alignment of audio
rows with frames drops below it (seen: the window start one frame off -> r 0.31, audio rows one latent
frame late -> 0.28, a block re-noised one level too high -> 0.12).
"""

import pytest

FLOOR = 0.50


@pytest.mark.parametrize("seed", [0])
def test_shipped_mini_keeps_lip_sync_on_a_held_out_clip(seed):
    from avatarforcing.api import Avatar
    from avatarforcing.data.corpus import make_clip
    from avatarforcing.eval.longform import reference_frame
    from avatarforcing.eval.metrics import lip_sync
    from avatarforcing.eval.nets import load_eval_nets

    spec, _, audio, gt = make_clip("heldout", 3, 1234, 10.0)
    video = Avatar.load("mini").generate(reference_frame(spec, 128), audio, seed=seed)
    assert len(video) == 250
    r = lip_sync(load_eval_nets(), video, gt)["lipsync_r"]
    assert r > FLOOR, f"lip-sync r {r:.3f} on held-out clip 3 is below the floor {FLOOR} (measured 0.644)"

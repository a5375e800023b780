"""The one end-to-end guard with trained weights: the shipped ``mini`` on one held-out clip keeps its lip sync.

Held-out clip 3 (seed 1234, 10 s: an identity, a voice variant and sentences outside training), generated
by the shipped model from the clip's portrait and speech, scored by the corpus-trained mouth reader against
the clip's ground-truth mouth opening. Measured on 2026-11-30: lip-sync r 0.644 (the same portrait driven
by another clip's speech: -0.005; the 16-clip mean is 0.659 [0.623, 0.697]). The run is seeded and
deterministic; the floor, 0.60, leaves 0.044 for float differences between machines. Measured on planted
bugs: the audio rows one block late -> 0.407, one video frame late -> 0.586, a block re-noised one level too
high -> 0.558: all below the floor. Not caught here (caught by ``test_sampler_reference.py``): the window
start one frame off -> 0.636.
"""

FLOOR = 0.60


def test_shipped_mini_keeps_lip_sync_on_a_held_out_clip():
    from avatarforcing.api import Avatar
    from avatarforcing.data.corpus import make_clip
    from avatarforcing.eval.longform import reference_frame
    from avatarforcing.eval.metrics import lip_sync
    from avatarforcing.eval.nets import load_eval_nets

    spec, _, audio, gt = make_clip("heldout", 3, 1234, 10.0)
    video = Avatar.load("mini").generate(reference_frame(spec, 128), audio, seed=0)
    assert len(video) == 250
    r = lip_sync(load_eval_nets(), video, gt)["lipsync_r"]
    assert r > FLOOR, f"lip-sync r {r:.3f} on held-out clip 3 is below the floor {FLOOR} (measured 0.644)"

"""Any MP4 scored with the long-form benchmark's per-clip metrics (``avatarforcing eval video``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..errors import InputError
from .metrics import MIN_FLOOR_S, RATE, evaluate_video
from .nets import EVAL_WEIGHTS, load_eval_nets


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def score_video(video: str | Path, audio: str | Path | None = None, reference: str | Path | None = None,
                eval_nets: str | Path = EVAL_WEIGHTS, syncnet_v2: str | Path | None = None,
                device: str = "cpu") -> dict:
    """The metrics of one 25 fps video against its speech (``audio``, default: the MP4's own track); with
    ``reference`` (the portrait) also identity drift; with ``syncnet_v2`` (the public SyncNet) LSE-C / LSE-D."""
    from ..data.audio import load_audio
    from ..data.image import load_image
    from ..data.video import read_video

    frames, fps, own_audio = read_video(video)
    if abs(fps - 25) > 0.01:
        raise InputError(f"{video}: {fps:.2f} fps; the metrics expect 25 fps")
    speech = load_audio(audio, RATE) if audio else own_audio
    if speech is None:
        raise InputError(f"{video}: no audio track; pass --audio")
    video_s, audio_s = len(frames) / fps, len(speech) / RATE
    if abs(video_s - audio_s) > 1.0:
        note(f"the video is {video_s:.1f} s, its audio {audio_s:.1f} s; the metrics use the first "
             f"{min(video_s, audio_s):.1f} s of both")
    ref = None
    if reference:
        ref = np.asarray(load_image(reference).resize(frames.shape[2:0:-1]))
    lse_net = None
    if syncnet_v2:
        from .syncnet_v2 import load_syncnet_v2

        lse_net = load_syncnet_v2(syncnet_v2, device)
    try:
        res = evaluate_video(load_eval_nets(eval_nets).to(device), frames, speech, ref, syncnet_v2=lse_net,
                             floors=True)
    except InputError as e:
        raise InputError(f"{video}: {e}") from None
    if res.get("above_floor") is False:
        note("the mouth does not follow this speech above its time-shifted floor (loudness r "
             f"{res['loudness_r']:.3f} <= {res['loudness_r_floor95']:.3f}): identity drift, colour drift and flicker "
             "say nothing about stability here (a still video scores best on them)")
    if "sync_c_floor95" not in res:
        note(f"{res['frames'] / fps:.1f} s is too short for loudness sync and the floors (they need "
             f"{MIN_FLOOR_S} s); not reported")
    return res

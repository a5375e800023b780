"""The public SyncNet's loader, MFCC front end and LSE procedure (weights built here: none can be downloaded)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from avatarforcing.errors import CheckpointError, InputError
from avatarforcing.eval.syncnet_v2 import SyncNetV2, load_syncnet_v2, lse_scores, mfcc, offset_distances

DATA = Path(__file__).parent / "data"

# (key, shape) of the published syncnet_v2.model (joonson/syncnet_python, class S)
PUBLISHED = {
    "netcnnaud.0.weight": (64, 1, 3, 3), "netcnnaud.1.running_var": (64,), "netcnnaud.4.weight": (192, 64, 3, 3),
    "netcnnaud.8.weight": (384, 192, 3, 3), "netcnnaud.11.weight": (256, 384, 3, 3),
    "netcnnaud.14.weight": (256, 256, 3, 3), "netcnnaud.18.weight": (512, 256, 5, 4), "netcnnaud.19.bias": (512,),
    "netcnnlip.0.weight": (96, 3, 5, 7, 7), "netcnnlip.4.weight": (256, 96, 1, 5, 5),
    "netcnnlip.8.weight": (256, 256, 1, 3, 3), "netcnnlip.11.weight": (256, 256, 1, 3, 3),
    "netcnnlip.14.weight": (256, 256, 1, 3, 3), "netcnnlip.18.weight": (512, 256, 1, 6, 6),
    "netfcaud.0.weight": (512, 512), "netfcaud.1.running_mean": (512,), "netfcaud.3.weight": (1024, 512),
    "netfclip.0.weight": (512, 512), "netfclip.3.weight": (1024, 512), "netfclip.3.bias": (1024,),
}


def test_mfcc_matches_python_speech_features():
    # reference: python_speech_features 0.6 `mfcc(samples, 16000)` (with scipy's DCT) on a chirp with noise and
    # a silent stretch, computed once outside this project and stored with its input
    ref = np.load(DATA / "mfcc_reference.npz")
    got = mfcc(ref["samples"])
    assert got.shape == ref["mfcc"].shape == (107, 13)
    np.testing.assert_allclose(got, ref["mfcc"], atol=1e-8)


def test_architecture_has_the_published_keys_and_shapes():
    sd = SyncNetV2().state_dict()
    for k, shape in PUBLISHED.items():
        assert tuple(sd[k].shape) == shape, k
    net = SyncNetV2().eval()
    with torch.no_grad():
        assert net.embed_audio(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
        assert net.embed_video(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)


def test_loader_reads_legacy_files_and_names_mismatches(tmp_path):
    torch.manual_seed(0)
    src = SyncNetV2()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # as in 2017
    torch.save(sd, tmp_path / "syncnet_v2.model", _use_new_zipfile_serialization=False)
    net = load_syncnet_v2(tmp_path / "syncnet_v2.model")
    assert not net.training
    for k, v in sd.items():
        assert torch.equal(net.state_dict()[k], v), k
    sd["netfcaud.3.weight"] = torch.zeros(512, 512)
    torch.save(sd, tmp_path / "bad.model")
    with pytest.raises(CheckpointError, match=r"netfcaud.3.weight: file \(512, 512\) vs model \(1024, 512\)"):
        load_syncnet_v2(tmp_path / "bad.model")


def test_offset_distances_follow_the_reference_procedure_and_find_the_shift():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(40, 16, generator=g)
    audio = torch.roll(video, 3, 0) + 0.05 * torch.randn(40, 16, generator=g)  # audio lags by 3 windows
    d = offset_distances(video, audio, vshift=15)
    # the reference, literally: per video window, distances to the zero-padded audio rows i-15..i+15
    padded = torch.cat([torch.zeros(15, 16), audio, torch.zeros(15, 16)])
    ref = torch.stack([torch.nn.functional.pairwise_distance(video[i:i + 1].expand(31, 16), padded[i:i + 31])
                       for i in range(40)]).mean(0)
    torch.testing.assert_close(d, ref)
    assert int(d.argmin()) == 15 + 3


def test_lse_scores_on_a_short_video():
    torch.manual_seed(0)
    net = SyncNetV2().eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(12 * 640)).astype(np.float32)
    res = lse_scores(net, frames, audio, vshift=3)
    assert set(res) == {"lse_c", "lse_d", "lse_offset"}
    assert res["lse_c"] >= 0 and np.isfinite(res["lse_d"]) and -3 <= res["lse_offset"] <= 3
    with pytest.raises(InputError, match="more than 5 frames"):
        lse_scores(net, frames[:4], audio, vshift=3)

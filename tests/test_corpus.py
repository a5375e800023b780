import hashlib

import numpy as np
import pytest

from avatarforcing.data.corpus import make_clip, split_sentence, synth, voices
from avatarforcing.data.dataset import CorpusDataset, VideoFolderDataset
from avatarforcing.data.render import measure_mouth_opening


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth(root, 2, 6.0, "train", seed=3, workers=1, shard_size=2, progress=False)
    synth(root, 2, 6.0, "heldout", seed=3, workers=1, shard_size=2, progress=False)
    return root


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes(corpus, tmp_path):
    synth(tmp_path, 2, 6.0, "train", seed=3, workers=2, shard_size=1, progress=False)
    for name in ("audio.wav", "gt.npz", "video.mp4"):
        assert _digest(corpus / "clips/train-00000" / name) == _digest(tmp_path / "clips/train-00000" / name), name
    a = np.load(corpus / "shards/train-0000/frames.npy")[1]
    b = np.load(tmp_path / "shards/train-0001/frames.npy")[0]
    assert np.array_equal(a, b)


def test_split_disjoint():
    tv, hv = set(voices("train")), set(voices("heldout"))
    assert tv and hv and not tv & hv
    rng = np.random.default_rng(0)
    ts = {split_sentence(rng, "train") for _ in range(300)}
    hs = {split_sentence(rng, "heldout") for _ in range(300)}
    assert not ts & hs
    t = [make_clip("train", i, 0, 1.0)[0] for i in range(3)]
    h = [make_clip("heldout", i, 0, 1.0)[0] for i in range(3)]
    assert not {c.voice for c in t} & {c.voice for c in h}
    assert all(a.identity != b.identity for a in t for b in h)


def _onsets(mask, min_gap):
    """Starts of runs of True preceded by at least ``min_gap`` False."""
    out, last_true = [], -10**9
    for i, v in enumerate(mask):
        if v:
            if i - last_true > min_gap:
                out.append(i)
            last_true = i
    return out


def test_speech_onsets_align_with_ground_truth():
    i = 5
    while True:  # a clip without added background noise, so that energy marks speech
        spec, frames, audio, gt = make_clip("train", i, 7, 10.0)
        if spec.noise_snr_db is None:
            break
        i += 1
    # audio energy at 5 ms resolution
    hop = 80
    rms = np.sqrt(np.convolve(audio**2, np.ones(hop) / hop, "same")[::hop])
    active = rms > 0.02 * rms.max()
    audio_on = [i * hop / 16000 for i in _onsets(active, int(0.1 * 16000 / hop))]
    gt_on = [i / 25 for i in _onsets(gt["speaking"], int(0.4 * 25))]  # starts after real pauses
    assert len(gt_on) >= 2
    for t in gt_on:
        assert min(abs(t - a) for a in audio_on) <= 0.040 + 0.5 / 25, (t, audio_on)


def test_rendered_mouth_matches_ground_truth():
    spec, frames, audio, gt = make_clip("heldout", 2, 1, 8.0)
    measured = np.array([measure_mouth_opening(f) for f in frames])
    r = np.corrcoef(measured, gt["opening"])[0, 1]
    assert r > 0.9, r


def test_corpus_dataset(corpus):
    ds = CorpusDataset(corpus, "train", window_frames=33, stride=16)
    item = ds[len(ds) - 1]
    assert item["frames"].shape == (3, 33, 128, 128) and item["audio"].shape == (33 * 640,)
    assert item["reference"].shape == (3, 128, 128)
    assert item["gt"]["opening"].shape == (33,) and -1 <= item["frames"].min() and item["frames"].max() <= 1
    assert len(CorpusDataset(corpus, "heldout", window_frames=149)) == 2


def test_video_folder_dataset(corpus, tmp_path):
    import shutil

    shutil.copy(corpus / "clips/train-00001/video.mp4", tmp_path / "a.mp4")
    ds = VideoFolderDataset(tmp_path, window_frames=25, size=64)
    item = ds[0]
    assert item["frames"].shape == (3, 25, 64, 64) and item["audio"].shape == (25 * 640,)
    ref = np.asarray(CorpusDataset(corpus, "train", window_frames=25).shards[0][1][1][: 25 * 640])
    got = item["audio"].numpy()
    assert np.corrcoef(ref, got)[0, 1] > 0.9  # the clip's own speech, through an AAC round trip


def test_speech_library_comes_with_the_project(monkeypatch):
    """No system package: libespeak-ng and its data come from the espeakng-loader wheel unless ESPEAK_NG_LIB
    points elsewhere (byte-determinism across processes: test_same_seed_same_bytes)."""
    from avatarforcing.data.speech import library, synthesize

    monkeypatch.delenv("ESPEAK_NG_LIB", raising=False)
    lib, data = library()
    assert "espeakng_loader" in lib and data is not None and data.endswith("espeak-ng-data")
    monkeypatch.setenv("ESPEAK_NG_LIB", "/opt/elsewhere/libespeak-ng.so")
    assert library()[0] == "/opt/elsewhere/libespeak-ng.so"
    monkeypatch.delenv("ESPEAK_NG_LIB")
    a = synthesize("The same words twice.")
    assert len(a.samples) > 10_000 and np.abs(a.samples).max() > 0.05 and len(a.phonemes) > 8


def _has_flite() -> bool:
    from avatarforcing.data import flite

    return flite.available()


@pytest.mark.skipif(not _has_flite(), reason="Debian's flite (libflite) is not installed")
def test_flite_voices_have_phoneme_timing_and_their_own_split():
    from avatarforcing.data import flite
    from avatarforcing.data.corpus import FLITE_SPLITS
    from avatarforcing.data.visemes import phoneme_to_viseme

    assert not set(FLITE_SPLITS["train"]) & set(FLITE_SPLITS["heldout"])
    sp = flite.synthesize("Bob saw a map.", "slt")
    starts = [t for _, t in sp.phonemes]
    assert starts == sorted(starts) and starts[-1] < len(sp.samples) / sp.rate
    names = [ph for ph, _ in sp.phonemes if ph != "_"]
    assert names[:3] == ["b", "A:", "b"]  # b aa b
    assert phoneme_to_viseme("b") == phoneme_to_viseme("m")  # lips closed, as flite's "m" of "map"
    again = flite.synthesize("Bob saw a map.", "slt")
    assert np.array_equal(sp.samples, again.samples)  # seeded per request
    clips = [make_clip("heldout", i, 0, 2.0, synthesisers=("espeak", "flite"))[0] for i in range(8)]
    fl = {c.voice for c in clips if c.voice.startswith("flite:")}
    assert fl and fl <= {"flite:slt"}
    # espeak-only corpora are unchanged by the option's existence
    assert make_clip("train", 0, 0, 1.0)[0].voice == make_clip("train", 0, 0, 1.0, synthesisers=("espeak",))[0].voice

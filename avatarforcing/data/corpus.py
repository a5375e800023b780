"""The synthetic talking-head corpus: clips of procedurally rendered faces speaking espeak-ng speech,
with per-frame ground truth of what the mouth should be doing.

Layout written by ``synth`` (``avatarforcing data synth --out DIR``)::

    DIR/corpus.json                 split, seed, size, fps and, per clip, its identity/voice/sentences
    DIR/clips/<split>-<i>/video.mp4 H.264 + AAC speech, playable anywhere
    DIR/clips/<split>-<i>/audio.wav 16 kHz mono
    DIR/clips/<split>-<i>/gt.npz    per frame: viseme, opening, width, rounding, teeth, tongue, speaking,
                                    blink, pose (dx, dy, rot, scale)
    DIR/shards/<split>-<k>/         what the trainers read: frames.npy uint8 [clips, T, H, W, 3] and
                                    audio.npy float32 [clips, samples] (both memory-mapped), gt.npz
                                    (arrays [clips, T]), clips.json (clip names)

Splits never share identities (separate seed streams), voices or sentences (hash partitions of the
voice pool and of the sentence generator's output), so held-out clips are truly unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .audio import resample
from .render import Renderer, sample_identity, sample_motion
from .visemes import FIELDS, VISEMES, mouth_track

# "train": what models learn from. "heldout": unseen identities, sentences and accent-variant pairs; the
# development split every training choice was checked on. "test": for the final numbers only, with truly unseen
# speakers: espeak-ng voice variants (timbres) that no other split uses under any accent (TEST_VARIANTS) and
# flite's held-out speaker; its identities are fresh draws and its sentences come from the held-out bucket.
SPLITS = {"train": 0, "heldout": 1, "test": 2}
HELDOUT_FRACTION = 0.2
LANGS = ["en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
            "klatt3", "klatt4", "Alex", "Andy", "Annie", "Denis", "Gene", "Hugo", "Jacky", "Lee", "Mario",
            "Michael", "Mike", "adam", "anika", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
            "edward", "iven", "john", "linda", "max", "michel", "norbert", "paul", "pedro", "grandma", "grandpa"]
# variants of espeak-ng's voice data outside VARIANTS (and not a renamed copy of one, like mike2 or iven2): the
# test split's timbres, heard by no model trained on the train split
TEST_VARIANTS = ["Alicia", "Andrea", "Reed", "gustave", "ian", "miguel", "quincy", "robert", "shelby", "steph",
                 "travis", "victor", "zac", "antonio", "marcelo", "sandro"]

_SUBJ = ["the old man", "my sister", "a small dog", "the teacher", "our neighbour", "the pilot", "a young girl",
         "the doctor", "his brother", "the farmer", "a tall woman", "the baker", "my friend", "the captain",
         "a quiet boy", "the singer", "her mother", "the police officer", "a busy student", "the king", "we",
         "they", "you", "the children", "the engineers", "a clever fox", "the brown horse", "my uncle"]
_VERB = ["bought", "painted", "watched", "opened", "found", "carried", "lost", "fixed", "cleaned", "moved",
         "wanted", "liked", "visited", "measured", "built", "sold", "dropped", "borrowed", "described", "noticed",
         "remembered", "followed", "pushed", "covered", "touched", "chose", "threw", "caught", "shared", "kept"]
_ADJ = ["red", "heavy", "bright", "broken", "wooden", "shiny", "empty", "lovely", "strange", "purple", "tiny",
        "enormous", "quiet", "smooth", "round", "golden", "famous", "cheap", "modern", "ancient", "wet", "frozen"]
_OBJ = ["box", "window", "garden", "bicycle", "letter", "umbrella", "piano", "bottle", "map", "jacket", "boat",
        "mirror", "basket", "clock", "lamp", "book", "bridge", "violin", "pumpkin", "wallet", "kettle", "ladder",
        "rocket", "sandwich", "tower", "feather", "pebble", "rope", "chair", "blanket"]
_PLACE = ["near the river", "in the morning", "at the market", "behind the house", "before lunch", "on Monday",
          "under the table", "after the storm", "by the sea", "in the kitchen", "last summer", "at midnight",
          "during the party", "over the hill", "without a word", "with great care", "very slowly", "again"]
_QUESTION = ["why did", "where did", "when did", "how did"]


def sentence(rng: np.random.Generator) -> str:
    k = rng.integers(4)
    s, v, a, o = (x[rng.integers(len(x))] for x in (_SUBJ, _VERB, _ADJ, _OBJ))
    p = _PLACE[rng.integers(len(_PLACE))]
    if k == 0:
        return f"{s.capitalize()} {v} the {a} {o} {p}."
    if k == 1:
        q = _QUESTION[rng.integers(len(_QUESTION))]
        base = v if v not in ("bought", "caught", "threw", "kept", "chose", "built", "sold", "found", "lost") \
            else {"bought": "buy", "caught": "catch", "threw": "throw", "kept": "keep", "chose": "choose",
                  "built": "build", "sold": "sell", "found": "find", "lost": "lose"}[v]
        base = base[:-2] if base.endswith("ed") and base not in ("need",) else base
        return f"{q.capitalize()} {s} {base} the {a} {o}?"
    if k == 2:
        a2, o2 = _ADJ[rng.integers(len(_ADJ))], _OBJ[rng.integers(len(_OBJ))]
        return f"{s.capitalize()} {v} a {a} {o}, and then a {a2} {o2}."
    return f"{p.capitalize()}, {s} {v} the {o}."


def _bucket(text: str) -> str:
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < HELDOUT_FRACTION else "train"


def voices(split: str) -> list[str]:
    """espeak-ng voices ("accent+variant") of a split: train and heldout partition the accent-variant pairs of
    VARIANTS (so a held-out voice's timbre is heard in training under another accent); test uses TEST_VARIANTS."""
    if split == "test":
        return [f"{lang}+{v}" for lang in LANGS for v in TEST_VARIANTS]
    pool = [f"{lang}+{v}" for lang in LANGS for v in VARIANTS]
    return [v for v in pool if _bucket("voice:" + v) == split]


# flite's voices are four real speakers (kal and kal16 are one man at two sample rates): assigned by hand so
# the held-out and test splits have a speaker of their own
FLITE_SPLITS = {"train": ["kal", "kal16", "awb", "rms"], "heldout": ["slt"], "test": ["slt"]}
FLITE_SHARE = 0.4  # of a split's clips, when ``voices`` includes flite
SYNTHESISERS = ("espeak", "flite")


def split_sentence(rng: np.random.Generator, split: str) -> str:
    bucket = "train" if split == "train" else "heldout"  # test sentences: never in training, like heldout's
    while True:
        s = sentence(rng)
        if _bucket("sentence:" + s) == bucket:
            return s


@dataclass
class ClipSpec:
    name: str
    split: str
    index: int
    seed: int
    voice: str
    rate: int
    pitch: int
    pitch_range: int
    noise_snr_db: float | None
    sentences: list[str]
    identity: dict


def make_clip(split: str, index: int, seed: int, seconds: float, size: int = 128, fps: int = 25,
              sample_rate: int = 16000, synthesisers: tuple[str, ...] = ("espeak",)):
    """Synthesize one clip; returns (spec, frames uint8 [T, H, W, 3], audio float32, gt dict).

    With flite among ``synthesisers``, FLITE_SHARE of the clips speak with a flite voice of the split
    (``voice`` "flite:<name>", ``rate`` its duration stretch in percent)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    ident = sample_identity(rng)
    pool = voices(split)
    voice = pool[rng.integers(len(pool))]
    rate, pitch, prange = int(rng.integers(120, 230)), int(rng.integers(20, 80)), int(rng.integers(20, 90))
    if "flite" in synthesisers and rng.random() < FLITE_SHARE:  # drawn only then: espeak-only corpora unchanged
        names = FLITE_SPLITS[split]
        voice, rate = f"flite:{names[rng.integers(len(names))]}", int(rng.integers(85, 126))
    raw, events, sentences = clip_speech(split, index, seed, seconds, voice, rate, pitch, prange)
    audio = resample(raw, 22050, sample_rate)
    n = int(round(seconds * sample_rate))
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n].astype(np.float32)
    snr = None
    if rng.random() < 0.3:
        snr = float(rng.uniform(15, 35))
        speech_rms = np.sqrt(np.mean(audio[np.abs(audio) > 1e-4] ** 2) + 1e-12)
        audio = audio + rng.normal(0, speech_rms * 10 ** (-snr / 20), n).astype(np.float32)
    peak = np.abs(audio).max()
    if peak > 0.99:
        audio *= 0.99 / peak
    gt = mouth_track(events, seconds, fps)
    frames_n = len(gt["viseme"])
    motion = sample_motion(rng, frames_n, fps, gt["speaking"])
    r = Renderer(ident, size)
    frames = np.empty((frames_n, size, size, 3), np.uint8)
    for i in range(frames_n):
        m = {k: float(gt[k][i]) for k in FIELDS}
        frames[i] = r.render(m, (motion.dx[i], motion.dy[i], motion.rot[i], motion.scale[i]),
                             motion.blink[i], motion.brow[i])
    gt["blink"] = motion.blink.astype(np.float32)
    gt["pose"] = np.stack([motion.dx, motion.dy, motion.rot, motion.scale], 1).astype(np.float32)
    name = f"{split}-{index:05d}"
    spec = ClipSpec(name, split, index, seed, voice, rate, pitch, prange, snr, sentences, asdict(ident))
    return spec, frames, audio, gt


def _speech(split, index, seed, seconds, voice, rate, pitch, prange):
    from .speech import synthesize

    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    pieces, events, sentences = [], [], []
    t = rng.uniform(0.1, 0.8)  # leading silence
    pieces.append(np.zeros(int(t * 22050), np.float32))
    while t < seconds:
        text = split_sentence(rng, split)
        sp = flite_speech(text, voice[6:], rate) if voice.startswith("flite:") else \
            synthesize(text, voice, rate, pitch, prange)
        sentences.append(text)
        starts = [s for _, s in sp.phonemes] + [len(sp.samples) / sp.rate]
        for (ph, a), b in zip(sp.phonemes, starts[1:]):
            events.append((ph, t + a, t + b))
        pieces.append(sp.samples)
        t += len(sp.samples) / sp.rate
        gap = rng.uniform(0.15, 1.0) if rng.random() < 0.8 else rng.uniform(1.5, 3.0)  # pauses and silences
        pieces.append(np.zeros(int(gap * sp.rate), np.float32))
        t += gap
    return np.concatenate(pieces), events, sentences


def flite_speech(text: str, name: str, stretch_percent: int):
    """A flite utterance at espeak-ng's rate (22.05 kHz), so a clip's pieces share one rate."""
    from .flite import synthesize as flite_synthesize
    from .speech import Speech

    sp = flite_synthesize(text, name, stretch_percent / 100.0)
    return Speech(resample(sp.samples, sp.rate, 22050), 22050, sp.phonemes, sp.words)


def clip_speech(split, index, seed, seconds, voice, rate, pitch, prange):
    """A clip's speech (22.05 kHz samples, (phoneme, start, end) events, sentences), synthesised in a fresh
    process: libespeak-ng carries state between utterances, so this keeps every clip reproducible
    whatever was synthesised before it."""
    import pickle
    import subprocess
    import sys

    args = (split, index, seed, seconds, voice, rate, pitch, prange)
    code = "import pickle,sys;from avatarforcing.data.corpus import _speech;" \
           "sys.stdout.buffer.write(pickle.dumps(_speech(*pickle.loads(sys.stdin.buffer.read()))))"
    res = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(args), capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep
                              + os.environ.get("PYTHONPATH", "")})
    if res.returncode:
        raise RuntimeError(f"speech synthesis failed: {res.stderr.decode()[-2000:]}")
    return pickle.loads(res.stdout)


def reference_frame(spec: ClipSpec, size: int = 128) -> np.ndarray:
    """The identity's neutral portrait (mouth closed, eyes open, no motion): the conditioning image."""
    from .render import Identity

    ident = Identity(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.identity.items()})
    return Renderer(ident, size).render({"opening": 0.02, "width": 0.5, "rounding": 0.2, "teeth": 0, "tongue": 0})


def _write_shard(args) -> list[dict]:
    out, split, indices, seed, seconds, size, shard, clip_files, synthesisers = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    specs, all_frames, all_audio, gts = [], [], [], []
    for i in indices:
        spec, frames, audio, gt = make_clip(split, i, seed, seconds, size, synthesisers=synthesisers)
        d = Path(out) / "clips" / spec.name
        d.mkdir(parents=True, exist_ok=True)
        if clip_files:  # playable MP4 + wav + reference portrait per clip (shards alone train the model)
            import soundfile as sf

            from .video import VideoWriter

            with VideoWriter(d / "video.mp4", 25, audio) as w:
                w.write(frames)
            sf.write(d / "audio.wav", audio, 16000, subtype="PCM_16")
            _save_png(d / "reference.png", reference_frame(spec, size))
        np.savez(d / "gt.npz", **gt)
        (d / "meta.json").write_text(json.dumps(asdict(spec), indent=1))
        specs.append(asdict(spec))
        all_frames.append(frames)
        all_audio.append(audio)
        gts.append(gt)
    sd = Path(out) / "shards" / f"{split}-{shard:04d}"
    sd.mkdir(parents=True, exist_ok=True)
    np.save(sd / "frames.npy", np.stack(all_frames))
    np.save(sd / "audio.npy", np.stack(all_audio))
    np.save(sd / "references.npy", np.stack([reference_frame(ClipSpec(**s), size) for s in specs]))
    np.savez(sd / "gt.npz", **{k: np.stack([g[k] for g in gts]) for k in gts[0]})
    (sd / "clips.json").write_text(json.dumps([s["name"] for s in specs]))
    return specs


def _save_png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def synth(out: str | Path, clips: int, seconds: float, split: str = "train", seed: int = 0, size: int = 128,
          workers: int = 1, shard_size: int = 16, progress: bool = True, clip_files: bool = True,
          synthesisers: tuple[str, ...] = ("espeak",)) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad = [v for v in synthesisers if v not in SYNTHESISERS]
    if bad or "espeak" not in synthesisers:
        raise ValueError(f"synthesisers must include espeak and be among {SYNTHESISERS}, got {list(synthesisers)}")
    if "flite" in synthesisers:
        from .flite import engine

        engine()  # a missing libflite is an error now, not in a worker later
    tasks = [(str(out), split, list(range(s, min(clips, s + shard_size))), seed, seconds, size, k, clip_files,
              tuple(synthesisers)) for k, s in enumerate(range(0, clips, shard_size))]
    specs: list[dict] = []
    bar = tqdm(total=clips, unit="clip", desc=f"synth {split}", disable=not progress)
    if workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for res in ex.map(_write_shard, tasks):
                specs += res
                bar.update(len(res))
    else:
        for t in tasks:
            res = _write_shard(t)
            specs += res
            bar.update(len(res))
    bar.close()
    manifest_path = out / "corpus.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"clips": {}}
    manifest.update({"fps": 25, "sample_rate": 16000, "size": size, "seconds": seconds,
                     "visemes": VISEMES, "fields": FIELDS})
    manifest.setdefault("splits", {})[split] = {"seed": seed, "clips": clips, "synthesisers": list(synthesisers)}
    for s in specs:
        manifest["clips"][s["name"]] = s
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def contact_sheet(clip_dir: str | Path, path: str | Path, n: int = 8) -> None:
    """Frames of a clip with the ground-truth mouth values printed under each."""
    from PIL import Image, ImageDraw

    from .video import read_video

    d = Path(clip_dir)
    frames, _, _ = read_video(d / "video.mp4", with_audio=False)
    gt = np.load(d / "gt.npz")
    speaking = np.flatnonzero(gt["speaking"])
    pick = speaking[np.linspace(0, len(speaking) - 1, n).astype(int)] if len(speaking) >= n else \
        np.linspace(0, len(frames) - 1, n).astype(int)
    size = frames.shape[1]
    scale = max(1, 160 // size)
    tile_w, text_h = size * scale, 58
    sheet = Image.new("RGB", (tile_w * n, tile_w + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(pick):
        sheet.paste(Image.fromarray(frames[i]).resize((tile_w, tile_w), Image.Resampling.NEAREST), (j * tile_w, 0))
        lines = [f"frame {i}  {VISEMES[int(gt['viseme'][i])]}", f"open {gt['opening'][i]:.2f}",
                 f"width {gt['width'][i]:.2f}", f"round {gt['rounding'][i]:.2f}"]
        for k, line in enumerate(lines):
            draw.text((j * tile_w + 4, tile_w + 2 + 14 * k), line, fill=(0, 0, 0))
    sheet.save(path)


"""Speech from flite's voices (CMU; recorded from real speakers: the kal diphone voices, the awb / rms / slt
statistical voices), with phoneme timing read from the utterance's Segment relation through libflite's C API
(ctypes). Optional: the corpus uses these voices when Debian's ``flite`` (libflite 2.2) is installed and
``data synth --voices`` asks for them.

``synthesize(text, voice, stretch, f0)`` returns the same ``Speech`` as the espeak-ng engine, its phonemes
written as the espeak-ng mnemonics of the same sounds, so ``visemes.mouth_track`` reads both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import threading

import numpy as np

from ..errors import AvatarForcingError
from .speech import Speech

VOICES = ("kal", "kal16", "awb", "rms", "slt")

# CMU / US English phones -> the espeak-ng mnemonic of the same sound (visemes.phoneme_to_viseme reads those)
CMU_TO_ESPEAK = {
    "aa": "A:", "ae": "a", "ah": "V", "ao": "O:", "aw": "aU", "ax": "@", "ay": "aI", "b": "b", "ch": "tS",
    "d": "d", "dh": "D", "eh": "E", "er": "3:", "ey": "eI", "f": "f", "g": "g", "hh": "h", "ih": "I",
    "iy": "i:", "jh": "dZ", "k": "k", "l": "l", "m": "m", "n": "n", "ng": "N", "ow": "oU", "oy": "OI",
    "p": "p", "pau": "_", "r": "r", "s": "s", "sh": "S", "t": "t", "th": "T", "uh": "U", "uw": "u:",
    "v": "v", "w": "w", "y": "j", "z": "z", "zh": "Z",
}


class _Wave(ctypes.Structure):
    _fields_ = [("type", ctypes.c_char_p), ("sample_rate", ctypes.c_int), ("num_samples", ctypes.c_int),
                ("num_channels", ctypes.c_int), ("samples", ctypes.POINTER(ctypes.c_short))]


class _Voice(ctypes.Structure):  # the leading fields of cst_voice
    _fields_ = [("name", ctypes.c_char_p), ("features", ctypes.c_void_p)]


class _Engine:
    def __init__(self):
        try:
            load = lambda n: ctypes.CDLL(ctypes.util.find_library(n) or f"lib{n}.so.1", mode=ctypes.RTLD_GLOBAL)  # noqa: E731
            self.lib = load("flite")
            for dep in ("flite_cmulex", "flite_usenglish"):
                load(dep)
            self._voice_libs = {v: load(f"flite_cmu_us_{v}") for v in VOICES}
        except OSError:
            raise AvatarForcingError("libflite not found: install Debian's flite (libflite1) for the flite "
                                     "voices") from None
        lib = self.lib
        lib.flite_init.restype = ctypes.c_int
        lib.flite_synth_text.restype = ctypes.c_void_p
        lib.flite_synth_text.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.utt_wave.restype = ctypes.POINTER(_Wave)
        lib.utt_wave.argtypes = [ctypes.c_void_p]
        lib.utt_relation.restype = ctypes.c_void_p
        lib.utt_relation.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.relation_head.restype = ctypes.c_void_p
        lib.relation_head.argtypes = [ctypes.c_void_p]
        lib.item_next.restype = ctypes.c_void_p
        lib.item_next.argtypes = [ctypes.c_void_p]
        lib.item_feat_string.restype = ctypes.c_char_p
        lib.item_feat_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.item_feat_float.restype = ctypes.c_float
        lib.item_feat_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.feat_set_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_float]
        lib.delete_utterance.argtypes = [ctypes.c_void_p]
        lib.flite_init()
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.voices: dict[str, int] = {}
        self.lock = threading.Lock()

    def voice(self, name: str) -> int:
        if name not in VOICES:
            raise AvatarForcingError(f"flite has no voice {name!r}; expected one of {VOICES}")
        if name not in self.voices:
            reg = getattr(self._voice_libs[name], f"register_cmu_us_{name}")
            reg.restype = ctypes.c_void_p
            reg.argtypes = [ctypes.c_char_p]
            self.voices[name] = reg(None)
        return self.voices[name]

    def synth(self, text: str, voice: str, stretch: float, f0: float | None) -> Speech:
        with self.lock:
            lib = self.lib
            v = self.voice(voice)
            feats = ctypes.cast(v, ctypes.POINTER(_Voice)).contents.features
            lib.feat_set_float(feats, b"duration_stretch", float(stretch))
            if f0 is not None:
                lib.feat_set_float(feats, b"int_f0_target_mean", float(f0))
            # the statistical voices' excitation draws from libc rand(): seed it from the request, so the same
            # request gives the same samples whatever the process synthesised before
            key = f"{text}|{voice}|{stretch}|{f0}".encode()
            self.libc.srand(int.from_bytes(hashlib.sha1(key).digest()[:4], "little"))
            utt = lib.flite_synth_text(text.encode("utf-8"), v)
            if not utt:
                raise AvatarForcingError(f"flite failed to synthesise {text[:40]!r}")
            try:
                w = lib.utt_wave(utt).contents
                samples = np.ctypeslib.as_array(w.samples, shape=(w.num_samples,)).astype(np.float32) / 32768.0
                phonemes, start = [], 0.0
                item = lib.relation_head(lib.utt_relation(utt, b"Segment"))
                while item:
                    name = lib.item_feat_string(item, b"name").decode("ascii", "replace")
                    end = float(lib.item_feat_float(item, b"end"))
                    phonemes.append((CMU_TO_ESPEAK.get(name, "_"), start))
                    start = end
                    item = lib.item_next(item)
                return Speech(samples.copy(), int(w.sample_rate), phonemes, [])
            finally:
                lib.delete_utterance(utt)


_ENGINE: _Engine | None = None


def available() -> bool:
    try:
        engine()
        return True
    except AvatarForcingError:
        return False


def engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def synthesize(text: str, voice: str = "slt", stretch: float = 1.0, f0: float | None = None) -> Speech:
    """``stretch`` > 1 speaks slower; ``f0`` the mean pitch in Hz (None: the voice's own)."""
    return engine().synth(text, voice, stretch, f0)

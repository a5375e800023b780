"""Synthetic speech with phoneme timing from the libespeak-ng C API (ctypes, phoneme events).

``synthesize(text, voice, rate, pitch)`` returns float32 samples at the library's rate (22050 Hz) and a
list of (phoneme, start_s) events from espeakEVENT_PHONEME. The library keeps global state, so calls in
one process are serialised by a lock; use processes for parallelism.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import AvatarForcingError

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x0001
EVENT_LIST_TERMINATED, EVENT_WORD, EVENT_SENTENCE, EVENT_END, EVENT_MSG_TERMINATED = 0, 1, 2, 5, 6
EVENT_PHONEME = 7
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE, PARAM_WORDGAP = 1, 2, 3, 4, 7


class _Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Speech:
    samples: np.ndarray  # float32 mono
    rate: int
    phonemes: list[tuple[str, float]]  # (espeak phoneme mnemonic, start time in seconds)
    words: list[tuple[int, float]]  # (text position, start time)


def library() -> tuple[str, str | None]:
    """(libespeak-ng to load, its data folder or None for the library's default).

    In order: ``ESPEAK_NG_LIB`` / ``ESPEAK_DATA_PATH`` if set; the ``espeakng-loader`` wheel (libespeak-ng 1.52
    with its data, installed with the project, so nothing comes from the system); the system library.
    Output bytes are deterministic for a given library version, not across versions.
    """
    if os.environ.get("ESPEAK_NG_LIB"):
        return os.environ["ESPEAK_NG_LIB"], os.environ.get("ESPEAK_DATA_PATH")
    try:
        import espeakng_loader

        return str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path())
    except (ImportError, OSError):
        pass
    name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    return name, os.environ.get("ESPEAK_DATA_PATH")


class _Engine:
    def __init__(self):
        name, self.data_path = library()
        try:
            self.lib = ctypes.CDLL(name)
        except OSError:
            raise AvatarForcingError("libespeak-ng not found: `pip install espeakng-loader` (a project dependency) "
                                     "or install the Debian packages espeak-ng and libespeak-ng1") from None
        lib = self.lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self._init()
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.lock = threading.Lock()
        self.lib.espeak_Terminate.restype = ctypes.c_int
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, str | int, int]] = []
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: the library holds a raw pointer

    def _init(self) -> None:
        """Initialise the library. It carries state from one utterance to the next, so output depends on
        what the process synthesised before: callers that need reproducible bytes use a fresh process
        per sequence of requests (see ``corpus.clip_speech``)."""
        data = self.data_path  # espeak-ng-data/ or the folder holding it
        self.rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode() if data else None,
                                               INITIALIZE_PHONEME_EVENTS)
        if self.rate <= 0:
            raise AvatarForcingError("espeak-ng failed to initialise (is espeak-ng-data installed?)")

    def _on_audio(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0)
        i = 0
        while events and events[i].type != EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == EVENT_PHONEME:
                self._events.append((EVENT_PHONEME, e.id.string.decode("ascii", "replace"), e.audio_position))
            elif e.type == EVENT_WORD:
                self._events.append((EVENT_WORD, e.text_position, e.audio_position))
            i += 1
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, word_gap: int) -> Speech:
        with self.lock:
            lib = self.lib
            lib.espeak_SetSynthCallback(self._cb)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise AvatarForcingError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
            lib.espeak_SetParameter(PARAM_RANGE, int(pitch_range), 0)
            lib.espeak_SetParameter(PARAM_WORDGAP, int(word_gap), 0)
            self._chunks, self._events = [], []
            # espeak's noise sources draw from libc rand(): seed it from the request, so the same request
            # gives the same samples whatever the process did before
            key = f"{text}|{voice}|{rate}|{pitch}|{pitch_range}|{word_gap}".encode()
            self.libc.srand(int.from_bytes(hashlib.sha1(key).digest()[:4], "little"))
            data = text.encode("utf-8") + b"\0"
            buf = ctypes.create_string_buffer(data)
            lib.espeak_Synth(buf, len(data), 0, 0, 0, 0, None, None)  # espeakCHARS_AUTO, synchronous
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            ph = [(p, ms / 1000.0) for kind, p, ms in self._events if kind == EVENT_PHONEME]
            words = [(p, ms / 1000.0) for kind, p, ms in self._events if kind == EVENT_WORD]
            return Speech(samples, self.rate, ph, words)


_ENGINE: _Engine | None = None


def engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def synthesize(text: str, voice: str = "en", rate: int = 170, pitch: int = 50, pitch_range: int = 50,
               word_gap: int = 0) -> Speech:
    return engine().synth(text, voice, rate, pitch, pitch_range, word_gap)

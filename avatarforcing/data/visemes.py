"""Phonemes (espeak-ng mnemonics) -> visemes -> smooth per-frame mouth targets.

Each viseme has a target mouth shape: opening (0 closed .. 1 wide open), width (0 narrow .. 1 wide),
rounding (0 spread .. 1 rounded), teeth and tongue visibility. Coarticulation: the piecewise-constant
targets are smoothed with a Gaussian (sigma ``COARTICULATION_S``), so a mouth anticipates and carries
over neighbouring phonemes, as real speech does.
"""

from __future__ import annotations

import numpy as np

VISEMES = ["sil", "PBM", "FV", "TH", "DTN", "SZ", "KG", "CHJ", "L", "RW", "AA", "EH", "IY", "OW", "UW", "AH"]
# opening, width, rounding, teeth, tongue
TARGETS = np.array([
    [0.02, 0.50, 0.20, 0.0, 0.0],  # sil
    [0.00, 0.48, 0.25, 0.0, 0.0],  # PBM: lips closed
    [0.12, 0.55, 0.10, 1.0, 0.0],  # FV: lower lip to teeth
    [0.25, 0.55, 0.10, 1.0, 1.0],  # TH: tongue between teeth
    [0.28, 0.55, 0.15, 1.0, 0.3],  # DTN
    [0.18, 0.62, 0.05, 1.0, 0.0],  # SZ: teeth close, spread
    [0.42, 0.52, 0.20, 0.5, 0.0],  # KG
    [0.30, 0.38, 0.75, 1.0, 0.0],  # CH/SH/J: protruded
    [0.40, 0.52, 0.15, 0.7, 1.0],  # L: tongue tip up
    [0.20, 0.30, 0.90, 0.0, 0.0],  # R/W: rounded small
    [0.95, 0.62, 0.15, 0.6, 0.2],  # AA: wide open
    [0.60, 0.70, 0.05, 0.8, 0.1],  # EH
    [0.30, 0.82, 0.00, 1.0, 0.0],  # IY: spread
    [0.70, 0.38, 0.85, 0.2, 0.0],  # OW: rounded open
    [0.32, 0.28, 1.00, 0.0, 0.0],  # UW: rounded small
    [0.50, 0.55, 0.25, 0.4, 0.1],  # AH: schwa
], dtype=np.float64)
FIELDS = ["opening", "width", "rounding", "teeth", "tongue"]

_CONSONANTS = {
    "p": "PBM", "b": "PBM", "m": "PBM", "f": "FV", "v": "FV", "T": "TH", "D": "TH",
    "t": "DTN", "d": "DTN", "n": "DTN", "t#": "DTN", "d#": "DTN", "s": "SZ", "z": "SZ",
    "k": "KG", "g": "KG", "N": "KG", "x": "KG", "h": "KG", "S": "CHJ", "Z": "CHJ", "tS": "CHJ", "dZ": "CHJ",
    "l": "L", "L": "L", "r": "RW", "r-": "RW", "w": "RW", "j": "IY", "?": "sil",
}
_VOWELS = {
    "a": "AA", "a#": "AA", "A:": "AA", "A@": "AA", "aI": "AA", "aU": "AA", "A": "AA", "aa": "AA",
    "E": "EH", "e": "EH", "e@": "EH", "eI": "EH", "3": "AH", "3:": "AH", "@": "AH", "@2": "AH", "@5": "AH",
    "@L": "AH", "V": "AH", "a2": "AH", "i": "IY", "i:": "IY", "I": "IY", "I2": "IY", "I#": "IY", "i@": "IY",
    "I@": "IY", "0": "OW", "O:": "OW", "O": "OW", "oU": "OW", "o@": "OW", "O@": "OW", "OI": "OW", "o": "OW",
    "u:": "UW", "U": "UW", "U@": "UW", "u": "UW", "y": "UW",
}


def phoneme_to_viseme(ph: str) -> int:
    ph = ph.strip().rstrip(";")
    if not ph or ph.startswith("_"):
        return 0
    name = _CONSONANTS.get(ph) or _VOWELS.get(ph)
    if name is None:  # unknown mnemonic: fall back on its first character
        name = _CONSONANTS.get(ph[0]) or _VOWELS.get(ph[0]) or "AH"
    return VISEMES.index(name)


COARTICULATION_S = 0.025
RATE = 200  # Hz, internal timeline


def mouth_track(events: list[tuple[str, float, float]], duration: float, fps: int = 25):
    """events: (phoneme, start_s, end_s). Returns per-frame dict of arrays: viseme, opening, width, rounding,
    teeth, tongue, speaking (bool). Frame i is sampled at its centre (i + 0.5) / fps."""
    n = int(round(duration * RATE))
    vis = np.zeros(n, np.int64)
    for ph, a, b in events:
        i, j = int(a * RATE), int(b * RATE)
        vis[max(i, 0):min(j, n)] = phoneme_to_viseme(ph)
    targets = TARGETS[vis]  # [n, 5]
    k = int(4 * COARTICULATION_S * RATE)
    t = np.arange(-k, k + 1) / RATE
    g = np.exp(-0.5 * (t / COARTICULATION_S) ** 2)
    g /= g.sum()
    padded = np.pad(targets, ((k, k), (0, 0)), mode="edge")
    smooth = np.stack([np.convolve(padded[:, c], g, mode="valid") for c in range(targets.shape[1])], 1)
    frames = int(round(duration * fps))
    idx = np.clip(((np.arange(frames) + 0.5) / fps * RATE).astype(int), 0, n - 1)
    out = {name: smooth[idx, c].astype(np.float32) for c, name in enumerate(FIELDS)}
    out["viseme"] = vis[idx]
    out["speaking"] = vis[idx] != 0
    return out

"""Procedural talking heads: identity sampling, idle motion and an anti-aliased 2-D renderer (PIL).

Everything is drawn as polygons in face units (the face is about 1 wide), transformed by the head pose
(translation, rotation, scale about the neck), rasterised at ``supersample`` x the output size and box-
filtered down. One frame at 128x128 takes a few milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

MOUTH_INTERIOR = (70, 18, 30)
TEETH = (238, 236, 226)
TONGUE = (200, 90, 100)


@dataclass
class Identity:
    face_w: float
    face_h: float
    jaw: float  # 0 round .. 1 pointed chin
    skin: tuple[int, int, int]
    hair_style: int  # 0 bald, 1 short, 2 long, 3 bun, 4 spiky, 5 side part
    hair: tuple[int, int, int]
    hair_volume: float
    eye_size: float
    eye_spacing: float
    eye_y: float
    iris: tuple[int, int, int]
    brow_thick: float
    brow_angle: float
    nose_len: float
    nose_w: float
    lips: tuple[int, int, int]
    mouth_w: float
    mouth_y: float
    shirt: tuple[int, int, int]
    collar: int  # 0 round, 1 v-neck, 2 shirt collar
    bg_top: tuple[int, int, int]
    bg_bottom: tuple[int, int, int]
    glasses: bool
    ear_size: float

    def vector(self) -> np.ndarray:
        vals = []
        for v in asdict(self).values():
            vals.extend(v if isinstance(v, (tuple, list)) else [float(v)])
        return np.asarray(vals, np.float64)


def _rgb(rng, lo, hi) -> tuple[int, int, int]:
    return tuple(int(rng.uniform(a, b)) for a, b in zip(lo, hi))


SKINS = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 90), (160, 104, 66), (110, 70, 45),
         (250, 210, 180)]
HAIRS = [(20, 16, 14), (60, 40, 25), (110, 70, 35), (180, 140, 80), (220, 200, 150), (140, 50, 25),
         (120, 120, 125), (235, 235, 235), (50, 60, 120)]


def sample_identity(rng: np.random.Generator) -> Identity:
    base_skin = np.array(SKINS[rng.integers(len(SKINS))], float)
    skin = tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in base_skin)
    base_hair = np.array(HAIRS[rng.integers(len(HAIRS))], float)
    hair = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in base_hair)
    lips = tuple(int(np.clip(s * f, 0, 255)) for s, f in zip(skin, (0.80, 0.55, 0.58)))
    bg1 = _rgb(rng, (20, 20, 20), (235, 235, 235))
    bg2 = bg1 if rng.random() < 0.4 else _rgb(rng, (20, 20, 20), (235, 235, 235))
    return Identity(
        face_w=rng.uniform(0.82, 1.0), face_h=rng.uniform(1.12, 1.32), jaw=rng.uniform(0.0, 1.0), skin=skin,
        hair_style=int(rng.integers(6)), hair=hair, hair_volume=rng.uniform(0.05, 0.2),
        eye_size=rng.uniform(0.085, 0.13), eye_spacing=rng.uniform(0.34, 0.46), eye_y=rng.uniform(-0.14, -0.04),
        iris=_rgb(rng, (30, 30, 30), (140, 160, 170)), brow_thick=rng.uniform(0.025, 0.06),
        brow_angle=rng.uniform(-0.15, 0.2), nose_len=rng.uniform(0.14, 0.24), nose_w=rng.uniform(0.07, 0.13),
        lips=lips, mouth_w=rng.uniform(0.17, 0.25), mouth_y=rng.uniform(0.30, 0.38),
        shirt=_rgb(rng, (10, 10, 10), (245, 245, 245)), collar=int(rng.integers(3)), bg_top=bg1, bg_bottom=bg2,
        glasses=bool(rng.random() < 0.2), ear_size=rng.uniform(0.10, 0.16),
    )


@dataclass
class Motion:
    dx: np.ndarray
    dy: np.ndarray
    rot: np.ndarray
    scale: np.ndarray
    blink: np.ndarray  # 0 open .. 1 closed
    brow: np.ndarray  # 0 rest .. 1 raised


def _smooth_noise(rng, n, fps, period_s, amp):
    """Sum of a few random sinusoids with periods around ``period_s``: smooth idle motion."""
    t = np.arange(n) / fps
    out = np.zeros(n)
    for _ in range(3):
        p = period_s * rng.uniform(0.5, 1.6)
        out += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * t / p + rng.uniform(0, 2 * np.pi))
    return amp * out / 2.0


def sample_motion(rng: np.random.Generator, n: int, fps: int, speaking: np.ndarray | None = None) -> Motion:
    talk = np.zeros(n) if speaking is None else np.convolve(speaking.astype(float), np.ones(9) / 9, "same")
    blink = np.zeros(n)
    t = rng.uniform(0.5, 3.0)
    while t < n / fps:
        i = int(t * fps)
        for k, v in enumerate((0.5, 1.0, 0.7, 0.25)):  # ~160 ms blink
            if i + k < n:
                blink[i + k] = max(blink[i + k], v)
        t += rng.uniform(1.8, 5.5)
    brow = np.clip(_smooth_noise(rng, n, fps, 3.0, 0.5) + 0.5 * talk - 0.2, 0, 1)
    return Motion(
        dx=_smooth_noise(rng, n, fps, 4.0, 0.05), dy=_smooth_noise(rng, n, fps, 3.0, 0.03) + 0.01 * talk,
        rot=_smooth_noise(rng, n, fps, 5.0, 0.07) + 0.02 * talk * np.sin(np.arange(n) / 5.0),
        scale=1.0 + _smooth_noise(rng, n, fps, 6.0, 0.03), blink=blink, brow=brow,
    )


def _ellipse(cx, cy, rx, ry, n=28, start=0.0, stop=2 * np.pi):
    a = np.linspace(start, stop, n, endpoint=stop - start < 2 * np.pi - 1e-9)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


class Renderer:
    """Renders frames of one identity at ``size`` x ``size``."""

    def __init__(self, ident: Identity, size: int = 128, supersample: int = 2):
        self.id, self.size, self.ss = ident, size, supersample
        s = size * supersample
        top, bottom = np.array(ident.bg_top, float), np.array(ident.bg_bottom, float)
        ramp = np.linspace(0, 1, s)[:, None, None]
        self.background = Image.fromarray((top * (1 - ramp) + bottom * ramp).repeat(s, 1).astype(np.uint8))
        self.unit = 0.40 * s  # pixels per face unit
        self.centre = np.array([0.5 * s, 0.44 * s])

    def _tf(self, pts, pose) -> list[tuple[float, float]]:
        dx, dy, rot, scale = pose
        c, s = np.cos(rot), np.sin(rot)
        pivot = np.array([0.0, 0.9])  # neck: the head turns about it
        p = (pts - pivot) @ np.array([[c, s], [-s, c]]) * scale + pivot
        p = p * self.unit + self.centre + np.array([dx, dy]) * self.size * self.ss
        return [tuple(q) for q in p]

    def render(self, mouth: dict, pose=(0.0, 0.0, 0.0, 1.0), blink: float = 0.0, brow: float = 0.0) -> np.ndarray:
        idn = self.id
        img = self.background.copy()
        d = ImageDraw.Draw(img)
        body_pose = (pose[0] * 0.4, pose[1] * 0.3, 0.0, 1.0)
        # shoulders and neck
        shoulders = np.array([[-1.6, 2.2], [-1.5, 1.35], [-0.9, 1.0], [0.9, 1.0], [1.5, 1.35], [1.6, 2.2]])
        neck = np.array([[-0.22, 0.5], [0.22, 0.5], [0.25, 1.1], [-0.25, 1.1]])
        d.polygon(self._tf(neck, body_pose), fill=tuple(int(c * 0.88) for c in idn.skin))
        d.polygon(self._tf(shoulders, body_pose), fill=idn.shirt)
        dark_shirt = tuple(int(c * 0.7) for c in idn.shirt)
        if idn.collar == 0:
            d.polygon(self._tf(_ellipse(0, 1.0, 0.32, 0.12, 16, 0, np.pi), body_pose),
                      fill=tuple(int(c * 0.88) for c in idn.skin))
        elif idn.collar == 1:
            d.polygon(self._tf(np.array([[-0.3, 1.0], [0.3, 1.0], [0.0, 1.45]]), body_pose),
                      fill=tuple(int(c * 0.88) for c in idn.skin))
        else:
            for sgn in (-1, 1):
                d.polygon(self._tf(np.array([[0.0, 1.05], [sgn * 0.4, 0.95], [sgn * 0.3, 1.3]]), body_pose),
                          fill=dark_shirt)
        w, h = idn.face_w / 2, idn.face_h / 2
        # hair behind the head
        if idn.hair_style in (2, 3):
            back = _ellipse(0, -0.05, w + idn.hair_volume + 0.05, h + idn.hair_volume)
            if idn.hair_style == 2:
                back = np.concatenate([back[back[:, 1] < 0], [[w + 0.18, 0.85], [-w - 0.18, 0.85]]])
            d.polygon(self._tf(back, pose), fill=idn.hair)
            if idn.hair_style == 3:
                d.polygon(self._tf(_ellipse(0, -h - 0.12, 0.22, 0.16), pose), fill=idn.hair)
        # ears
        for sgn in (-1, 1):
            d.polygon(self._tf(_ellipse(sgn * (w - 0.02), 0.0, idn.ear_size * 0.6, idn.ear_size, 14), pose),
                      fill=tuple(int(c * 0.93) for c in idn.skin))
        # face: an ellipse whose lower half narrows towards the chin
        face = _ellipse(0, 0, w, h, 40)
        low = face[:, 1] > 0
        face[low, 0] *= 1 - idn.jaw * 0.35 * (face[low, 1] / h) ** 2
        d.polygon(self._tf(face, pose), fill=idn.skin)
        # hair on top
        if idn.hair_style != 0:
            top = _ellipse(0, -0.02, w + 0.04, h + idn.hair_volume * 0.6, 30, np.pi, 2 * np.pi)
            fringe_y = -h * (0.45 if idn.hair_style != 5 else 0.5)
            if idn.hair_style == 4:
                spikes = np.array([[x, fringe_y - 0.05 - 0.18 * ((i % 2) == 0)]
                                   for i, x in enumerate(np.linspace(w + 0.04, -w - 0.04, 9))])
                cap = np.concatenate([top, spikes])
            elif idn.hair_style == 5:
                cap = np.concatenate([top, [[w + 0.04, fringe_y], [-0.1, fringe_y - 0.15], [-w - 0.04, fringe_y]]])
            else:
                cap = np.concatenate([top, [[w + 0.04, fringe_y + 0.1], [0, fringe_y], [-w - 0.04, fringe_y + 0.1]]])
            d.polygon(self._tf(cap, pose), fill=idn.hair)
        # brows
        brow_dark = tuple(int(c * 0.6) for c in idn.hair) if idn.hair_style else tuple(int(c * 0.5) for c in idn.skin)
        ey = idn.eye_y
        for sgn in (-1, 1):
            bx = sgn * idn.eye_spacing / 2
            by = ey - idn.eye_size - 0.06 - 0.05 * brow
            inner, outer = bx - sgn * 0.09, bx + sgn * 0.1
            pts = np.array([[inner, by + idn.brow_angle * 0.1], [outer, by - idn.brow_angle * 0.1],
                            [outer, by - idn.brow_angle * 0.1 + idn.brow_thick],
                            [inner, by + idn.brow_angle * 0.1 + idn.brow_thick]])
            d.polygon(self._tf(pts, pose), fill=brow_dark)
        # eyes (eyelids close by squashing the eye)
        open_ = max(0.06, 1.0 - blink)
        for sgn in (-1, 1):
            ex = sgn * idn.eye_spacing / 2
            r = idn.eye_size
            d.polygon(self._tf(_ellipse(ex, ey, r, r * 0.62 * open_, 20), pose), fill=(248, 248, 248))
            if open_ > 0.3:
                d.polygon(self._tf(_ellipse(ex, ey, r * 0.5, r * 0.5 * min(1, open_ * 1.2), 16), pose), fill=idn.iris)
                d.polygon(self._tf(_ellipse(ex, ey, r * 0.22, r * 0.22 * open_, 10), pose), fill=(10, 10, 10))
            else:
                d.line(self._tf(np.array([[ex - r, ey], [ex + r, ey]]), pose), fill=brow_dark,
                       width=max(1, self.ss))
            if idn.glasses:
                d.line(self._tf(_ellipse(ex, ey, r * 1.5, r * 1.2, 20, 0, 2 * np.pi + 0.3), pose), fill=(30, 30, 30),
                       width=max(1, self.ss))
        # nose
        shade = tuple(int(c * 0.8) for c in idn.skin)
        ny = ey + 0.06
        nose = np.array([[0.0, ny], [idn.nose_w * 0.5, ny + idn.nose_len], [-idn.nose_w * 0.5, ny + idn.nose_len]])
        d.polygon(self._tf(nose, pose), fill=tuple(int(c * 0.9) for c in idn.skin))
        d.line(self._tf(np.array([[-idn.nose_w * 0.4, ny + idn.nose_len], [idn.nose_w * 0.4, ny + idn.nose_len]]),
                        pose), fill=shade, width=max(1, self.ss))
        self._mouth(d, mouth, pose)
        return np.asarray(img.reduce(self.ss))

    def _mouth(self, d: ImageDraw.ImageDraw, m: dict, pose) -> None:
        idn = self.id
        my = idn.mouth_y
        hw = idn.mouth_w * (0.7 + 0.6 * m["width"]) * (1 - 0.35 * m["rounding"])
        ho = 0.16 * m["opening"]
        lip = 0.035 + 0.02 * m["rounding"]
        d.polygon(self._tf(_ellipse(0, my, hw + lip * 0.6, ho + lip, 32), pose), fill=idn.lips)
        if ho < 0.012:  # closed: a lip line
            d.line(self._tf(np.array([[-hw, my], [hw, my]]), pose), fill=tuple(int(c * 0.6) for c in idn.lips),
                   width=max(1, self.ss))
            return
        inner = _ellipse(0, my, hw, ho, 32)
        d.polygon(self._tf(inner, pose), fill=MOUTH_INTERIOR)
        if m["teeth"] > 0.5:
            teeth = inner.copy()
            teeth[:, 1] = np.minimum(teeth[:, 1], my - ho + min(0.045, ho))
            d.polygon(self._tf(teeth, pose), fill=TEETH)
        if m["tongue"] > 0.5:
            tongue = _ellipse(0, my + ho * 0.5, hw * 0.55, ho * 0.55, 20)
            tongue[:, 1] = np.minimum(tongue[:, 1], my + ho * 0.95)
            d.polygon(self._tf(tongue, pose), fill=TONGUE)


def measure_mouth_opening(frame: np.ndarray) -> float:
    """Mouth opening measured from pixels: rows of the lower face holding mouth-interior, teeth or
    tongue colours (interior of the mouth), as a fraction of the frame height."""
    f = frame.astype(np.int32)
    h = f.shape[0]
    lower = f[int(0.45 * h): int(0.85 * h), int(0.25 * h): int(0.75 * h)]
    hits = np.zeros(lower.shape[:2], bool)
    for col in (MOUTH_INTERIOR, TONGUE):
        hits |= np.abs(lower - np.array(col)).sum(-1) < 40
    rows = hits.sum(1) >= 1
    return float(rows.sum()) / h

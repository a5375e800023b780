"""Image input: load a portrait (jpg/png/webp, EXIF orientation) and fit it to the model."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

ImageSource = str | Path | bytes | BinaryIO | Image.Image | np.ndarray


MAX_PIXELS = 25_000_000  # ~ a 6000 x 4000 photo; larger is refused before decoding
ROWS = 256  # rows converted at a time from a deep (16-bit, 32-bit, float) image


def to_8bit(img: Image.Image) -> Image.Image:
    """A deep image (16/32-bit integer or float, one channel) as 8-bit grey ("L"); any other image as it is.

    16-bit integers are scaled by 1/257 (32-bit ones too when they use more than 8 bits), floats in [0, 1] by 255.
    Converted ROWS rows at a time straight from PIL's pixels: no numpy copy of the whole source, and the result
    ("L", sharing the uint8 array) is the only full-size allocation."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    lo, hi = img.getextrema()  # PIL's own pass over its pixels: no copy
    div, mul = 1.0, 1.0
    if img.mode.startswith("I") and (img.mode.startswith("I;16") or hi > 255):
        div = 257.0
    elif img.mode == "F" and hi <= 1.0:
        mul = 255.0
    w, h = img.size
    out = np.empty((h, w), np.uint8)
    for i in range(0, h, ROWS):
        band = np.asarray(img.crop((0, i, w, min(h, i + ROWS))))  # a band of rows in its own dtype
        out[i:i + ROWS] = np.clip(np.round(band.astype(np.float64) / div * mul), 0, 255)
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. PIL's own ``convert("RGB")`` clips 16-bit and float pixels at 255 (a 16-bit
    grey PNG comes out nearly white) and drops alpha (whatever colour hides under transparent pixels shows):
    deep images go through ``to_8bit``, transparency is laid over white."""
    img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, exif_rotate: bool = True) -> Image.Image:
    """Return an RGB PIL image (``to_rgb``: deep and transparent images too), turned upright by its EXIF
    orientation unless ``exif_rotate`` is false (the published code reads the pixels as stored).

    The size is read from the file's header and checked against ``max_pixels`` before any pixel is decoded,
    so a small file that claims a huge image cannot allocate its size.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise InputError(f"image array must be uint8 [H, W, 3], got {source.dtype} {source.shape}")
        return Image.fromarray(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: image file not found")
        name, data = str(path), path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        name, data = "<image bytes>", bytes(source)
    elif hasattr(source, "read"):
        name, data = getattr(source, "name", "<image stream>"), source.read()
    else:
        raise InputError(f"expected an image path, bytes or array, got {type(source).__name__}")
    if not data:
        raise InputError(f"{name}: the image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise InputError(f"{name}: image is over the limit of {max_pixels / 1e6:.0f} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(f"{name}: not a readable image (expected jpg, png or webp)") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(f"{name}: image of {w}x{h} pixels is over the limit of {max_pixels / 1e6:.0f} megapixels")
    try:
        img.load()
        img = to_8bit(img)  # a deep source is released here, before the RGB copy is made
        if exif_rotate:
            ImageOps.exif_transpose(img, in_place=True)  # no copy of the whole image
        return to_rgb(img)
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError):
        raise InputError(f"{name}: the image data is damaged or truncated") from None


def fit_size(width: int, height: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """docs/design.md s2: keep aspect, scale down so area <= max_area, floor sides to ``multiple``."""
    scale = min(1.0, (max_area / (width * height)) ** 0.5)
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def prepare_image(
    img: Image.Image, height: int, width: int, mode: str = "fit", min_side: int = 64, name: str = "image",
    filter: str = "lanczos",
) -> np.ndarray:
    """Resize/crop for the model; returns float32 [3, H, W] in [-1, 1].

    mode "fit": the reference rules with the area cap height*width (output size follows the image aspect);
    mode "square": centre-square crop, resized to exactly height x width (the ``mini`` preset).
    filter: "lanczos", or "bilinear" (PIL's antialiased bilinear: what the release's torchvision resize of a
    PIL image runs).
    """
    if filter not in FILTERS:
        raise InputError(f"unknown image filter {filter!r}; expected one of {sorted(FILTERS)}")
    if min(img.size) < min_side:
        raise InputError(f"{name}: image is {img.size[0]}x{img.size[1]}, smaller than the {min_side}px "
                         f"the model needs on its shorter side")
    if mode == "square":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((width, height), FILTERS[filter])
    elif mode == "fit":
        w, h = fit_size(img.width, img.height, height * width)
        img = img.resize((w, h), FILTERS[filter])
    else:
        raise InputError(f"unknown image mode {mode!r}; expected 'fit' or 'square'")
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[-1, 1] float [..., 3, H, W] -> uint8 [..., H, W, 3]."""
    arr = np.clip((frames + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)

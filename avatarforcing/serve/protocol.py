"""The wire format of ``/ws`` in code (docs/protocol.md is its prose): what the server parses and sends, and
what the client reads. No web framework here, so the client and the CLI share it.

    client -> server   text  {"type": "start", ...}   parse_start -> StartRequest (every problem: ClientError)
                       bytes PCM (f32le | s16le)       decode_pcm  -> float32 samples
                       text  {"type": "end"}
    server -> client   text  ready / stats / done / error
                       bytes FRAME_HEADER (uint32 index, float64 seconds) + JPEG   frame_message / parse_frame
                       live: LIVE_FRAME_HEADER (index, pts, n) + n f32le PCM + JPEG   live_frame_message
    error code -> WebSocket close code                 close_code(code)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
from dataclasses import dataclass

import numpy as np

from ..identities import IDENTITIES, identity_image

FRAME_HEADER = struct.Struct("<Id")  # frame index (uint32), audio time of the frame in seconds (float64)
# live streams (protocol 2): frame index (uint32), pts in seconds (float64), PCM samples that follow (uint32);
# then the frame's PCM (float32 little-endian, the audio it shows), then the JPEG
LIVE_FRAME_HEADER = struct.Struct("<IdI")
PROTOCOL = 2  # 1: files and streams of speech ('end' drains); 2 adds live sessions (always on, interrupt)
FORMATS = {"f32le": ("<f4", 4), "s16le": ("<i2", 2)}  # PCM sample formats: numpy dtype, bytes per sample
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4000
CLOSE_CODES = {"busy": 1013, "shutdown": 1001, "internal": 1011}  # every other error code closes with 1008
HTTP_STATUS = {"too_large": 413, "unavailable": 503, "busy": 503}  # every other error code of an HTTP route is a 400


class ClientError(Exception):
    """A client's mistake or a limit: reported to that client with its code, never as 'internal'."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # it crosses process boundaries (the worker process)
        return ClientError, (self.code, str(self))


def close_code(code: str) -> int:
    """The WebSocket close code that follows an error frame with this code."""
    return CLOSE_CODES.get(code, 1008)


def show(value, limit: int = 40) -> str:
    """A client-supplied value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def bounded(message, limit: int = 300) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[:limit] + "..."


def error_message(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": bounded(message)})


def parse_json(text: str) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        raise ClientError("protocol", "JSON nested too deeply") from None
    except ValueError as e:
        raise ClientError("protocol", f"malformed JSON: {bounded(e, 100)}") from None


def decode_pcm(data: bytes, fmt: str) -> np.ndarray:
    """Raw PCM bytes -> float32 samples in [-1, 1); a partial sample or a non-finite value is a ``bad_audio``."""
    dtype, width = FORMATS[fmt]
    if len(data) % width:
        raise ClientError("bad_audio", f"audio message of {len(data)} bytes is not a whole number of {fmt} samples")
    raw = np.frombuffer(data, dtype)
    if fmt == "s16le":
        return raw.astype(np.float32) / 32768.0
    pcm = raw.astype(np.float32)
    if not np.isfinite(pcm).all():
        raise ClientError("bad_audio", "f32le audio contains NaN or infinite samples")
    return pcm


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def frame_message(index: int, fps: int, frame: np.ndarray, quality: int) -> bytes:
    """One binary frame message: the header (index, its audio time ``index / fps``) and the JPEG."""
    return FRAME_HEADER.pack(index, index / fps) + encode_jpeg(frame, quality)


def live_frame_message(index: int, pts: float, pcm: np.ndarray, frame: np.ndarray, quality: int) -> bytes:
    """One binary frame of a live stream: the header, the PCM the frame shows (f32le), the JPEG."""
    pcm = np.asarray(pcm, "<f4")
    return LIVE_FRAME_HEADER.pack(index, pts, len(pcm)) + pcm.tobytes() + encode_jpeg(frame, quality)


def parse_live_frame(data: bytes) -> tuple[int, float, np.ndarray, bytes]:
    """(index, pts, pcm, jpeg) of a live frame message."""
    index, pts, n = LIVE_FRAME_HEADER.unpack_from(data)
    at = LIVE_FRAME_HEADER.size
    pcm = np.frombuffer(data, "<f4", count=n, offset=at).astype(np.float32)
    return index, pts, pcm, data[at + 4 * n:]


@dataclass
class StartRequest:
    image: bytes | np.ndarray  # an uploaded file's bytes, or a built-in identity's pixels
    seed: int
    fmt: str
    prompt: str | None
    record: bool
    live: bool = False  # always on, paced by the server's clock (protocol 2)


def parse_start(text: str | None, sample_rate: int, height: int) -> StartRequest:
    """Validate the 'start' message for a model taking ``sample_rate`` Hz audio and ``height``-pixel frames;
    every problem is a ClientError naming the field."""
    if text is None:
        raise ClientError("protocol", "the first message must be a JSON 'start' message")
    start = parse_json(text)
    if not isinstance(start, dict) or start.get("type") != "start":
        raise ClientError("protocol", "expected {\"type\": \"start\", ...} first")
    rate = start.get("sample_rate", sample_rate)
    if type(rate) is not int or rate != sample_rate:
        raise ClientError("bad_audio", f"sample_rate {show(rate)}: this model takes {sample_rate} Hz mono PCM")
    fmt = start.get("format", "f32le")
    if fmt not in FORMATS:
        raise ClientError("bad_audio", f"format {show(fmt)}: expected 'f32le' or 's16le'")
    if "image" in start:
        if not isinstance(start["image"], str):
            raise ClientError("bad_image", "'image' must be a base64 string of a jpg/png/webp file")
        try:
            image = base64.b64decode(start["image"], validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("bad_image", "'image' must be base64 of a jpg/png/webp file") from None
    elif "identity" in start:
        name = start["identity"]
        if not isinstance(name, str) or name not in IDENTITIES:
            raise ClientError("bad_image", f"unknown identity {show(name)}; see /identities")
        image = identity_image(name, height)
    else:
        raise ClientError("protocol", "the start message needs 'image' (base64) or 'identity'")
    seed = start.get("seed", 0)
    if type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise ClientError("protocol", f"'seed' must be an integer in [0, 2^63 - 1], got {show(seed)}")
    prompt = start.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
        raise ClientError("bad_prompt", f"'prompt' must be a string of at most {MAX_PROMPT_CHARS} characters")
    record = start.get("record", False)
    if type(record) is not bool:
        raise ClientError("protocol", f"'record' must be true or false, got {show(record)}")
    live = start.get("live", False)
    if type(live) is not bool:
        raise ClientError("protocol", f"'live' must be true or false, got {show(live)}")
    if live and record:
        raise ClientError("protocol", "'record' is not available for live sessions")
    return StartRequest(image, seed, fmt, prompt, record, live)


LIVE_CONTROLS = ("end", "segment_end", "interrupt")


def parse_control(text: str, live: bool = False) -> str:
    """A text message after 'start': ``{"type": "end"}``; in a live stream also ``segment_end`` and
    ``interrupt``. Returns its type."""
    ctrl = parse_json(text)
    allowed = LIVE_CONTROLS if live else ("end",)
    if not isinstance(ctrl, dict) or ctrl.get("type") not in allowed:
        raise ClientError("protocol", f"unexpected message {show(ctrl)}; expected audio or one of {list(allowed)}")
    return ctrl["type"]

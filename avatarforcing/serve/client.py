"""A small Python client for the streaming server (docs/protocol.md)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME_HEADER = struct.Struct("<Id")


@dataclass
class Frame:
    index: int
    time_s: float  # the audio time this frame belongs to
    jpeg: bytes

    def image(self) -> np.ndarray:
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.jpeg)).convert("RGB"))


def start_message(image: str | Path | bytes | None = None, identity: str | None = None, seed: int = 0) -> str:
    msg: dict = {"type": "start", "sample_rate": 16000, "format": "f32le", "seed": seed}
    if identity:
        msg["identity"] = identity
    else:
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        msg["image"] = base64.b64encode(data).decode()
    return json.dumps(msg)


def parse_frame(data: bytes) -> Frame:
    idx, t = FRAME_HEADER.unpack_from(data)
    return Frame(idx, t, data[FRAME_HEADER.size:])


class AvatarClient:
    """``for frame in AvatarClient(url).stream(chunks, identity="demo"): ...`` (blocking, websockets)."""

    def __init__(self, url: str = "ws://127.0.0.1:8000/ws"):
        self.url = url
        self.stats: list[dict] = []
        self.ready: dict | None = None

    def stream(self, chunks: Iterable[np.ndarray], image=None, identity: str | None = None,
               seed: int = 0) -> Iterator[Frame]:
        from websockets.sync.client import connect

        with connect(self.url, max_size=None) as ws:
            ws.send(start_message(image, identity, seed))
            self.ready = json.loads(ws.recv())
            if self.ready.get("type") != "ready":
                raise RuntimeError(f"server refused the stream: {self.ready}")
            for chunk in chunks:
                ws.send(np.asarray(chunk, "<f4").tobytes())
                yield from self._drain(ws, timeout=0)
            ws.send(json.dumps({"type": "end"}))
            yield from self._drain(ws, timeout=None)

    def _drain(self, ws, timeout) -> Iterator[Frame]:
        while True:
            try:
                msg = ws.recv(timeout=timeout)
            except TimeoutError:
                return
            except Exception:  # noqa: BLE001 - closed after 'done'
                return
            if isinstance(msg, bytes):
                yield parse_frame(msg)
                continue
            m = json.loads(msg)
            if m["type"] == "stats":
                self.stats.append(m)
            elif m["type"] == "done":
                return
            elif m["type"] == "error":
                raise RuntimeError(f"server error {m['code']}: {m['message']}")

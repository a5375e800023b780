"""A small Python client for the streaming server (docs/protocol.md)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .protocol import FRAME_HEADER


@dataclass
class Frame:
    index: int
    time_s: float  # the audio time this frame belongs to
    jpeg: bytes

    def image(self) -> np.ndarray:
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.jpeg)).convert("RGB"))


class StreamError(RuntimeError):
    """The server ended the stream: an error frame (``code`` from docs/protocol.md), or a close without 'done'."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server error {code}: {message}")
        self.code = code


def start_message(image: str | Path | bytes | None = None, identity: str | None = None, seed: int = 0,
                  prompt: str | None = None, record: bool = False) -> str:
    msg: dict = {"type": "start", "sample_rate": 16000, "format": "f32le", "seed": seed}
    if prompt is not None:
        msg["prompt"] = prompt
    if record:
        msg["record"] = True
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
        self.done: dict | None = None  # the 'done' message (frames, recording)

    def stream(self, chunks: Iterable[np.ndarray], image=None, identity: str | None = None, seed: int = 0,
               prompt: str | None = None, record: bool = False) -> Iterator[Frame]:
        """Send the chunks (float32 16 kHz mono) and yield frames; raises ``StreamError`` if the stream does not
        end with 'done' (an error frame, or any close before it).

        Audio is sent from a thread while frames are read here, so neither direction waits for the other
        (a fast sender that the server slows down keeps reading its frames and answering pings).
        """
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        self.done = None
        with connect(self.url, max_size=None) as ws:
            try:
                ws.send(start_message(image, identity, seed, prompt, record))
            except ConnectionClosed:
                pass  # refused at once (busy): the error frame that came before the close is read next
            self.ready = self._message(ws)
            if self.ready.get("type") != "ready":
                raise StreamError(self.ready.get("code", "protocol"), self.ready.get("message", str(self.ready)))
            failure: list[BaseException] = []

            def sender() -> None:
                try:
                    for chunk in chunks:
                        ws.send(np.asarray(chunk, "<f4").tobytes())
                    ws.send(json.dumps({"type": "end"}))
                except BaseException as e:  # noqa: BLE001 - reported after the reader stops
                    failure.append(e)

            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            try:
                yield from self._drain(ws)
            finally:
                if self.done is None:
                    ws.close()
                thread.join()
            if failure and not isinstance(failure[0], Exception):
                raise failure[0]

    def _message(self, ws) -> dict:
        from websockets.exceptions import ConnectionClosed

        try:
            return json.loads(ws.recv())
        except ConnectionClosed as e:
            raise StreamError("closed", f"connection closed before 'ready' ({_close_text(e)})") from None

    def _drain(self, ws) -> Iterator[Frame]:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                msg = ws.recv()
            except ConnectionClosed as e:
                if self.done is not None:
                    return
                raise StreamError("closed", f"connection closed before the stream finished ({_close_text(e)})") \
                    from None
            if isinstance(msg, bytes):
                yield parse_frame(msg)
                continue
            m = json.loads(msg)
            if m["type"] == "stats":
                self.stats.append(m)
            elif m["type"] == "done":
                self.done = m
                return
            elif m["type"] == "error":
                raise StreamError(m["code"], m["message"])


def _close_text(e) -> str:
    rcvd = getattr(e, "rcvd", None)
    return f"close code {rcvd.code}: {rcvd.reason or 'no reason'}" if rcvd else "no close frame"

"""A small Python client for the streaming server (docs/protocol.md)."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .protocol import FRAME_HEADER, parse_live_frame


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
                  prompt: str | None = None, record: bool = False, live: bool = False) -> str:
    msg: dict = {"type": "start", "sample_rate": 16000, "format": "f32le", "seed": seed}
    if live:
        msg["live"] = True
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


@dataclass
class LiveFrame:
    index: int
    pts: float  # presentation time on the session's media clock, seconds
    pcm: np.ndarray  # float32: the audio this frame shows; play it with the frame
    jpeg: bytes
    received_at: float = 0.0  # time.monotonic() when it came off the socket

    def image(self) -> np.ndarray:
        return Frame(self.index, self.pts, self.jpeg).image()


class LiveClient:
    """A live session (protocol 2): the avatar is always on; send speech when there is some.

        with LiveClient(url, identity="demo") as live:
            live.send(pcm); live.segment_end()       # one utterance
            live.interrupt()                         # barge-in
            item = live.receive(timeout=1.0)         # a LiveFrame, or a dict ('state', 'playback_finished', ...)

    Frames and messages are read by a thread into a queue, so a slow caller never stalls the socket.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8000/ws", image=None, identity: str | None = None,
                 seed: int = 0, prompt: str | None = None):
        self.url, self.start = url, start_message(image, identity, seed, prompt, live=True)
        self.ready: dict | None = None
        self.items: queue.Queue = queue.Queue()
        self.ws = None

    def __enter__(self) -> LiveClient:
        from websockets.sync.client import connect

        self._connection = connect(self.url, max_size=None)
        self.ws = self._connection.__enter__()
        self.ws.send(self.start)
        self.ready = json.loads(self.ws.recv())
        if self.ready.get("type") != "ready":
            self._connection.__exit__(None, None, None)
            raise StreamError(self.ready.get("code", "protocol"), self.ready.get("message", str(self.ready)))
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._connection.__exit__(*exc)

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                msg = self.ws.recv()
                if isinstance(msg, bytes):
                    self.items.put(LiveFrame(*parse_live_frame(msg), received_at=time.monotonic()))
                else:
                    self.items.put(json.loads(msg))
        except ConnectionClosed:
            self.items.put({"type": "closed"})

    def send(self, pcm: np.ndarray) -> None:
        self.ws.send(np.asarray(pcm, "<f4").tobytes())

    def segment_end(self) -> None:
        self.ws.send(json.dumps({"type": "segment_end"}))

    def interrupt(self) -> None:
        self.ws.send(json.dumps({"type": "interrupt"}))

    def end(self) -> None:
        """Finish the session: the remaining frames, then 'done'."""
        self.ws.send(json.dumps({"type": "end"}))

    def receive(self, timeout: float | None = None):
        """The next frame or message (None after ``timeout`` seconds without one)."""
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            return None

"""Recorded sessions: MP4s kept for download, bounded in count and age, under unguessable tokens."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from .spec import Limits


class Recordings:
    """MP4s of recorded sessions, downloadable once ready; bounded in count and age."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.dir: Path | None = None
        self.ready: dict[str, tuple[Path, float]] = {}

    def new_path(self) -> tuple[str, Path]:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="avatarforcing-rec-"))
        token = secrets.token_urlsafe(16)
        return token, self.dir / f"{token}.mp4"

    def add(self, token: str, path: Path) -> None:
        self.ready[token] = (path, time.monotonic())
        self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        for token, (path, t) in sorted(self.ready.items(), key=lambda kv: kv[1][1]):
            if now - t > self.limits.recording_ttl_s or len(self.ready) > self.limits.recordings:
                self.ready.pop(token)
                path.unlink(missing_ok=True)

    def get(self, token: str) -> Path | None:
        self.sweep()
        item = self.ready.get(token)
        return item[0] if item else None

    async def fetch(self, token: str) -> bytes | None:
        """The MP4's bytes (a replicated deployment also looks in its shared store)."""
        path = self.get(token)
        return path.read_bytes() if path is not None and path.is_file() else None

    async def expire_forever(self) -> None:
        """Delete expired recordings as they expire, whether or not anyone asks for one."""
        while True:
            await asyncio.sleep(min(30.0, self.limits.recording_ttl_s / 2))
            self.sweep()

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

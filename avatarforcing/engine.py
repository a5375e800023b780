"""Many sessions, one model: every ready block of every session through one batched window step per round.

    run(sessions)                          offline or live sessions fed with audio (Session.feed)
      round 1: each session with a ready block gives its next block -> one push_together -> each decodes
      round 2: the sessions that still have a ready block ...          (a session catching up, a long push)
      ...      until no block is ready (or a session's ``max_blocks`` is reached)
    tick(lives, nows)                      live sessions: each clock advances (LiveSession.advance), then run

A round's batch is every session with a ready block: under ``reindexed`` the steady-state sessions share one
window pass and one clean pass (stream/batch.py), so the model runs once per round for all of them, whatever
their ages, identities, prompts and seeds. Each session's frames are what it would make alone (to float
rounding, tests/test_engine.py). ``batch=False`` steps every session alone (the unbatched baseline).

The engine is not thread-safe; a server gives it one thread (serve/engine.py).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from .session import STATS_KEPT, Session, _sync
from .stream.batch import push_together


class Engine:
    """Steps sessions of one ``api.Avatar`` together; keeps the latest rounds' batch sizes and step times."""

    def __init__(self, batch: bool = True):
        self.batch = batch
        self.rounds = 0  # batched steps so far (a round with k sessions counts once)
        self.blocks = 0  # session blocks stepped so far (k per such round)
        self.batch_sizes: deque[int] = deque(maxlen=STATS_KEPT)  # the latest rounds' batch sizes
        self.step_ms: deque[float] = deque(maxlen=STATS_KEPT)  # their model step times (decode not included)

    def run(self, sessions: list[Session], final: bool = False,
            max_blocks: list[int | None] | None = None) -> list[list[np.ndarray]]:
        """Every ready block of every session (at most ``max_blocks[i]`` of session i), batched per round; returns
        each session's frames (the lists ``Session.run`` would return)."""
        if len(set(map(id, sessions))) != len(sessions):
            raise ValueError("a session appears twice in one engine run")
        limit = max_blocks or [None] * len(sessions)
        out = [s.take_pending() for s in sessions]
        taken = [0] * len(sessions)
        while True:
            work = []
            for i, s in enumerate(sessions):
                if limit[i] is not None and taken[i] >= limit[i]:
                    continue
                rows = s.next_block(final)
                if rows is not None:
                    work.append((i, rows))
            if not work:
                return out
            for part in [work] if self.batch else [[w] for w in work]:
                t0 = time.perf_counter()
                with torch.no_grad():
                    latents = push_together([sessions[i].sampler for i, _ in part], [r for _, r in part])
                _sync(sessions[part[0][0]].avatar.device)
                dt = time.perf_counter() - t0
                self._count(len(part), dt)
                for i, _ in part:
                    taken[i] += 1
                    sessions[i].account(dt)
                decoded = self._decode([sessions[i] for i, _ in part], latents)
                for (i, _), frames in zip(part, decoded):
                    out[i] += frames

    def warm_up(self, avatar, sessions: int, image) -> None:
        """Run 1, 2, ..., ``sessions`` silent sessions of ``image`` together through every phase of a stream (the
        window filling, the steady state): a compiled engine specialises per shape, so a server compiles every
        batch it can meet before its first client rather than stalling every session when a new one joins."""
        c = avatar.cfg
        blocks = c.stream.window_blocks + 2
        seconds = blocks * c.stream.block_frames * c.codec.temporal_stride / c.codec.fps
        silence = np.zeros(int(seconds * c.codec.sample_rate) + avatar.front_end.lookahead_samples, np.float32)
        for n in range(1, sessions + 1):
            group = [avatar.session(image, seed=i) for i in range(n)]
            for s in group:
                s.feed(silence)
            self.run(group)

    def _decode(self, sessions: list[Session], latents: list[list]) -> list[list[np.ndarray]]:
        """Each session's emitted blocks as frames; one emitted block each, through one decoder call for all when
        their decoder type can (``decode_many``), else each through its own."""
        many = getattr(type(sessions[0].decoder), "decode_many", None)
        same = all(type(s.decoder) is type(sessions[0].decoder) for s in sessions)
        if not (self.batch and many and same and len(sessions) > 1 and all(len(lat) == 1 for lat in latents)
                and len({lat[0].shape for lat in latents}) == 1):
            return [s.decode(lat) for s, lat in zip(sessions, latents)]
        t0 = time.perf_counter()
        videos = many([s.decoder for s in sessions], [lat[0] for lat in latents])
        return [[s.decoded(v[0], t0)] for s, v in zip(sessions, videos)]

    def tick(self, lives: list, nows: list[float]) -> list[list]:
        """Advance each live session's clock to its ``now`` (seconds since it started), then step every block that
        became due, batched; returns each one's ``LiveFrame``s (what ``LiveSession.tick`` would return)."""
        for live, now in zip(lives, nows):
            live.advance(now)
        made = self.run([live.session for live in lives])
        return [live.emit(frames) for live, frames in zip(lives, made)]

    def _count(self, size: int, seconds: float) -> None:
        self.rounds += 1
        self.blocks += size
        self.batch_sizes.append(size)
        self.step_ms.append(1000 * seconds)

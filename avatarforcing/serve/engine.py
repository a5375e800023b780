"""The one place a serving process runs the model: a scheduler thread that steps every stream's due blocks
together (``engine.Engine``), live streams first.

    live session    attach(feed) once (feed.py: a WebSocket's or a WebRTC peer's); every tick the scheduler
                    applies its inbox (push, segment_end, interrupt), advances its clock and hands it (frames,
                    events, samples taken, interrupts applied) in its outbox; detach(feed); on 'end':
                    await drain(live) -> its last frames, the window drained one model step per iteration (between
                    the other streams' steps)
    offline stream  await push(session, pcm, t_start, client_s) -> frames: fed at once, then one of its blocks per
                    scheduler iteration, batched with everything else due; a stream whose audio came ahead of its
                    wall clock (sent faster than real time) only takes iterations no real-time stream needs
    anything else   await call(fn): runs in the scheduler thread between iterations

One iteration: every attached live stream's clock advances; every session with a ready block (live or
offline) gives one block, and they are stepped as one batched window step (``Engine.run``); the frames go out;
then the next iteration. It iterates every ``TICK_S`` while live streams are attached and back to back while
there is more to do (offline work, or a live session behind its clock: it catches up one block per step, its
frames flowing, rather than in one ever longer burst).
Live streams' clocks start on the scheduler's block grid (``start_time``), so their blocks fall due on the
same ticks and share one step. A live block therefore waits at most one iteration behind other work: an
offline stream takes one block per iteration (at most ``max_speedup`` x real time, its pacing), never a
whole push, so a faster-than-real-time neighbour cannot starve a real-time stream of the model.

``Limits.batch`` false steps every session alone (the unbatched baseline ``bench serve`` compares).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..engine import Engine
from .metrics import Metrics
from .spec import Limits

TICK_S = 0.04  # the scheduler's period while live streams are attached (one video frame at 25 fps)
BLOCKS = 1  # blocks of one session per iteration: frames flow every step, and nothing waits behind a whole push
log = logging.getLogger("avatarforcing.serve")


@dataclass
class _Push:
    session: object  # session.Session
    pcm: object
    future: asyncio.Future
    t_start: float  # the stream's start (monotonic)
    client_s: object  # () -> seconds of audio its client has sent so far (read from the socket, pushed or not)
    fed: bool = False
    done: bool = False  # no more of its blocks were ready
    frames: list = field(default_factory=list)


@dataclass
class _Drain:
    live: object  # a live.LiveSession (detached) or a session.Session: its end, one model step per iteration
    future: asyncio.Future
    frames: list = field(default_factory=list)
    error: Exception | None = None  # its own failure (handed to its stream alone)


@dataclass
class _Call:
    fn: object
    future: asyncio.Future


class Scheduler:
    """Owns the model's compute for one serving process (one ``Avatar``)."""

    def __init__(self, avatar, limits: Limits, metrics: Metrics):
        c = avatar.cfg
        self.block_s = c.stream.block_frames * c.codec.temporal_stride / c.codec.fps
        self.ahead_s = limits.push_seconds + self.block_s  # a client further ahead of the wall clock is not paced
        self.paced: dict[int, _Push] = {}  # every offline stream's latest push, by session (kept between pushes)
        self.step_s = 0.0  # a recent iteration's wall time (moving average): how long a spare step holds the model
        self.rate = c.codec.sample_rate
        self.engine = Engine(batch=limits.batch)
        self.metrics = metrics
        # torch's thread count is per thread (OpenMP): it is set in the model's own thread, where it applies
        threads = {} if limits.compute_threads is None else \
            {"initializer": torch.set_num_threads, "initargs": (limits.compute_threads,)}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="avatarforcing-engine", **threads)
        self.lives: list = []  # attached live feeds (feed.py) with their sessions
        self.pushes: list[_Push] = []
        self.calls: list[_Call] = []
        self.drains: list[_Drain] = []
        self.epoch: float | None = None  # the block grid's origin (monotonic seconds)
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    # ---------------------------------------------------------------- what streams call (event loop)

    def start_time(self) -> float:
        """The next point of the block grid (monotonic): a live stream's clock starts there."""
        now = time.monotonic()
        if self.epoch is None:
            self.epoch = now
        return self.epoch + math.ceil((now - self.epoch) / self.block_s) * self.block_s

    def attach(self, stream) -> None:
        """A live stream (serve/live.py, its session open) is stepped every tick until detached."""
        self.lives.append((stream, stream.live))  # its session, kept here: the stream drops it when it ends
        self._kick()

    def detach(self, stream) -> None:
        self.lives = [(s, live) for s, live in self.lives if s is not stream]

    async def push(self, session, pcm, t_start: float, client_s) -> list:
        """An offline stream's audio (the stream started at ``t_start``, monotonic; ``client_s()``: the seconds of
        audio its client has sent so far) -> the frames it made."""
        job = _Push(session, pcm, asyncio.get_running_loop().create_future(), t_start, client_s)
        self.paced[id(session)] = job
        self.pushes.append(job)
        self._kick()
        return await job.future

    async def drain(self, live) -> list:
        """A stream's end (a live session detached first, or an offline session): its last frames, made one model
        step per iteration (``close_step``), so the other streams wait at most one step for it, never the whole
        window."""
        job = _Drain(live, asyncio.get_running_loop().create_future())
        self.drains.append(job)
        self._kick()
        return await job.future

    async def call(self, fn):
        job = _Call(fn, asyncio.get_running_loop().create_future())
        self.calls.append(job)
        self._kick()
        return await job.future

    async def warm_up(self, avatar, sessions: int) -> None:
        """Before the first client: a compiled engine compiles every batch shape of 1..``sessions`` sessions."""
        if getattr(avatar.model, "engine_variant", "eager") == "eager":
            return
        sessions = sessions if self.engine.batch else 1  # unbatched, every step is a batch of one
        from ..identities import identity_image

        log.warning("compiling the %s engine for batches of 1..%d sessions (once per start; cached on disk)",
                    avatar.model.engine_variant, sessions)
        image = identity_image("demo", avatar.cfg.codec.height)
        await asyncio.get_running_loop().run_in_executor(self.pool, self.engine.warm_up, avatar, sessions, image)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- the loop (event loop side)

    def _kick(self) -> None:
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.lives or self.pushes or self.calls or self.drains:
            self.wake.clear()
            hold = self._hold_s(time.monotonic())
            if hold > 0:  # only spare work, and a real-time block is due before it would end: wait for that
                try:
                    await asyncio.wait_for(self.wake.wait(), hold)
                except TimeoutError:
                    pass
                continue
            t0 = time.monotonic()
            calls, self.calls = self.calls, []
            lives, pushes, drains = list(self.lives), list(self.pushes), list(self.drains)
            for job in calls:
                try:
                    result = await loop.run_in_executor(self.pool, job.fn)
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    _settle(job.future, error=e)
                else:
                    _settle(job.future, result)
            try:
                results, error, more = await loop.run_in_executor(self.pool, self._iteration, lives, pushes, drains)
            except Exception as e:  # noqa: BLE001 - a fault of the scheduler itself: every stream of it fails
                log.error("scheduler iteration failed", exc_info=e)
                results, error, more = [e] * len(lives), e, False
            self.step_s = 0.8 * self.step_s + 0.2 * (time.monotonic() - t0) if self.step_s else time.monotonic() - t0
            for (feed, _), out in zip(lives, results):
                feed.outbox.put_nowait(out)
            for job in pushes:
                if error is not None:
                    self.pushes.remove(job)
                    _settle(job.future, error=error)
                elif job.done:
                    self.pushes.remove(job)
                    _settle(job.future, job.frames)
            for job in drains:
                if error is not None or job.error is not None or job.live.closed:
                    self.drains.remove(job)
                    _settle(job.future, job.frames, job.error or error)
            if self.pushes or self.calls or self.drains or more:
                continue  # the next step starts now; the streams send these frames while it runs
            if self.lives:
                try:
                    await asyncio.wait_for(self.wake.wait(), max(0.0, TICK_S - (time.monotonic() - t0)))
                except TimeoutError:
                    pass

    def _ahead(self, job: _Push, now: float) -> bool:
        """Its client has sent audio ahead of the wall clock: by more than a push and a block (a paced client's
        chunk is not "ahead"). What the client sent counts, not what the model was given: a fast sender that only
        gets spare steps falls behind the wall clock."""
        return job.client_s() > now - job.t_start + self.ahead_s

    def _hold_s(self, now: float) -> float:
        """How long to hold back a spare step (only streams sent ahead of the wall clock have work): until the
        next block of a real-time offline stream is due, when that comes before the step would end. Steps are not
        preempted, so a spare step started just before a real-time block would delay it by a whole step, at every
        block (the paced stream then falls ever further behind). 0: go now."""
        for key, job in list(self.paced.items()):  # forget ended streams, and streams silent for a while
            if job.session.closed or now - job.t_start > job.client_s() + 2 * self.ahead_s:
                del self.paced[key]
        if self.lives or self.drains or self.calls or not self.pushes or not self.step_s or \
                not all(self._ahead(job, now) for job in self.pushes):
            return 0.0
        waiting = {id(job.session) for job in self.pushes}
        due = [self._due_in(job) for key, job in self.paced.items()
               if key not in waiting and not self._ahead(job, now)]
        hold = min(due, default=float("inf"))
        return max(hold, TICK_S / 4) if hold < self.step_s else 0.0

    def _due_in(self, job: _Push) -> float:
        """Seconds until a paced stream's client has sent the audio (and look-ahead) of its next block."""
        need = (job.session.blocks_in + 1) * self.block_s + job.session.lookahead_ms / 1000
        return need - job.client_s()

    # ---------------------------------------------------------------- one iteration (scheduler thread)

    def _iteration(self, lives: list, pushes: list[_Push], drains: list[_Drain] = ()) -> \
            tuple[list, Exception | None, bool]:
        """One round: at most one block of every session, one step of every draining one. Returns each live
        stream's (frames, events, samples taken, interrupts applied) or the exception it raised, an error that
        failed the whole step (handed to every push of it), and whether a live session may have more blocks due
        (it is behind: the next iteration follows at once)."""
        now = time.monotonic()
        prepared = []
        for feed, live in lives:
            try:
                prepared.append(feed.advance(live, now))
            except Exception as e:  # noqa: BLE001 - this stream's own failure, handed to it
                prepared.append(e)
        for job in pushes:
            if not job.fed:
                job.session.feed(job.pcm)
                job.fed, job.pcm = True, None
        live_ok = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        # real-time streams first: a stream whose client has sent audio ahead of the wall clock waits while any
        # live or real-time stream has a block ready, and takes the compute nobody else needs (``_hold_s``)
        # (a real-time block due before a step would end is as good as ready: see ``_hold_s``)
        ahead = [self._ahead(job, now) for job in pushes]
        urgent = any(lives[i][1].session.ready() for i in live_ok) or \
            any(job.session.ready() or self._due_in(job) < self.step_s for job, a in zip(pushes, ahead) if not a)
        pushes = [job for job, a in zip(pushes, ahead) if not (a and urgent)]
        sessions = [lives[i][1].session for i in live_ok] + [job.session for job in pushes]
        rounds = self.engine.rounds
        try:
            made = self.engine.run(sessions, max_blocks=[BLOCKS] * len(sessions))
        except Exception as e:  # noqa: BLE001 - fails every stream of the step
            return [e] * len(lives), e, False
        self._count(rounds)
        for job in drains:
            try:
                job.frames += job.live.close_step()
            except Exception as e:  # noqa: BLE001 - this stream's own failure, handed to it
                job.error = e
        # a slipping live session (live.py: compute behind its clock) has a block due as soon as these frames
        # leave its window: the next iteration commits and steps it at once
        more = any(s.ready() for s in sessions[:len(live_ok)]) or any(lives[i][1].slipping for i in live_ok)
        results: list = list(prepared)
        for i, frames in zip(live_ok, made):
            feed, live = lives[i]
            results[i] = (live.emit(frames), live.events(), prepared[i], feed.applied)
        for job, frames in zip(pushes, made[len(live_ok):]):
            job.frames += frames
            job.done = not job.session.ready()  # nothing more is ready: its frames go back now
        return results, None, more

    def _count(self, rounds_before: int) -> None:
        e, m = self.engine, self.metrics
        new = e.rounds - rounds_before
        if new:
            sizes, ms = list(e.batch_sizes)[-new:], list(e.step_ms)[-new:]
            m.add("engine_steps_total", new)
            m.add("engine_blocks_total", sum(sizes))
            m.values["engine_batch_size"] = sizes[-1]
            for t in ms:
                m.observe_step(t / 1000)


def _settle(future: asyncio.Future, result=None, error: Exception | None = None) -> None:
    if future.done():
        return  # its caller went away (cancelled)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

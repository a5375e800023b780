"""CPU work that is not a stream's: ``/speak`` (speech synthesis) and ``/prepare`` (decoding and fitting an
uploaded portrait) run in one worker process at the lowest priority (Linux's ``SCHED_IDLE``, and ``nice`` 10
elsewhere), one job at a time, so a flood of them takes the CPU only when the streams' model steps leave it
idle. The gates (admission.Gate) bound how many jobs may wait; the process bounds what the jobs may take. The
worker ends itself within ``WATCH_S`` once the server process is gone, however it went (stopped mid-job, killed).

At that priority a job gets next to nothing while the streams keep every core busy, and a job in a process
cannot be cancelled: so every job has a deadline (``Limits.job_timeout_s``). A job not done by then, or whose
worker died (killed for memory, crashed), is answered 503 ``unavailable`` ("retry later") and the worker is
killed; the next job starts a fresh one. Without it such a request waited for as long as the load lasted,
holding its place in the gate.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .protocol import ClientError

NICE = 10
WATCH_S = 0.5  # how often the worker checks that its server is still there


def _worker_start(server_pid: int) -> None:
    """In the worker: low priority, and a watchdog that ends the worker once the server is gone (a server killed
    or stopped mid-job must not leave its worker running, or idle, for ever)."""
    import threading
    import time

    os.nice(NICE)
    try:  # Linux: run only on a core nothing else wants (nice 10 still takes ~10% of a core from the model's
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # threads, and a parallel op waits for both)
    except (AttributeError, OSError):
        pass

    def watch() -> None:
        while os.getppid() == server_pid:
            time.sleep(WATCH_S)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="server-watchdog").start()


class Workers:
    """One low-priority worker process, started on first use; a job gets ``timeout_s`` (the worker's start
    included) or a ``ClientError('unavailable')``; ``close`` ends the worker."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.pool: ProcessPoolExecutor | None = None
        self.pid: int | None = None  # the worker's, once it has answered
        self.starting = asyncio.Lock()

    async def run(self, fn, *args):
        used = []  # the pool this job went to

        async def job():
            used.append(await self._pool())
            return await asyncio.get_running_loop().run_in_executor(used[0], fn, *args)

        try:
            return await asyncio.wait_for(job(), self.timeout_s)
        except TimeoutError:
            self.kill(used[0] if used else self.pool)
            raise ClientError("unavailable", f"the job did not finish within {self.timeout_s:g} s: the server's "
                                             "CPU is taken by its streams; retry later") from None
        except BrokenProcessPool:  # the worker died under this job or another one (killed, out of memory)
            self.kill(used[0])
            raise ClientError("unavailable", "the server's worker process ended; retry later") from None

    async def _pool(self) -> ProcessPoolExecutor:
        async with self.starting:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_start, initargs=(os.getpid(),))
                self.pid = await asyncio.get_running_loop().run_in_executor(self.pool, os.getpid)
            return self.pool

    def kill(self, pool: ProcessPoolExecutor | None) -> None:
        """End ``pool``'s worker now, whatever it is doing (its jobs fail with BrokenProcessPool); nothing if it
        was already replaced (a job queued behind a killed one must not kill the fresh worker)."""
        if pool is None or pool is not self.pool:
            return
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool, self.pid = None, None


def speak_wav(text: str, rate: int, max_seconds: float) -> bytes:
    """Text -> WAV bytes at ``rate`` (libespeak-ng), refused when longer than ``max_seconds``."""
    import soundfile as sf

    from ..data.audio import resample
    from ..data.speech import synthesize

    sp = synthesize(text)
    if len(sp.samples) > max_seconds * sp.rate:
        raise ClientError("too_large", f"that text makes {len(sp.samples) / sp.rate:.0f} s of speech; at most "
                                       f"{max_seconds:.0f} s")
    buf = io.BytesIO()
    sf.write(buf, resample(sp.samples, sp.rate, rate), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def prepared_png(data: bytes, max_pixels: int, exif_rotate: bool, height: int, width: int, mode: str,
                 image_filter: str) -> bytes:
    """An uploaded portrait -> PNG of the reference a model of that size takes (its crop and resize)."""
    from PIL import Image

    from ..data.image import load_image, prepare_image, to_uint8

    arr = prepare_image(load_image(data, max_pixels=max_pixels, exif_rotate=exif_rotate), height, width,
                        mode=mode, min_side=min(height, width) // 2, name="the portrait", filter=image_filter)
    buf = io.BytesIO()
    Image.fromarray(to_uint8(np.asarray(arr))).save(buf, format="PNG")
    return buf.getvalue()

"""The live avatar for voice-agent frameworks (avatarforcing/integrations): the asyncio driver and its seamless
resampler here; Pipecat and LiveKit in their own files (each skips where its extra is missing)."""

import asyncio

import numpy as np
import pytest

from avatarforcing.data.audio import resample
from avatarforcing.integrations.driver import LiveDriver, StreamResampler, float_to_s16, s16_to_float
from avatarforcing.live import LiveFrame, PlaybackFinished

from .conftest import tts_chunks


@pytest.mark.parametrize("rate_in", [24000, 48000, 44100, 8000])
def test_chunked_resampling_has_no_seams(rate_in):
    """Chunks of any size resampled one by one equal the whole signal resampled at once (a chunk-by-chunk
    resampler that zero-pads each chunk clicks at every boundary)."""
    rng = np.random.default_rng(0)
    t = np.arange(rate_in * 2) / rate_in
    x = (0.4 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    whole = resample(x, rate_in, 16000)
    r, out, i = StreamResampler(rate_in, 16000), [], 0
    for n in rng.integers(1, rate_in // 10, 200):
        out.append(r.push(x[i:i + n]))
        i += n
        if i >= len(x):
            break
    out.append(r.push(x[i:]))
    out.append(r.flush())
    y = np.concatenate(out)
    assert abs(len(y) - len(whole)) <= 1
    n = min(len(y), len(whole))
    np.testing.assert_allclose(y[:n - 64], whole[:n - 64], atol=1e-4)


def test_s16_round_trip_and_channels():
    pcm = np.array([0.0, 0.5, -0.5, 0.999], np.float32)
    np.testing.assert_allclose(s16_to_float(float_to_s16(pcm), 1), pcm, atol=1 / 32768)
    stereo = np.stack([pcm, -pcm], 1).reshape(-1)
    np.testing.assert_allclose(s16_to_float(float_to_s16(stereo), 2), 0.0, atol=1 / 32768)


def _drive(driver, actions, seconds):
    """Run the driver's clock for ``seconds`` (actions: {seconds: callable} fired on the way), then close it."""

    async def main():
        items, loop = [], asyncio.get_running_loop()
        t0 = loop.time()

        async def consume():
            async for item in driver.run():
                items.append(item)

        task = asyncio.ensure_future(consume())
        for at in sorted(actions):
            await asyncio.sleep(max(0.0, at - (loop.time() - t0)))
            actions[at]()
        await asyncio.sleep(max(0.0, seconds - (loop.time() - t0)))
        driver.close()
        await task
        return items

    return asyncio.run(main())


def test_the_driver_speaks_at_any_rate_and_finishes_the_segment(tiny_avatar):
    driver = LiveDriver(tiny_avatar, np.full((64, 64, 3), 128, np.uint8))

    def say():  # a TTS at 24 kHz, in 20 ms chunks
        for chunk in tts_chunks(1.0, 24000):
            driver.push(chunk, 24000)
        driver.end_segment()

    items = _drive(driver, {0.3: say}, 3.0)
    frames = [i for i in items if isinstance(i, LiveFrame)]
    assert [f.index for f in frames] == list(range(len(frames)))
    assert len(frames) >= 2.0 * 25  # the clock ran, listening before and after
    spoken = np.concatenate([f.pcm[f.pcm != 0] for f in frames if f.speaking])
    assert abs(len(spoken) - 16000) <= 2  # the whole utterance, once, at the model's rate
    finished = [i for i in items if isinstance(i, PlaybackFinished)]
    assert len(finished) == 1 and not finished[0].interrupted and finished[0].position_s == pytest.approx(1.0, abs=1e-3)


class _SlowLive:
    """A live session whose every tick takes ``step_s`` and makes one speaking frame (and a finished segment) until
    it is interrupted, then silent ones: the driver's side of an interrupt racing the compute, made deterministic."""

    fps, rate = 25, 16000

    def __init__(self, step_s=0.2):
        self.step_s, self.n, self.cut, self._events = step_s, 0, False, []

    def push(self, pcm):
        pass

    def end_segment(self):
        pass

    def interrupt(self):
        self.cut = True
        self._events.append(PlaybackFinished(0, 1.0, True))

    def tick(self, now):
        import time

        time.sleep(self.step_s)
        self.n += 1
        if not self.cut:
            self._events.append(PlaybackFinished(0, 1.0, False))
        return [LiveFrame(self.n, self.n / 25, np.zeros((4, 4, 3), np.uint8),
                          np.full(640, 0.0 if self.cut else 0.5, np.float32), not self.cut)]

    def events(self):
        out, self._events = self._events, []
        return out

    def close(self):
        return []


def test_an_interrupt_that_overtakes_a_step_silences_its_frames(tiny_avatar):
    """Frames made before the session got the interrupt but coming out after it was asked for carry no speech, and
    that step's end-of-segment is dropped (before: up to a tick of the dropped speech still came out, which LiveKit's
    runner played and counted as a new playback)."""
    driver = LiveDriver(tiny_avatar, None, tick_s=0.01)
    driver.live = _SlowLive()  # (open() keeps a session it has)
    got = []

    async def main():
        async def interrupt_mid_step():
            while len(got) < 4:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the next step is under way in the worker thread
            got.append("interrupt")
            driver.interrupt()
            await asyncio.sleep(0.6)
            driver.close()

        async def read():
            async for item in driver.run():
                got.append(item)

        await asyncio.gather(read(), interrupt_mid_step())

    asyncio.run(main())
    cut = got.index("interrupt")
    before, after = got[:cut], got[cut + 1:]
    assert any(isinstance(x, LiveFrame) and x.speaking for x in before)
    frames_after = [x for x in after if isinstance(x, LiveFrame)]
    assert frames_after and not any(f.speaking or f.pcm.any() for f in frames_after)
    finished_after = [x for x in after if isinstance(x, PlaybackFinished)]
    assert finished_after and all(e.interrupted for e in finished_after)


def test_the_pacer_hands_frames_on_at_their_time_and_moves_when_late():
    """Send times: the first frame's arrival plus the slack; then each frame at its pts on that timeline; a frame
    arriving after its time is sent at once and moves every later one by its lateness (never backwards)."""
    from avatarforcing.integrations.pacing import Pacer

    p = Pacer(slack_s=0.16)
    assert p.send_time(0.0, now=10.0) == pytest.approx(10.16)
    assert p.send_time(0.04, now=10.0) == pytest.approx(10.20)  # a block arrives at once: spread at 40 ms
    assert p.send_time(0.12, now=10.01) == pytest.approx(10.28)
    assert p.send_time(0.16, now=10.40) == pytest.approx(10.40)  # 80 ms late: now, and the timeline moves
    assert p.send_time(0.20, now=10.40) == pytest.approx(10.44)  # the next one 40 ms after it, not at 10.36
    assert p.send_time(0.24, now=10.30) == pytest.approx(10.48)  # early again: still on the moved timeline
    assert p.shift == pytest.approx(0.08)

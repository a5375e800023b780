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

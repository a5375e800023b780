"""The live avatar (avatarforcing/live.py): always on, a media clock, speech when it arrives, barge-in."""

import tracemalloc

import numpy as np
import pytest

from avatarforcing.api import Avatar
from avatarforcing.identities import identity_image

from .conftest import speech, tiny_cfg

FPS, SPF = 25, 640


@pytest.fixture(scope="module")
def tiny():
    return Avatar.random(tiny_cfg())


def _image():
    return (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)


def run(live, until_s, step_s=0.04, at=None):
    """Tick the clock from its current position to ``until_s``; ``at``: {time: callable(live)} fired on the way."""
    frames, t = [], getattr(live, "_test_clock", 0.0)
    at = dict(at or {})
    while t < until_s - 1e-9:
        t = round(t + step_s, 6)
        for when in sorted(k for k in at if k <= t):
            at.pop(when)(live)
        frames += live.tick(t)
    live._test_clock = t
    return frames


def test_listening_frames_follow_the_clock_with_no_audio(tiny):
    live = tiny.live(_image())
    block_s = 4 / FPS
    for t in np.arange(0.1, 6.0, 0.1):
        frames = run(live, t, step_s=0.1)
        if frames:
            assert frames[-1].pts <= t + 1e-9  # never ahead of the clock
        lag = t - live.frames / FPS  # media time not yet on a frame: the look-ahead plus at most one block
        assert lag <= live.lookahead_ms / 1000 + 2 * block_s + 1e-9, (t, live.frames)
        for f in frames:
            assert f.pts == f.index / FPS and not f.pcm.any() and not f.speaking and f.pcm.shape == (SPF,)
    assert live.frames >= 6.0 * FPS - (live.lookahead_ms / 1000 + 2 * block_s) * FPS


def test_speech_after_a_long_silence_is_spoken_and_every_frame_carries_its_pcm(tiny):
    live = tiny.live(_image())
    frames = run(live, 31.0, step_s=0.5)  # half a minute of listening
    utterance = speech(1.3)
    frames += run(live, 32.0, at={31.02: lambda lv: (lv.push(utterance[:9000]), lv.push(utterance[9000:]),
                                                     lv.end_segment())})
    frames += run(live, 34.0)
    assert [f.index for f in frames] == list(range(len(frames)))  # no frame lost or repeated
    pcm = np.concatenate([f.pcm for f in frames])
    start = round(31.04 * 16000)  # the first block boundary at or after the push (blocks of 160 ms)
    assert np.array_equal(pcm[start:start + len(utterance)], utterance)
    assert not pcm[:start].any() and not pcm[start + len(utterance):].any()
    speaking = [f.index for f in frames if f.speaking]
    assert speaking[0] == start // SPF and speaking[-1] == (start + len(utterance) - 1) // SPF
    finished = live.events()
    assert len(finished) == 1 and finished[0].position_s == pytest.approx(1.3) and not finished[0].interrupted


def test_bursts_within_the_grace_stay_contiguous_longer_gaps_become_silence(tiny):
    live = tiny.live(_image(), grace_ms=160)
    a, b, c = speech(0.5) + 0.01, speech(0.5)[::-1] + 0.02, speech(0.3) + 0.03  # no zero sample in them
    events = {1.0: lambda lv: lv.push(a),
              1.56: lambda lv: lv.push(b),  # arrives 60 ms after `a` has run out: within the grace
              2.6: lambda lv: (lv.push(c), lv.end_segment())}  # after a gap longer than the grace
    frames = run(live, 5.0, step_s=0.02, at=events)
    pcm = np.concatenate([f.pcm for f in frames])
    s = round(1.12 * 16000)  # block boundary after 1.0 s
    assert np.array_equal(pcm[s:s + len(a) + len(b)], np.concatenate([a, b]))
    rest = pcm[s + len(a) + len(b):]
    gap = np.flatnonzero(rest)[0]
    assert gap >= 0.16 * 16000 and np.array_equal(rest[gap:gap + len(c)], c)
    (done,) = live.events()
    assert done.position_s == pytest.approx((len(a) + len(b) + gap + len(c)) / 16000)


@pytest.fixture(scope="module")
def mini():
    return Avatar.load("mini")


def test_interrupt_drops_the_speech_and_the_mouth_settles(mini):
    from avatarforcing.eval.metrics import mouth_readings
    from avatarforcing.eval.nets import load_eval_nets

    pcm = mini.load_audio("avatarforcing/assets/demo/utterance.wav")[:16000 * 6]
    live = mini.live(identity_image("demo", 128))
    cut = {}

    def interrupt(lv):
        cut["frame"] = lv.frames
        lv.interrupt()

    frames = run(live, 8.0, step_s=0.04, at={2.0: lambda lv: (lv.push(pcm), lv.end_segment()), 4.5: interrupt})
    after = [f for f in frames if f.index >= cut["frame"]]
    assert not any(f.pcm.any() or f.speaking for f in after)  # no frame after the cut carries the dropped speech
    (event,) = live.events()
    spoken = sum(f.speaking for f in frames)
    assert event.interrupted and event.position_s == pytest.approx(spoken * SPF / 16000, abs=SPF / 16000)
    assert 1.0 < event.position_s < 2.5

    opening = mouth_readings(load_eval_nets(), np.stack([f.image for f in frames]))[0][:, 0]
    listening = opening[10:40]  # frames 0.4-1.6 s, before any speech
    speaking = opening[[f.index for f in frames if f.speaking]]
    assert speaking.mean() > listening.mean() + 0.05  # the speech did move the mouth
    bound = cut["frame"] + round(live.lookahead_ms / 1000 * FPS) + 4  # the look-ahead plus one block
    settled = opening[bound:]
    assert len(settled) > 25 and abs(settled.mean() - listening.mean()) < 0.05
    assert np.abs(settled - listening.mean()).max() < max(0.1, 4 * listening.std())


def _ours() -> int:
    """Bytes held by allocations made in the package's code (other threads of the test process, e.g. servers
    left by earlier tests, allocate too)."""
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/avatarforcing/*")])
    return sum(stat.size for stat in snap.statistics("filename"))


def test_a_live_session_holds_constant_memory(tiny):
    """The short form of the soak run (benchmarks: `avatarforcing bench live --soak-minutes 60`): a simulated
    minute and a half of speech bursts and silence (the first half minute warms up), no frame lost, nothing
    grows."""
    live = tiny.live(_image())
    utterance = speech(2.0)
    total = 0

    def cycles(start_s, utterances):
        nonlocal total
        for k in range(utterances):  # a 2 s utterance in every 5 s
            t0 = start_s + k * 5
            run_frames = run(live, t0 + 0.1, step_s=0.5)
            total += len(run_frames)
            live.push(utterance)
            live.end_segment()
            total += len(run(live, t0 + 5.0, step_s=0.5))
            live.events()

    cycles(0, 6)  # half a minute of warm-up
    tracemalloc.start()
    before = _ours()
    cycles(30, 12)
    grown = _ours() - before
    tracemalloc.stop()
    assert grown < 200_000, grown  # bytes of Python objects over a simulated minute (375 blocks)
    assert total == live.frames and live.frames >= 90 * FPS - 2 * FPS
    assert len(live.timeline) <= 8 * 4 * SPF and len(live.session.stats.dit_ms) <= 1000


class _FakeSession:
    """The engine's Session contract as LiveSession uses it (feed blocks; run -> their frames, delayed by a
    look-ahead of one block; mute; close), with no model: an hour of the live session's own bookkeeping runs in
    seconds."""

    lookahead_ms = 160.0

    def __init__(self):
        self.fed, self.done, self.frame = 0, 0, np.zeros((4, 8, 8, 3), np.uint8)

    def feed(self, pcm):
        self.fed += 1

    def run(self):
        ready = max(self.fed - 1, 0)
        out = [self.frame] * (ready - self.done)
        self.done = ready
        return out

    def close(self):
        return [self.frame]

    def mute(self, start):
        pass


class _FakeAvatar:
    def __init__(self):
        self.cfg = tiny_cfg()

    @property
    def framing(self):
        from avatarforcing.api import Framing

        return Framing(False, SPF)

    def session(self, *a, **kw):
        return _FakeSession()


def test_an_hour_of_live_bookkeeping_is_bounded():
    """A simulated hour (30 s cycles: 5 s speech, 25 s silence; every 4th utterance interrupted): no frame lost,
    the buffers and the Python heap do not grow with the hour."""
    from avatarforcing.live import LiveSession

    live = LiveSession(_FakeAvatar(), None)
    utterance = np.full(5 * 16000, 0.1, np.float32)
    frames = 0
    tracemalloc.start()
    base = None
    for cycle in range(120):
        t0 = cycle * 30.0
        live.push(utterance)
        live.end_segment()
        for k in range(1, 31 * 5):
            t = t0 + 0.2 * k
            if t > t0 + 30:
                break
            frames += len(live.tick(t))
            if cycle % 4 == 3 and abs(t - t0 - 2.0) < 1e-9:
                live.interrupt()
        live.events()
        if cycle == 10:
            base = _ours()
    grown = _ours() - base
    tracemalloc.stop()
    assert frames == live.frames and live.frames >= 3600 * FPS - 2 * FPS
    assert grown < 50_000, grown
    assert len(live.timeline) <= 3 * 4 * SPF and not live.segments and not live.queue


class _SlowSession(_FakeSession):
    """Compute slower than real time, while ``slow``: blocks take ``times`` (cycled) seconds of the test's clock
    (``now``)."""

    def __init__(self, times=(0.32,)):
        super().__init__()
        self.now, self.busy_until, self.slow, self.times, self.made = 0.0, 0.0, True, times, 0

    def run(self):
        if not self.slow:
            return super().run()
        if self.now < self.busy_until or self.done >= self.fed - 1:
            return []
        took = self.times[self.made % len(self.times)]
        self.busy_until = max(self.busy_until, self.now - took) + took
        self.done += 1
        self.made += 1
        return [self.frame]


def _slow_live(times, max_behind_ms=480):
    from avatarforcing.live import LiveSession

    avatar = _FakeAvatar()
    avatar.session = lambda *a, **kw: _SlowSession(times)
    return LiveSession(avatar, None, max_behind_ms=max_behind_ms)


def test_a_clock_that_compute_cannot_keep_slips_and_stays_bounded():
    """On a machine at half real time the clock commits at most max_behind beyond what the window needs, then
    only what the window needs, each block when compute has room for it: the delay stays bounded instead of
    growing for ever, no frame or sample of speech is lost, and each frame's due_s carries the slip (its pts plus
    the clock's wait when its block was committed). When compute is ahead again the clock is back on the block
    grid and catches up short stalls without slipping."""
    live = _slow_live((0.32,))  # half real time
    block_s, frames, worst = 4 / FPS, [], 0
    utterance = np.linspace(0.1, 0.5, 3 * 16000, dtype=np.float32)
    for k in range(1, 60 * 1000 // 30):  # a tick every 30 ms (off the block grid) for a minute
        t = live.session.now = k * 0.03
        if k == 1000:
            live.push(utterance)
            live.end_segment()
        frames += live.tick(t)
        assert len(live.timeline) <= live.max_in_flight == 6 * 4 * SPF  # 2 + 1 + 480 / 160 blocks
        if frames:  # how far behind the clock, after the catch-up allowance is spent (the first 10 s)
            worst = max(worst, t - frames[-1].due_s) if t > 10 else 0
    assert [f.index for f in frames] == list(range(len(frames)))
    assert 0.45 * 60 * FPS < len(frames) < 0.55 * 60 * FPS  # compute's pace, not the clock's
    slips = np.array([f.due_s - f.pts for f in frames])
    assert slips[0] == 0 and slips[-1] > 25 and (np.diff(slips) > -1e-9).all()
    # then behind the clock by what the window needs (3 blocks) over compute's speed (1/2), and a block at most
    assert worst <= 3 * block_s / 0.5 + block_s + 1e-6, worst
    pcm = np.concatenate([f.pcm for f in frames])
    nz = np.flatnonzero(pcm)
    assert np.array_equal(pcm[nz[0]:nz[0] + len(utterance)], utterance) and len(nz) == len(utterance)
    assert [e.interrupted for e in live.events()] == [False]
    # compute at full speed again: the clock keeps time on the block grid, and a stall within max_behind is
    # caught up, not slipped
    live.session.slow = False
    for k in range(25):
        t += block_s
        live.tick(t)
        if k == 10:  # (ready early for three blocks in a row: back on the grid)
            slipped = live.slipped_s
    assert not live.slipping and live.slipped_s == slipped
    assert live.slipped_s / block_s == pytest.approx(round(live.slipped_s / block_s))  # a whole number of blocks
    n = live.frames
    t += 0.4  # a 400 ms stall
    burst = live.tick(t)
    assert len(burst) >= 0.4 * FPS and live.slipped_s == slipped and live.frames == n + len(burst)


def test_a_compute_now_and_then_faster_than_the_clock_keeps_slipping_when_slower_on_average():
    """Blocks of 120 and 240 ms by turns (90% of real time): compute is sometimes ready before the clock, but the
    catch-up allowance comes back only after max_behind worth of blocks ready early in a row, so the delay stays
    at what the window needs (over compute's speed), never growing back to the allowance."""
    live = _slow_live((0.12, 0.24))
    frames, worst = [], 0
    for k in range(1, 60 * 1000 // 30):
        t = live.session.now = k * 0.03
        frames += live.tick(t)
        if frames and t > 10:
            worst = max(worst, t - frames[-1].due_s)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert 0.85 * 60 * FPS < len(frames) < 0.95 * 60 * FPS
    # behind the session's clock: what the window needs (3 blocks) at 90% of real time, and a block at most
    assert worst <= 3 * 0.16 / 0.9 + 0.16, worst

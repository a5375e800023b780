"""Many live sessions stepped by one engine (avatarforcing/engine.py): each session's frames and PCM are what it
makes alone, whoever joins or leaves; one model step per tick for all of them."""

import asyncio

import numpy as np
import pytest
import torch

from avatarforcing.api import Avatar
from avatarforcing.engine import Engine

from .conftest import speech, tiny_cfg

BLOCK_S = 4 / 25
TICK_S = 0.04


def _image(seed):
    return (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)


# session i: joins at tick `join` (on the block grid), leaves at tick `leave`; speech pushed at tick `say`,
# interrupted at tick `cut` (or never)
PLAN = [dict(join=0, leave=100, say=10, cut=None), dict(join=8, leave=90, say=20, cut=40),
        dict(join=24, leave=110, say=30, cut=None), dict(join=44, leave=80, say=50, cut=70)]


def _script(live, i, tick, utterances):
    p = PLAN[i]
    if tick == p["say"]:
        live.push(utterances[i])
        live.end_segment()
    if tick == p["cut"]:
        live.interrupt()


def _drive(avatar, batched: bool):
    utterances = [speech(1.0 + 0.3 * i) * (0.5 + 0.2 * i) for i in range(len(PLAN))]
    engine = Engine(batch=True)
    lives, frames = {}, [[] for _ in PLAN]
    steady = None
    for tick in range(max(p["leave"] for p in PLAN)):
        for i, p in enumerate(PLAN):
            if tick == p["join"]:
                lives[i] = avatar.live(_image(i), seed=10 + i)
            if i in lives:
                _script(lives[i], i, tick, utterances)
        now = {i: (tick + 1 - PLAN[i]["join"]) * TICK_S for i in lives}
        if batched:
            ids = sorted(lives)
            for i, out in zip(ids, engine.tick([lives[i] for i in ids], [now[i] for i in ids])):
                frames[i] += out
        else:
            for i in sorted(lives):
                frames[i] += lives[i].tick(now[i])
        if tick == 70:
            steady = (engine.rounds, engine.blocks)
        for i, p in enumerate(PLAN):
            if tick == p["leave"] - 1:
                frames[i] += lives.pop(i).close()
    return frames, engine, steady


@pytest.mark.parametrize("scheme", ["reindexed", "release"])
def test_live_sessions_in_one_engine_equal_each_alone(scheme):
    avatar = Avatar.random(tiny_cfg(positions=scheme))
    alone, _, _ = _drive(avatar, batched=False)
    together, engine, steady = _drive(avatar, batched=True)
    for a, b in zip(alone, together):
        assert len(a) == len(b) > 0
        assert [f.index for f in b] == list(range(len(b)))
        for fa, fb in zip(a, b):
            assert fa.pts == fb.pts and fa.speaking == fb.speaking
            np.testing.assert_array_equal(fa.pcm, fb.pcm)
            assert np.abs(fa.image.astype(int) - fb.image.astype(int)).max() <= 1
        assert any(f.speaking for f in b)
    # between ticks 44 and 80 all four run, joined on the block grid: their blocks are due on the same ticks,
    # so the engine ran one batched step per due tick for all four
    rounds, blocks = steady
    assert engine.blocks > engine.rounds
    assert max(engine.batch_sizes) == 4


def test_engine_rounds_during_the_steady_phase_carry_every_session():
    avatar = Avatar.random(tiny_cfg())
    engine = Engine()
    lives = [avatar.live(_image(i), seed=i) for i in range(3)]
    t = 0.0
    for _ in range(30):
        t += TICK_S
        engine.tick(lives, [t] * 3)
    r0, b0 = engine.rounds, engine.blocks
    for _ in range(20):  # 20 ticks = 5 blocks each
        t += TICK_S
        engine.tick(lives, [t] * 3)
    assert engine.rounds - r0 == 5 and engine.blocks - b0 == 15
    unbatched = Engine(batch=False)
    unbatched.tick(lives, [t + BLOCK_S] * 3)
    assert unbatched.rounds == unbatched.blocks == 3


def test_warm_up_meets_every_batch_size_and_phase():
    """A compiled engine specialises per shape: the warm-up runs batches of 1..K through the window filling and
    the steady state (the sizes the server can meet), each in one step per round."""
    avatar = Avatar.random(tiny_cfg())
    engine = Engine()
    engine.warm_up(avatar, 3, _image(0))
    L = avatar.cfg.stream.window_blocks
    sizes = list(engine.batch_sizes)
    assert sizes.count(1) >= L + 1 and sizes.count(2) >= L + 1 and sizes.count(3) >= L + 1
    assert max(sizes) == 3


def test_the_scheduler_serves_real_time_streams_first():
    """A stream whose client sent audio far ahead of the wall clock waits while a real-time stream has a block
    ready; it takes the iterations nobody else needs."""
    import time

    from avatarforcing.serve.engine import Scheduler, _Push
    from avatarforcing.serve.metrics import Metrics
    from avatarforcing.serve.spec import Limits

    avatar = Avatar.random(tiny_cfg())
    sched = Scheduler(avatar, Limits(), Metrics())
    now = time.monotonic()
    fast, paced = avatar.session(_image(0), seed=0), avatar.session(_image(1), seed=1)
    fast_job = _Push(fast, speech(20.0), None, t_start=now - 1.0, client_s=lambda: 20.0)  # 20 s one second in
    paced_job = _Push(paced, speech(1.5), None, t_start=now - 1.5, client_s=lambda: 1.5)  # as much as wall time
    sched._iteration([], [fast_job, paced_job])
    assert paced.blocks_in == 1 and fast.blocks_in == 0  # the real-time stream's block went alone
    while paced.ready():
        sched._iteration([], [fast_job, paced_job])
    assert fast.blocks_in == 0
    sched._iteration([], [fast_job, paced_job])  # nothing real-time is ready: the spare step is the fast one's
    assert fast.blocks_in == 1
    sched.close()


def test_a_fast_sender_behind_the_clock_is_still_not_real_time():
    """A client that sent a minute of audio at once, whose stream only got spare steps so far: the model has been
    given less audio than the wall clock (it fell behind), but its client is far ahead, so it still waits while a
    paced stream has a block ready (judged by what the model was given, it took half of every step)."""
    import time

    from avatarforcing.serve.engine import Scheduler, _Push
    from avatarforcing.serve.metrics import Metrics
    from avatarforcing.serve.spec import Limits

    avatar = Avatar.random(tiny_cfg())
    sched = Scheduler(avatar, Limits(), Metrics())
    now = time.monotonic()
    fast, paced = avatar.session(_image(0), seed=0), avatar.session(_image(1), seed=1)
    fast_job = _Push(fast, speech(1.0), None, t_start=now - 5.0, client_s=lambda: 60.0)  # 1 s given, 5 s in
    paced_job = _Push(paced, speech(1.5), None, t_start=now - 1.5, client_s=lambda: 1.5)
    while paced.ready() or not paced_job.fed:
        sched._iteration([], [fast_job, paced_job])
    assert fast.blocks_in == 0 and paced.blocks_in > 0
    sched.close()


def test_a_spare_step_waits_for_a_real_time_block_due_before_it_would_end():
    """Steps are not preempted: a spare step (only a fast sender has work) started just before a paced stream's
    next block delays that block by a whole step, at every block. The scheduler holds it back until the block
    is due when it would come before the step ends, and lets it go when there is time for it."""
    import time

    from avatarforcing.serve.engine import Scheduler, _Push
    from avatarforcing.serve.metrics import Metrics
    from avatarforcing.serve.spec import Limits

    avatar = Avatar.random(tiny_cfg())
    sched = Scheduler(avatar, Limits(), Metrics())
    now = time.monotonic()
    fast, paced = avatar.session(_image(0), seed=0), avatar.session(_image(1), seed=1)
    look = paced.lookahead_ms / 1000
    due_s = {"paced": 0.03}  # its client will have sent its next block's audio in 30 ms
    paced_sent = lambda: sched.block_s + look - due_s["paced"]  # noqa: E731
    paced_job = _Push(paced, None, None, t_start=now - paced_sent(), client_s=paced_sent)
    fast_job = _Push(fast, speech(2.0), None, t_start=now - 1.0, client_s=lambda: 60.0)
    sched.step_s = 0.1  # a step takes 100 ms
    assert sched._hold_s(now) == 0.0  # nothing pending
    sched.pushes, sched.paced = [fast_job], {id(paced): paced_job}
    assert sched._hold_s(now) == pytest.approx(0.03, abs=1e-3)  # held until the paced block is due
    due_s["paced"] = 0.5
    assert sched._hold_s(now) == 0.0  # time enough for a spare step
    due_s["paced"] = -0.02  # its audio came, its push is on its way: a short hold, then again
    assert 0 < sched._hold_s(now) <= 0.02
    sched.pushes = [fast_job, paced_job]
    assert sched._hold_s(now) == 0.0  # a real-time push waits: the iteration goes (and takes it first)
    due_s["paced"], paced_job.pcm = 0.03, speech(0.01)  # a push without a whole block: fed, and the fast one
    sched._iteration([], [fast_job, paced_job])  # does not take the step (the paced block is due before its end)
    assert fast.blocks_in == 0 and paced_job.fed
    sched.pushes, paced.closed = [fast_job], True
    assert sched._hold_s(now) == 0.0 and not sched.paced  # an ended stream holds nothing back
    sched.close()


def test_compute_threads_apply_in_the_models_own_thread():
    """torch's thread count is per thread: set in the caller's it would not reach the scheduler's."""
    from avatarforcing.serve.engine import Scheduler
    from avatarforcing.serve.metrics import Metrics
    from avatarforcing.serve.spec import Limits

    avatar = Avatar.random(tiny_cfg())

    async def threads(n):
        s = Scheduler(avatar, Limits(compute_threads=n), Metrics())
        try:
            return await s.call(torch.get_num_threads)
        finally:
            s.close()

    for n in (1, 2):
        assert asyncio.run(threads(n)) == n


def test_a_drain_takes_one_model_step_per_iteration_and_equals_close():
    """A stream's end drains its window between the other streams' steps (one step of it per iteration), and
    its last frames are what ``close`` makes."""
    import time

    from avatarforcing.serve.engine import Scheduler, _Drain
    from avatarforcing.serve.metrics import Metrics
    from avatarforcing.serve.spec import Limits

    avatar = Avatar.random(tiny_cfg())
    twins = []
    for _ in range(2):
        s = avatar.session(_image(0), seed=4)
        s.feed(speech(1.0))
        s.run()
        twins.append(s)
    expected = np.concatenate(twins[0].close())
    sched = Scheduler(avatar, Limits(), Metrics())
    other = avatar.session(_image(1), seed=1)
    job, iterations = _Drain(twins[1], None), 0
    other_job_t = time.monotonic() - 10.0
    from avatarforcing.serve.engine import _Push

    push = _Push(other, speech(10.0), None, t_start=other_job_t, client_s=lambda: 10.0)  # real time, blocks ready
    while not twins[1].closed:
        before = other.blocks_in
        sched._iteration([], [push], [job])
        iterations += 1
        assert other.blocks_in == before + 1  # the neighbour got its step in every iteration of the drain
    sched.close()
    assert iterations >= avatar.cfg.stream.window_blocks - 1  # one step at a time, not the window at once
    np.testing.assert_array_equal(np.concatenate(job.frames), expected)


def test_frames_an_interrupt_overtook_go_out_without_their_speech():
    """The scheduler hands each live session's frames with the number of interrupts the session had when it made
    them; a transport sends a step's frames after the client asked for an interrupt the session had not yet got
    (``LiveFeed.fresh``) without their speech, so no frame sent after the interrupt carries the dropped speech.
    Speech pushed after the interrupt is spoken again."""
    import time

    from avatarforcing.serve.admission import Pool
    from avatarforcing.serve.engine import Scheduler
    from avatarforcing.serve.feed import LiveFeed
    from avatarforcing.serve.metrics import Metrics
    from avatarforcing.serve.spec import Limits

    avatar = Avatar.random(tiny_cfg())
    sched = Scheduler(avatar, Limits(), Metrics())
    live = avatar.live(_image(0), seed=0)
    feed = LiveFeed(live, Limits(), Pool())
    feed.t_start = time.monotonic()

    def step():  # one scheduler iteration, the session's clock a block further on
        feed.t_start -= live.block_s
        (out,), _, _ = sched._iteration([(feed, live)], [])
        return out

    feed.push(speech(3.0))
    frames, _, _, applied = step()
    while not any(f.speaking for f in frames):
        frames, _, _, applied = step()
    feed.control("interrupt")  # the client asks while these frames are on their way out
    sent = [feed.fresh(f, applied) for f in frames]
    assert len(sent) == len(frames) and not any(f.speaking or f.pcm.any() for f in sent)
    assert [f.index for f in sent] == [f.index for f in frames]  # the frames themselves still go out
    after, _, _, applied_after = step()
    assert applied_after == 1 and [feed.fresh(f, applied_after) for f in after] == after  # the session has it
    assert not any(f.speaking for f in after)
    feed.push(speech(1.0))
    spoken = []
    for _ in range(20):
        frames, _, _, applied = step()
        spoken += [f for f in frames if feed.fresh(f, applied).speaking]
    assert spoken  # new speech after the interrupt is not silenced
    sched.close()

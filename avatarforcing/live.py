"""A live avatar: always on, driven by a media clock; speech when it arrives, silence when it does not.

    push(pcm) ... end_segment()      speech, one utterance (segment) after another, any chunk size
    interrupt()                      barge-in: queued speech dropped, committed speech muted
    tick(now_s) -> [LiveFrame]       advance the clock to media time now_s; frames as they are generated
    events() -> [PlaybackFinished]   a segment's last frame was emitted (or it was interrupted)

The clock commits one block of audio (B latent frames = B x temporal_stride video frames) at a time, at
the block's own media time, never earlier, so video never runs ahead of the clock:

    block j covers media time [j T_b, (j + 1) T_b)        T_b = frames per block / fps (160 ms for mini)
    at now >= j T_b:  a whole block of speech queued      -> commit it
                      no segment open, nothing queued     -> commit silence (listening)
                      the open segment ended              -> commit what is queued, padded with silence
    at now >= j T_b + grace:  whatever is queued (maybe nothing), padded with silence

When compute falls behind the clock, every due block is committed at once and the frames follow in a burst
(nothing is dropped), but only while the audio committed and not yet on a frame stays within ``max_behind``
(default 1 s) of what the window needs (the look-ahead and two blocks). Past that the clock *slips*: it
commits a block only when compute has room for it (what the window needs), at that moment, until compute has
been ready before the clock for ``max_behind`` worth of blocks in a row; then the clock goes back onto the
block grid (a whole number of blocks slipped), so sessions stepped together fall due together, and the
catch-up allowance is back. On a machine that cannot keep real time at all, the stream then
runs at compute's pace with a bounded delay (what the window needs, over compute's speed) and bounded
memory, instead of falling further behind for ever. Each frame's ``due_s`` is its pts plus the clock's slip
when its block was committed: when it was due on the session's clock.

``grace`` (default one block) is how long a segment that is still open may keep the clock waiting for
speech arriving in bursts (text-to-speech, network jitter) before the gap is rendered as silence; the last
block of an ended segment never waits. A committed block becomes frames once the window and the front end
have their look-ahead, which the clock keeps filling (with silence if need be), so the last frames of an
utterance come out without waiting for the next one. Latency of speech that arrives while listening:
at most one block to its commit + the look-ahead (``Avatar.lookahead_ms``) + one step of compute.

Every frame carries its presentation time (``pts = index / fps`` on the media clock) and the exact PCM it
shows: the committed audio of its video frame (speech, or the silence that was rendered). A player that
plays each frame's PCM with the frame is in sync by construction.

Interrupt: the queue is dropped; the committed audio from the first frame not yet emitted on is replaced by
silence (so no later frame carries the dropped speech) and the window's blocks are conditioned on silence
rows from their next pass on. Kept across the cut: the style and temporal anchors and the KV buffer (the
identity and the last emitted frames, so the next frames continue the motion without a jump). The mouth
settles within the window's remaining blocks: the look-ahead plus one block.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from .errors import InputError


@dataclass
class LiveFrame:
    index: int  # frame number on the media clock (0, 1, ...)
    pts: float  # presentation time, seconds: index / fps
    image: np.ndarray  # uint8 [H, W, 3]
    pcm: np.ndarray  # float32 [samples_per_frame]: the audio this frame shows
    speaking: bool  # the frame shows speech (a segment's audio), not listening silence
    due_s: float = 0.0  # when it was due on the session's clock: pts + the clock's slip at its block's commit

    def silenced(self) -> LiveFrame:
        """This frame without its speech: for a frame made before an interrupt reached the session but sent
        after it was asked for (a transport never sends the dropped speech after the interrupt)."""
        return replace(self, pcm=np.zeros_like(self.pcm), speaking=False) if self.speaking else self


@dataclass
class PlaybackFinished:
    segment: int  # the segment's number (0, 1, ... in the order they were started)
    position_s: float  # seconds of the segment that were emitted (its length, unless interrupted)
    interrupted: bool


@dataclass
class _Segment:
    id: int
    start: int | None = None  # first committed sample (None: none committed yet)
    last: int | None = None  # one past its last committed sample so far
    end: int | None = None  # = last, once the segment is ended and fully committed
    ended: bool = False
    queued: int = 0  # its samples still in the queue


class LiveSession:
    """One always-on stream over an ``api.Session`` (``Avatar.live``). Not thread-safe."""

    def __init__(self, avatar, image, seed: int = 0, prompt: str | None = None, prompt_embeds=None,
                 grace_ms: float | None = None, mode: str = "avatarforcing", max_behind_ms: float = 1000.0):
        if mode not in ("avatarforcing", "ar"):
            raise InputError(f"a live session runs the window sampler (avatarforcing or ar), not {mode!r}")
        c = avatar.cfg.codec
        self.session = avatar.session(image, seed=seed, mode=mode, prompt=prompt, prompt_embeds=prompt_embeds)
        self.rate, self.fps, self.spf = c.sample_rate, c.fps, c.samples_per_frame
        self.block_frames = avatar.cfg.stream.block_frames * c.temporal_stride
        self.block = self.block_frames * self.spf  # samples per block
        self.block_s = self.block_frames / self.fps
        self.grace_s = self.block_s if grace_ms is None else grace_ms / 1000
        self.lead = avatar.framing.lead  # release framing: frame 0 is the reference, with silence
        self.lookahead_ms = self.session.lookahead_ms
        if not max_behind_ms >= 0:
            raise InputError(f"max_behind_ms must be >= 0 (got {max_behind_ms})")
        # committed samples not yet on a frame: what the window needs (the look-ahead, the block being made and
        # the next one due), and at most max_behind more while compute catches up
        self.min_in_flight = self.block * (2 + math.ceil(self.lookahead_ms / 1000 / self.block_s - 1e-9))
        self.max_in_flight = self.min_in_flight + self.block * round(max_behind_ms / 1000 / self.block_s)
        self.slipped_s = 0.0  # how long the clock has waited for compute, in all
        self.slipping = False  # compute cannot keep the clock: only what the window needs is committed
        self.recover_blocks = max(1, (self.max_in_flight - self.min_in_flight) // self.block)  # ahead, to stop
        self._early, self._early_run = -1, 0  # the last block compute was ready for early; how many in a row
        self.block_slips: deque[float] = deque()  # the slip at each committed block not yet fully on frames
        self.queue: deque[tuple[_Segment, np.ndarray]] = deque()
        self.queued = 0
        self.segments: list[_Segment] = []  # started and not finished
        self.next_segment = 0
        self.blocks = 0  # blocks committed
        self.committed = 0  # samples committed (= blocks * block)
        self.timeline = np.zeros(0, np.float32)  # committed samples from `timeline_at` on (not yet on frames)
        self.speech = np.zeros(0, bool)  # which of them are speech
        self.timeline_at = 0
        self.frames = 0  # frames emitted
        self._events: list[PlaybackFinished] = []

    # ------------------------------------------------------------------ input

    def push(self, pcm) -> None:
        """Queue speech (float32 mono at the model's rate). Starts a segment if none is open."""
        x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.isfinite(x).all():
            raise InputError("audio chunk contains NaN or infinite samples")
        if not len(x):
            return
        if not self.segments or self.segments[-1].ended:
            self.segments.append(_Segment(self.next_segment))
            self.next_segment += 1
        seg = self.segments[-1]
        seg.queued += len(x)
        self.queue.append((seg, x))
        self.queued += len(x)

    def end_segment(self) -> None:
        """The open segment (one utterance) is complete: its last block is committed without waiting."""
        if self.segments and not self.segments[-1].ended:
            self.segments[-1].ended = True
            self._close_segments()

    def interrupt(self) -> None:
        """Barge-in: drop the queue, mute everything committed that is not on a frame yet, end every segment
        (``PlaybackFinished(interrupted=True)`` with the position reached)."""
        self.queue.clear()
        self.queued = 0
        cut = self._frame_sample(self.frames)  # the first sample not on an emitted frame
        self.timeline[:] = 0
        self.speech[:] = False
        self.session.mute(cut)
        for seg in self.segments:
            played = 0 if seg.start is None else max(0, min(cut, seg.end or cut) - seg.start)
            self._events.append(PlaybackFinished(seg.id, played / self.rate, True))
        self.segments = []

    # ------------------------------------------------------------------ output

    @property
    def speaking(self) -> bool:
        """Whether speech is queued or committed and not yet emitted."""
        return self.queued > 0 or bool(self.speech.any())

    def events(self) -> list[PlaybackFinished]:
        out, self._events = self._events, []
        return out

    def tick(self, now_s: float) -> list[LiveFrame]:
        """Advance the media clock to ``now_s`` (seconds since the session started): commit every block that
        is due, return the frames that became ready."""
        self.advance(now_s)
        return self.emit(self.session.run())

    def advance(self, now_s: float) -> int:
        """The clock's half of ``tick``: commit every block due at ``now_s`` into the session without computing
        (an ``engine.Engine`` steps many sessions' blocks together); returns how many were committed."""
        n = 0
        while True:
            start = self.blocks * self.block_s + self.slipped_s
            room = len(self.timeline) + self.block <= (self.min_in_flight if self.slipping else self.max_in_flight)
            if now_s < start:
                if self.slipping and room and self._early != self.blocks:  # compute is ready before the block's time
                    self._early, self._early_run = self.blocks, self._early_run + 1
                    if self._early_run >= self.recover_blocks:  # ahead for long enough: back on the block grid
                        self.slipping = False
                        self.slipped_s = math.ceil(self.slipped_s / self.block_s - 1e-9) * self.block_s
                break
            if not room:  # compute is too far behind: the clock waits for it
                self.slipping, self._early_run = True, 0
                break
            open_seg = self.segments and not self.segments[-1].ended
            if self.queued >= self.block or (not open_seg) or now_s >= start + self.grace_s:
                if self.slipping and self._early != self.blocks:  # committed when compute had room, late
                    self.slipped_s += now_s - start
                    self._early_run = 0
                self._commit()
                n += 1
            else:
                break  # an open segment may still fill this block: wait, at most until the grace ends
        return n

    def close(self) -> list[LiveFrame]:
        """End the stream: what is committed comes out (the window drains)."""
        return self.emit(self.session.close())

    def close_step(self) -> list[LiveFrame]:
        """One model step of ``close``; ``closed`` once everything has come out."""
        return self.emit(self.session.close_step())

    @property
    def closed(self) -> bool:
        return self.session.closed

    # ------------------------------------------------------------------ internals

    def _frame_sample(self, frame: int) -> int:
        return max(frame - self.lead, 0) * self.spf

    def _commit(self) -> None:
        """Commit one block: queued speech first, silence for the rest."""
        block = np.zeros(self.block, np.float32)
        is_speech = np.zeros(self.block, bool)
        filled = 0
        while self.queue and filled < self.block:
            seg, x = self.queue[0]
            take = min(len(x), self.block - filled)
            block[filled:filled + take] = x[:take]
            is_speech[filled:filled + take] = True
            if seg.start is None:
                seg.start = self.committed + filled
            seg.queued -= take
            self.queued -= take
            filled += take
            seg.last = self.committed + filled
            if take == len(x):
                self.queue.popleft()
            else:
                self.queue[0] = (seg, x[take:])
        self._close_segments()
        self.committed += self.block
        self.blocks += 1
        self.timeline = np.concatenate([self.timeline, block])
        self.speech = np.concatenate([self.speech, is_speech])
        self.block_slips.append(self.slipped_s)
        self.session.feed(block)

    def _close_segments(self) -> None:
        for seg in self.segments:
            if seg.ended and seg.queued == 0 and seg.end is None and seg.last is not None:
                seg.end = seg.last

    def emit(self, batches: list[np.ndarray]) -> list[LiveFrame]:
        """The session's frames (in order, as it made them) with their index, pts, PCM and state."""
        out = []
        for frames in batches:
            for image in frames:
                i, at = self.frames, self._frame_sample(self.frames)
                a = at - self.timeline_at
                if i < self.lead:
                    pcm, speaking = np.zeros(self.spf, np.float32), False
                else:
                    pcm, speaking = self.timeline[a:a + self.spf].copy(), bool(self.speech[a:a + self.spf].any())
                b = at // self.block - (self.blocks - len(self.block_slips))  # its block's place in block_slips
                slip = self.block_slips[min(max(b, 0), len(self.block_slips) - 1)] if self.block_slips \
                    else self.slipped_s
                out.append(LiveFrame(i, i / self.fps, image, pcm, speaking, i / self.fps + slip))
                self.frames += 1
        done = self._frame_sample(self.frames) - self.timeline_at
        if done > 0:  # samples on emitted frames leave the buffers (bounded memory)
            self.timeline, self.speech = self.timeline[done:], self.speech[done:]
            self.timeline_at += done
            first = self.timeline_at // self.block  # the first block not wholly on frames
            while len(self.block_slips) > self.blocks - first:
                self.block_slips.popleft()
        self._finish_segments()
        return out

    def _finish_segments(self) -> None:
        shown = self._frame_sample(self.frames)
        keep = []
        for seg in self.segments:
            if seg.end is not None and shown >= seg.end:
                self._events.append(PlaybackFinished(seg.id, (seg.end - seg.start) / self.rate, False))
            elif seg.ended and seg.start is None and seg.queued == 0:
                self._events.append(PlaybackFinished(seg.id, 0.0, False))
            else:
                keep.append(seg)
        self.segments = keep

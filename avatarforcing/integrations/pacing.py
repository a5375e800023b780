"""Frames handed on at their media time, on one wall clock: what keeps a consumer that paces audio and video
separately in sync.

LiveKit's AVSynchronizer (inside its AvatarRunner) plays each audio frame as soon as it is queued and captures
the video frames on its own frame-rate grid. A live session makes a block of frames at once (4 frames, 160 ms,
for ``mini``); handed on as they come, a block's audio queues ahead of its playout while its video waits for the
grid, and where the two end up depends on how full each queue was: measured through the runner on this CPU, the
video ran from 439 ms late to 246 ms early over one 20 s utterance. Handing each frame on at its own time keeps
both queues at most a frame deep, so a frame's voice starts as its image is captured:

    send time of frame i = origin + shift + pts_i
    origin   set by the first frame: its arrival + ``slack_s`` (blocks arrive a block apart, give or take the
             compute's jitter: one block of slack absorbs it)
    shift    a frame that arrives after its send time (the compute fell behind) moves the timeline by its
             lateness, for that frame and every later one, video and audio alike: the stream goes on in sync,
             that much later
"""

from __future__ import annotations

import asyncio
import time


class Pacer:
    """Send times for frames by their pts (seconds on the session's media clock)."""

    def __init__(self, slack_s: float):
        self.slack_s = slack_s
        self.origin: float | None = None  # monotonic time of media time 0
        self.shift = 0.0  # how much later than planned the timeline runs: the lateness of frames so far

    def send_time(self, pts: float, now: float) -> float:
        """When the frame at ``pts``, here at ``now`` (monotonic), is to be handed on."""
        if self.origin is None:
            self.origin = now - pts + self.slack_s
        t = self.origin + self.shift + pts
        if now > t:  # late: the whole timeline moves
            self.shift += now - t
            t = now
        return t

    async def wait(self, pts: float) -> None:
        """Until the frame at ``pts`` is due."""
        t = self.send_time(pts, time.monotonic())
        await asyncio.sleep(max(0.0, t - time.monotonic()))

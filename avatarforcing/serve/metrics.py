"""The server's Prometheus metrics: counters of one serving process, rendered for one or several replicas."""

from __future__ import annotations

import time

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # step latency histogram, seconds


class Metrics:
    """Counters of one server process; ``render`` turns snapshots of one or several replicas into Prometheus
    text (totals, plus a ``replica``-labelled series per replica when there are several)."""

    HELP = {
        "sessions_active": ("gauge", "Streams open now."),
        "sessions_pending": ("gauge", "Connections that have not started a stream yet."),
        "sessions_total": ("counter", "Streams started."),
        "sessions_rejected_total": ("counter", "Connections refused: all session slots busy, or shutting down."),
        "frames_total": ("counter", "Video frames sent."),
        "frames_late_total": ("counter", "Frames sent more than late_ms after the audio they needed arrived "
                                         "(beyond the look-ahead)."),
        "live_clock_slipped_seconds_total": ("counter", "Seconds live sessions' clocks waited for compute (a "
                                                        "server that cannot keep real time), over all sessions."),
        "queue_seconds": ("gauge", "Audio received and not yet processed, seconds, over all streams."),
        "steps_per_second": ("gauge", "Batched model steps per second over the last 10 s."),
        "engine_steps_total": ("counter", "Batched model steps (one step carries every session with a block due)."),
        "engine_blocks_total": ("counter", "Session blocks stepped (engine_blocks_total / engine_steps_total: the "
                                           "mean batch)."),
        "engine_batch_size": ("gauge", "Sessions in the latest batched step."),
        "errors_total": ("counter", "Streams ended by an error (client mistakes and internal errors)."),
        "internal_errors_total": ("counter", "Streams ended by a server fault (logged with a traceback)."),
    }
    WINDOW_S = 10.0

    def __init__(self):
        self.values = dict.fromkeys(self.HELP, 0)
        self.step_counts = [0] * (len(BUCKETS) + 1)
        self.step_sum = 0.0
        self.step_n = 0
        self.recent: list[float] = []  # times of the steps of the last WINDOW_S seconds

    def add(self, name: str, n: float = 1) -> None:
        self.values[name] += n

    def observe_step(self, seconds: float) -> None:
        """One batched model step (all the sessions it carried)."""
        i = next((k for k, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
        self.step_counts[i] += 1
        self.step_sum += seconds
        self.step_n += 1
        self.recent.append(time.monotonic())

    def snapshot(self) -> dict:
        now = time.monotonic()
        self.recent = [t for t in self.recent if now - t <= self.WINDOW_S]
        self.values["steps_per_second"] = len(self.recent) / self.WINDOW_S
        return {"values": dict(self.values), "step_counts": list(self.step_counts), "step_sum": self.step_sum,
                "step_n": self.step_n}

    @classmethod
    def render(cls, snapshots: dict[str, dict]) -> str:
        lines = []
        for name, (kind, help_text) in cls.HELP.items():
            total = sum(snap["values"].get(name, 0) for snap in snapshots.values())
            lines += [f"# HELP avatarforcing_{name} {help_text}", f"# TYPE avatarforcing_{name} {kind}",
                      f"avatarforcing_{name} {total:g}"]
        if len(snapshots) > 1 or "" not in snapshots:
            for name, (kind, help_text) in cls.HELP.items():
                lines += [f"# HELP avatarforcing_replica_{name} {help_text} Per replica.",
                          f"# TYPE avatarforcing_replica_{name} {kind}"]
                lines += [f'avatarforcing_replica_{name}{{replica="{r}"}} {snap["values"].get(name, 0):g}'
                          for r, snap in sorted(snapshots.items())]
        lines += ["# HELP avatarforcing_step_latency_seconds Compute time of one batched model step.",
                  "# TYPE avatarforcing_step_latency_seconds histogram"]
        counts = [sum(snap["step_counts"][i] for snap in snapshots.values()) for i in range(len(BUCKETS) + 1)]
        acc = 0
        for b, c in zip(BUCKETS, counts):
            acc += c
            lines.append(f'avatarforcing_step_latency_seconds_bucket{{le="{b}"}} {acc}')
        n = sum(snap["step_n"] for snap in snapshots.values())
        lines.append(f'avatarforcing_step_latency_seconds_bucket{{le="+Inf"}} {n}')
        lines.append(f"avatarforcing_step_latency_seconds_sum {sum(s['step_sum'] for s in snapshots.values())}")
        lines.append(f"avatarforcing_step_latency_seconds_count {n}")
        return "\n".join(lines) + "\n"

"""What a server is: one ``ServingSpec``, built once (the CLI's ``serve`` builds it from its flags) and passed
whole to the single-process server (``http.serve``) and to every Ray Serve replica (``ray.start``), so an
option cannot reach one and miss the other.

    ServingSpec
      model, device, dtype, engine      -> Avatar.load                 (every process that runs the model)
      prompt, prompt_embeds             -> the sessions' default prompt
      host, port                        -> uvicorn: the single server, or serve --ray's front door (front.py)
      limits: Limits                    -> create_app (per serving process: one server, or each replica)
      ray: RayOptions | None            -> replicas, autoscaling, GPUs, cluster address (None: one process)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .ice import IceServer


@dataclass
class Limits:
    """Limits of one serving process (the single server, or one Ray replica)."""

    max_sessions: int = 4
    max_pending: int = 16  # connections that have not sent a valid 'start' yet (they hold no session slot)
    max_pending_per_client: int = 8  # of those, from one client address
    start_timeout_s: float = 10.0  # a connection must send 'start' within this
    max_message_bytes: int = 1 << 20  # per WebSocket message (an image or an audio chunk)
    max_session_seconds: float = 3600.0  # wall-clock length of a session, and of audio per session
    idle_timeout_s: float = 30.0  # a session whose audio falls this far behind the wall clock is closed
    send_timeout_s: float = 10.0  # a client that stops reading for this long is closed (backpressure)
    max_buffered_seconds: float = 60.0  # audio read from the socket but not processed yet (then backpressure)
    max_live_queue_seconds: float = 300.0  # live: speech queued ahead of the clock (beyond: 'limit')
    push_seconds: float = 1.0  # at most this much audio per model push, so frames flow while a backlog drains
    max_speedup: float = 4.0  # a stream is rendered at most this many times faster than real time
    batch: bool = True  # the sessions' due blocks share one model step (False: each alone, the unbatched baseline)
    compute_threads: int | None = None  # torch threads of the model's (scheduler's) thread; None: torch's default
    max_image_pixels: int = 25_000_000  # checked from the image header, before decoding
    max_text_chars: int = 500  # /speak
    max_speech_seconds: float = 60.0  # /speak: longer synthesised speech is refused
    job_timeout_s: float = 30.0  # /speak, /prepare: a job not done by then gets 503 (workers.py)
    jpeg_quality: int = 85
    late_ms: float = 500.0  # a frame later than this beyond its look-ahead counts in frames_late_total
    rtc_margin_ms: float = 300.0  # WebRTC: media is sent this long after a frame can first exist (compute's slack)
    allow_origins: tuple[str, ...] = ()  # besides same-host pages and clients sending no Origin; "*": any
    allow_hosts: tuple[str, ...] = ()  # Host header names served (DNS rebinding); empty: any
    ice_servers: tuple[str, ...] = ()  # WebRTC STUN / TURN URLs (ice.py); empty: host candidates only
    docs: bool = False  # /docs, /redoc, /openapi.json
    recordings: int = 8  # MP4 recordings kept for download (oldest deleted first)
    recording_ttl_s: float = 600.0

    def __post_init__(self):
        self.allow_origins = tuple(self.allow_origins)
        self.allow_hosts = tuple(h.lower() for h in self.allow_hosts)
        self.ice_servers = tuple(self.ice_servers)
        for url in self.ice_servers:
            IceServer.parse(url)  # a bad URL is refused here, before any replica starts
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0 and \
                    f.name not in ("max_pending",):
                raise ValueError(f"Limits.{f.name} must be positive, got {value}")


@dataclass
class RayOptions:
    """A Ray Serve deployment of the same app (``serve --ray``); each replica gets ``Limits.max_sessions``."""

    replicas: int = 2  # fixed number of replicas (ignored when autoscale is set)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, following live sessions
    gpus_per_replica: float = 0.0
    address: str | None = None  # an existing cluster this machine is a node of; None: start a local one
    num_cpus: int | None = None  # CPUs of a local cluster (None: all)

    def __post_init__(self):
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 1 <= lo <= hi:
                raise ValueError(f"autoscale {self.autoscale}: need 1 <= min <= max")
            self.autoscale = (int(lo), int(hi))
        elif self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.address and self.address.startswith("ray://"):
            raise ValueError(f"address {self.address}: the front door (front.py) runs beside Ray's proxy, so serve "
                             "--ray must run on a node of the cluster (on the head: --address auto), not through "
                             "Ray Client")


@dataclass
class ServingSpec:
    model: str = "mini"  # shipped model name or model folder
    device: str = "cpu"
    dtype: str | None = None  # default: bf16 on a GPU, fp32 on the CPU
    engine: str | None = None  # inference variant (model/fast.py); default: compiled on a GPU, eager on the CPU
    prompt: str | None = None  # the sessions' default prompt (text models), encoded by each serving process
    prompt_embeds: str | None = None  # or cached embeddings: a file every serving process can read
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = field(default_factory=Limits)
    ray: RayOptions | None = None

    def load_avatar(self, device: str | None = None):
        """The model as this spec describes it, with the sessions' default prompt set (``device`` overrides the
        spec's, e.g. a Ray replica's own GPU)."""
        from ..api import Avatar

        avatar = Avatar.load(self.model, device or self.device, dtype=self.dtype, engine=self.engine)
        avatar.prompts.set_default(self.prompt, self.prompt_embeds)
        return avatar

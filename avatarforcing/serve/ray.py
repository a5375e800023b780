"""Many avatars across GPUs and machines: the same server app, replicated by Ray Serve (``serve --ray``).

    clients --ws/http--> front door (front.py: the single process's HTTP limits) --loopback--> Ray Serve proxy
            --(one replica per connection, for its whole life)--> replica i
    replica i = AvatarReplica(spec): one device, ``spec.load_avatar()`` once, ``create_app`` with K slots
    MetricsHub (one Ray actor): each replica reports a snapshot every second; /metrics on any replica
    renders the sum and a per-replica series; recordings are copied there, so any replica serves a download

The whole ``ServingSpec`` is a replica's one argument: every option that reaches the single-process server
reaches every replica (model, device, dtype, engine, prompt, every limit).

Admission: a replica accepts at most K sessions (``spec.limits.max_sessions``); the router sends a new connection
to the least loaded replica and lets a full one take one more connection (``max_ongoing_requests = K + 1``;
a replica rejects beyond that and the router tries another) so that when every replica is full the client
gets the protocol's ``busy`` frame from a replica, not an HTTP error from the proxy. A burst of connections
waits briefly in the proxy's queue (at most 64) while the router learns the replicas' load. Autoscaling
follows the live connections per replica (Ray Serve counts a WebSocket as an ongoing request). A replica
that dies takes only its own streams (their sockets close abnormally: the Python client raises); the others
keep serving, and Ray starts a replacement.

Needs the ``ray`` extra (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from contextlib import contextmanager

from ..errors import AvatarForcingError
from .spec import RayOptions, ServingSpec

HUB = "avatarforcing-metrics"
NAMESPACE = "avatarforcing"
REPORT_S = 1.0  # how often a replica reports its metrics to the hub (and hears of a shutdown)


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise AvatarForcingError("serve --ray needs Ray Serve: pip install -e '.[ray]'") from None
    return ray, serve


def hub_actor():
    """The MetricsHub actor, created on first use (named, so every replica finds the same one)."""
    ray, _ = _ray()

    @ray.remote(num_cpus=0)
    class MetricsHub:
        """Metrics snapshots of every replica, and the recent recordings (any replica serves any download)."""

        def __init__(self):
            self.snapshots: dict[str, tuple[float, dict]] = {}
            self.recordings: dict[str, tuple[float, bytes]] = {}
            self.stopping = False  # the deployment is going down: replicas tell their streams ('shutdown')
            self.told: set[str] = set()  # replicas that have sent their streams the shutdown frame

        def put_recording(self, token: str, data: bytes, keep: int, ttl_s: float) -> None:
            now = time.time()
            self.recordings[token] = (now, data)
            for t, (at, _) in sorted(self.recordings.items(), key=lambda kv: kv[1][0]):
                if now - at > ttl_s or len(self.recordings) > keep:
                    del self.recordings[t]

        def get_recording(self, token: str) -> bytes | None:
            item = self.recordings.get(token)
            return item[1] if item else None

        def report(self, replica: str, snapshot: dict) -> bool:
            """Keep a replica's snapshot; answer whether the deployment is stopping."""
            self.snapshots[replica] = (time.time(), snapshot)
            return self.stopping

        def stop(self) -> None:
            self.stopping = True

        def start(self) -> None:
            """A new deployment (the hub outlives one that did not stop cleanly)."""
            self.stopping, self.told = False, set()

        def told_streams(self, replica: str) -> None:
            self.told.add(replica)

        def not_told(self, max_age_s: float = 10.0) -> list[str]:
            """Live replicas that have not yet sent their streams the shutdown frame."""
            return [r for r in self.all(max_age_s) if r not in self.told]

        def drop(self, replica: str) -> None:
            self.snapshots.pop(replica, None)

        def all(self, max_age_s: float = 10.0) -> dict[str, dict]:
            """Snapshots of the replicas that reported recently (a dead replica drops out)."""
            now = time.time()
            return {r: snap for r, (t, snap) in self.snapshots.items() if now - t <= max_age_s}

    return MetricsHub.options(name=HUB, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


def shared_recordings(limits, hub):
    """Recordings kept locally and copied to the hub, so the download works whichever replica serves it."""
    from .recordings import Recordings

    class SharedRecordings(Recordings):
        def add(self, token, path) -> None:
            super().add(token, path)
            hub.put_recording.remote(token, path.read_bytes(), limits.recordings, limits.recording_ttl_s)

        async def fetch(self, token):
            return await super().fetch(token) or await hub.get_recording.remote(token)

    return SharedRecordings(limits)


class AvatarReplica:
    """One Ray Serve replica: the model on one device and the server app, built from the whole spec."""

    def __init__(self, spec: ServingSpec):
        from .app import create_app

        ray, _ = _ray()
        device = spec.device
        if device == "cuda" and ray.get_gpu_ids():
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this replica's GPU
        self.spec = spec
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.hub = hub_actor()
        self.server_app = create_app(spec.load_avatar(device), spec.limits, replica=self.name,
                                     metrics_source=self._all_metrics,
                                     recordings=shared_recordings(spec.limits, self.hub))
        self._reporter: asyncio.Task | None = None

    def __serve_build_asgi_app__(self):
        from .front import FromFront
        from .http import HeaderLimit

        # the client and Host the front door forwarded; a large head is refused here too (431)
        app = HeaderLimit(FromFront(self.server_app))

        async def asgi(scope, receive, send):  # start reporting from the replica's own event loop
            if self._reporter is None:
                self._reporter = asyncio.ensure_future(self._report_forever())
            await app(scope, receive, send)

        return asgi

    async def _report_forever(self) -> None:
        """Every REPORT_S: this replica's metrics to the hub; when the hub says the deployment is stopping, every
        open stream gets the protocol's ``shutdown`` frame (Ray's proxy would otherwise just cut the sockets)."""
        told = False
        while True:
            try:
                stopping = await self.hub.report.remote(self.name, self.server_app.state.snapshot())
                if stopping and not told:
                    await self.server_app.state.notify_shutdown()
                    told = True
                    await self.hub.told_streams.remote(self.name)
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                pass
            await asyncio.sleep(REPORT_S)

    async def _all_metrics(self) -> dict[str, dict]:
        await self.hub.report.remote(self.name, self.server_app.state.snapshot())
        return await self.hub.all.remote()


def deployment_options(spec: ServingSpec) -> dict:
    """Ray Serve's deployment options for the spec (``Limits.max_sessions`` slots per replica)."""
    r, k = spec.ray or RayOptions(), spec.limits.max_sessions
    options = {"max_ongoing_requests": k + 1, "max_queued_requests": 64,
               "ray_actor_options": {"num_gpus": r.gpus_per_replica, "num_cpus": 0},
               "health_check_period_s": 2, "graceful_shutdown_timeout_s": 5}
    if r.autoscale:
        lo, hi = r.autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": max(1.0, 0.7 * k),
                                         "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        options["num_replicas"] = r.replicas
    return options


def deployment(spec: ServingSpec):
    """The bound Ray Serve application (``serve.run`` it): every replica is built from ``spec``, whole."""
    _, serve = _ray()
    cls = serve.deployment(serve.ingress()(AvatarReplica), name="avatarforcing", **deployment_options(spec))
    return cls.bind(spec)


def start(spec: ServingSpec, proxy_port: int) -> None:
    """Connect to (``spec.ray.address``) or start a local Ray cluster, deploy, return once every replica is up.
    Ray's proxy listens on ``127.0.0.1:proxy_port``, for the front door on this machine (front.py)."""
    ray, serve = _ray()
    r = spec.ray or RayOptions()
    if not ray.is_initialized():
        if r.address:
            ray.init(address=r.address, namespace=NAMESPACE, logging_level="WARNING")
        else:
            ray.init(namespace=NAMESPACE, num_cpus=r.num_cpus, include_dashboard=False, logging_level="WARNING")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": proxy_port})
    ray.get(hub_actor().start.remote())
    serve.run(deployment(spec), name="avatarforcing", route_prefix="/")


def announce_shutdown(timeout_s: float = 4 * REPORT_S) -> list[str]:
    """Have every replica send its open streams the ``shutdown`` frame (within one report period); returns the
    replicas that had not done so by ``timeout_s``."""
    ray, _ = _ray()
    hub = hub_actor()
    ray.get(hub.stop.remote())
    deadline = time.monotonic() + timeout_s
    while (late := ray.get(hub.not_told.remote())) and time.monotonic() < deadline:
        time.sleep(0.1)
    return late


def stop() -> None:
    """Take the deployment down: streams are told first (``shutdown`` frame), then Serve and the hub stop."""
    ray, serve = _ray()
    try:
        try:
            announce_shutdown()
        except Exception:  # noqa: BLE001 - a broken hub must not keep the deployment up
            pass
        serve.shutdown()
    finally:
        try:
            ray.kill(ray.get_actor(HUB, namespace=NAMESPACE))
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()


def front_door(spec: ServingSpec, proxy_port: int, **kw):
    """The front door (front.py) for a deployment whose proxy listens on ``proxy_port``: on SIGTERM / SIGINT it
    first has every replica send its streams the ``shutdown`` frame. ``kw``: http.config's timeouts."""
    from .front import front_server

    async def tell_replicas() -> None:
        await asyncio.to_thread(announce_shutdown, 2.5 * REPORT_S)

    return front_server(spec, proxy_port, tell_replicas, **kw)


@contextmanager
def running(spec: ServingSpec, **kw):
    """The deployment as ``serve --ray`` runs it, with the front door in a thread (tests, benchmarks): yields the
    front door's server (``should_exit = True`` does what SIGTERM does); taken down on exit."""
    from .http import free_port

    proxy_port = free_port()
    try:
        start(spec, proxy_port)
        front = front_door(spec, proxy_port, **kw)
        thread = threading.Thread(target=front.run, daemon=True)
        thread.start()
        while not front.started and thread.is_alive():
            time.sleep(0.05)
        yield front
        front.should_exit = True
        thread.join(15)
    finally:
        stop()


def serve_forever(spec: ServingSpec) -> None:
    """``avatarforcing serve --ray``: deploy, serve the front door until SIGINT/SIGTERM, take the deployment down."""
    from .http import free_port, log_to_stderr

    proxy_port = free_port()
    try:
        start(spec, proxy_port)
        where = "an existing Ray cluster" if spec.ray and spec.ray.address else "a local Ray cluster"
        print(f"avatarforcing serve --ray: ready at http://{spec.host}:{spec.port}/ on {where}", flush=True)
        log_to_stderr()
        front_door(spec, proxy_port).run()
    finally:
        stop()

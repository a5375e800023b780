"""One serving spec: every `serve` flag lands in the ServingSpec, and the spec reaches the single-process
server and every Ray replica whole (so no option can reach one and miss the other)."""

import dataclasses
import pickle

import pytest
import torch

from avatarforcing.cli import build_parser
from avatarforcing.cli.serve import spec as spec_from_args
from avatarforcing.errors import AvatarForcingError
from avatarforcing.serve.spec import Limits, RayOptions, ServingSpec


def _changed(value):
    """A value of the same type as ``value`` that differs from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, tuple):
        return ("https://app.example",)
    if value is None:  # an optional count
        return 3
    raise TypeError(value)


def every_limit_changed() -> Limits:
    limits = Limits(**{f.name: ("stun:stun.example.org:3478",) if f.name == "ice_servers" else _changed(f.default)
                       for f in dataclasses.fields(Limits)})
    assert all(getattr(limits, f.name) != f.default for f in dataclasses.fields(Limits))
    return limits


def full_spec(**kw) -> ServingSpec:
    """A spec whose every field differs from its default."""
    values = dict(model="mini", device="cpu", dtype="bf16", engine="fp8", prompt=None, prompt_embeds=None,
                  host="0.0.0.0", port=8123, limits=every_limit_changed(),
                  ray=RayOptions(replicas=3, gpus_per_replica=0.5, address="auto", num_cpus=7))
    values.update(kw)
    return ServingSpec(**values)


def test_every_serve_flag_lands_in_the_spec():
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--host", "0.0.0.0", "--port", "9", "--max-sessions", "3", "--device", "cuda",
         "--allow-origin", "https://a.example", "--allow-origin", "https://b.example", "--docs", "--dtype", "bf16",
         "--engine", "fp8", "--prompt", "a calm voice", "--session-limit", "600", "--no-batch",
         "--compute-threads", "1", "--ice-server", "stun:stun.example.org", "--ice-server", "turn:u:p@t.example"])
    s = spec_from_args(args)
    assert (s.model, s.host, s.port, s.device, s.dtype, s.engine, s.prompt) == \
        ("m", "0.0.0.0", 9, "cuda", "bf16", "fp8", "a calm voice")
    assert s.limits == dataclasses.replace(Limits(), max_sessions=3, docs=True, max_session_seconds=600.0,
                                           allow_origins=("https://a.example", "https://b.example"), batch=False,
                                           compute_threads=1,
                                           ice_servers=("stun:stun.example.org", "turn:u:p@t.example"))
    assert s.ray is None

    args = build_parser().parse_args(["serve", "--ray", "--autoscale", "1:5", "--sessions-per-replica", "6",
                                      "--gpus-per-replica", "1", "--address", "auto",
                                      "--allow-origin", "*", "--engine", "eager"])
    s = spec_from_args(args)
    assert s.ray == RayOptions(autoscale=(1, 5), gpus_per_replica=1.0, address="auto")
    assert s.limits.max_sessions == 6 and s.limits.allow_origins == ("*",) and s.engine == "eager"
    assert spec_from_args(build_parser().parse_args(["serve", "--ray"])).limits.max_sessions == 2
    assert spec_from_args(build_parser().parse_args(["serve"])).limits.max_sessions == 4


@pytest.mark.parametrize("argv, why", [
    (["serve", "--engine", "bogus"], "unknown engine variant"),
    (["serve", "--ray", "--autoscale", "3:1"], "1 <= MIN <= MAX"),
    (["serve", "--ray", "--autoscale", "x"], "expected MIN:MAX"),
    (["serve", "--address", "auto"], "options of --ray"),
    (["serve", "--ray", "--address", "ray://head:10001"], "node of the cluster"),
    (["serve", "--max-sessions", "0"], "at least 1"),
    (["serve", "--session-limit", "0"], "positive number of seconds"),
    (["serve", "--compute-threads", "0"], "at least 1"),
    (["serve", "--ice-server", "stun.example.org"], "expected a URL starting with"),
])
def test_bad_serve_flags_fail_before_anything_loads(argv, why):
    with pytest.raises(AvatarForcingError, match=why):
        spec_from_args(build_parser().parse_args(argv))


def test_the_single_process_server_runs_the_whole_spec(monkeypatch):
    from avatarforcing.serve import http

    ran = {}
    monkeypatch.setattr(http, "run", lambda app, host, port, limits: ran.update(app=app, host=host, port=port,
                                                                                 limits=limits))
    spec = full_spec(ray=None)
    http.serve(spec)
    app = ran["app"]
    assert (ran["host"], ran["port"]) == (spec.host, spec.port)
    assert ran["limits"] is spec.limits and app.state.limits is spec.limits
    assert app.state.avatar.dtype == torch.bfloat16 and app.state.avatar.model.engine_variant == "fp8"


def test_every_option_reaches_a_ray_replica(monkeypatch):
    """The deployment binds the spec as the replica's one argument; Ray pickles it across; the replica builds
    its model and app from it with the same ``load_avatar`` as the single process."""
    pytest.importorskip("ray.serve", reason="Ray Serve is an extra: pip install -e '.[ray]' (CI installs it)")
    from ray import cloudpickle

    from avatarforcing.codecs.text import Prompts
    from avatarforcing.serve import ray as afray

    spec = full_spec(prompt="a calm voice", prompt_embeds="embeds.safetensors")
    app = afray.deployment(spec)
    (bound,) = app._bound_deployment.init_args
    assert bound is spec and not app._bound_deployment.init_kwargs
    shipped = cloudpickle.loads(cloudpickle.dumps(bound))  # what a replica process receives
    assert shipped == spec and pickle.loads(pickle.dumps(spec)) == spec

    options = afray.deployment_options(spec)
    k = spec.limits.max_sessions
    assert options["num_replicas"] == 3 and options["max_ongoing_requests"] == k + 1
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    auto = afray.deployment_options(full_spec(ray=RayOptions(autoscale=(2, 5))))
    assert auto["autoscaling_config"]["min_replicas"] == 2 and auto["autoscaling_config"]["max_replicas"] == 5
    assert "num_replicas" not in auto

    class FakeRay:
        @staticmethod
        def get_gpu_ids():
            return []

    defaults = []
    monkeypatch.setattr(afray, "_ray", lambda: (FakeRay, None))
    monkeypatch.setattr(afray, "hub_actor", lambda: None)
    monkeypatch.setattr(Prompts, "set_default", lambda self, prompt, embeds: defaults.append((prompt, embeds)))
    replica = afray.AvatarReplica(shipped)
    state = replica.server_app.state
    assert state.limits == spec.limits  # every limit, field by field
    assert state.avatar.dtype == torch.bfloat16 and state.avatar.model.engine_variant == "fp8"
    assert state.avatar.cfg.name == "mini" and str(state.avatar.device) == "cpu"
    assert defaults == [("a calm voice", "embeds.safetensors")]

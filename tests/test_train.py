import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avatarforcing.model import AvatarDiT
from avatarforcing.stream.schedule import teacher_sigmas, window_sigmas
from avatarforcing.stream.teacher import teacher_velocity
from avatarforcing.train import stages
from avatarforcing.train.loop import LoopConfig, Trainer, step_generator
from avatarforcing.train.stages import dmd_generator_loss, ode_loss, teacher_sample

from .conftest import tiny_cfg


def _toy_step(model):
    def step(s, micro, gen):
        x = torch.randn(4, 3, generator=gen)
        y = x.sum(1, keepdim=True) * 0.5
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"loss": loss.item()}
    return step


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """A run killed at step 3 and resumed equals the uninterrupted run in everything stateful: the model, its
    optimiser, the EMA (what is exported), and the DMD-style extras (a critic and the critic's optimiser,
    updated inside the step). Seen to fail with the EMA, the extra module or the extra optimiser not restored
    on load."""

    def make(steps, out):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        critic = torch.nn.Linear(3, 1)
        copt = torch.optim.AdamW(critic.parameters(), lr=3e-2, betas=(0.0, 0.999))
        tr = Trainer("toy", m, out, LoopConfig(steps=steps, lr=1e-2, ema_decay=0.9, ema_start=2, save_every=100),
                     torch.device("cpu"), extra={"critic": critic}, extra_optims={"critic": copt})
        return m, critic, copt, tr

    def step_fn(m, critic, copt):
        inner = _toy_step(m)

        def step(s, micro, gen):
            x = torch.randn(4, 3, generator=gen)
            copt.zero_grad()
            ((critic(x) - m(x).detach()) ** 2).mean().backward()
            copt.step()
            return inner(s, micro, gen)
        return step

    def everything(m, critic, copt, tr):
        return {"model": m.state_dict(), "ema": tr.ema.model.state_dict(), "critic": critic.state_dict(),
                "critic_opt": copt.state_dict()["state"], "opt": tr.opt.state_dict()["state"]}

    full = make(8, tmp_path / "a")
    full[3].run(step_fn(*full[:3]), progress=False)
    half = make(3, tmp_path / "b")  # "killed" after step 3 (the checkpoint of step 3 is on disk)
    half[3].run(step_fn(*half[:3]), progress=False)
    res = make(8, tmp_path / "b")  # a new process resumes from the checkpoint
    assert res[3].step == 3
    res[3].run(step_fn(*res[:3]), progress=False)
    want, got = everything(*full), everything(*res)

    def flat(d):
        if isinstance(d, dict):
            return [x for k in sorted(d, key=str) for x in flat(d[k])]
        return [d] if torch.is_tensor(d) else []

    for part in want:
        a, b = flat(want[part]), flat(got[part])
        assert len(a) == len(b) > 0, part
        assert all(torch.equal(x, y) for x, y in zip(a, b)), part
    # the EMA is not the model (it lags), so comparing it is not comparing the model twice
    assert not all(torch.equal(x, y) for x, y in zip(flat(want["ema"]), flat(want["model"])))
    assert not list((tmp_path / "b").glob("*.tmp"))


def test_ema_follows_the_model_until_ema_start_then_averages(tmp_path):
    """EMA by hand: equal to the model through step ``ema_start``, then e <- d e + (1 - d) p after every step
    (seen to fail with the start compared one step early, and with the decay and its complement swapped)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    tr = Trainer("toy", m, tmp_path, LoopConfig(steps=6, lr=5e-2, ema_decay=0.8, ema_start=2, save_every=100),
                 torch.device("cpu"))
    params = []
    tr.run(_toy_step(m), progress=False, after_step=lambda step: params.append(m.weight.detach().clone()))
    ema = params[0]
    for step, p in enumerate(params, start=1):
        ema = p if step <= 2 else 0.8 * ema + 0.2 * p
    assert torch.allclose(tr.ema.model.weight, ema, atol=1e-7, rtol=0)
    assert tr.trained() is tr.ema.model and not torch.allclose(ema, params[-1])
    assert not any(p.requires_grad for p in tr.ema.model.parameters())  # the average is never trained itself


def test_trainer_builds_what_its_config_says(tmp_path):
    """The optimiser gets the config's lr, betas and weight decay and only the given parameters; no EMA at
    decay 0 (the trained weights are the model's); one process: the model itself runs forward; the run folder
    is created with its parents."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    cfg = LoopConfig(steps=1, lr=3e-3, betas=(0.5, 0.9), weight_decay=0.25)
    tr = Trainer("t", m, tmp_path / "a" / "b", cfg, torch.device("cpu"), params=m[1].parameters())
    (group,) = tr.opt.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.5, 0.9), 0.25)
    assert [p.data_ptr() for p in group["params"]] == [p.data_ptr() for p in m[1].parameters()]
    assert tr.ema is None and tr.trained() is m and tr.forward_model is m and (tmp_path / "a" / "b").is_dir()


def test_log_writes_json_lines_and_tensorboard_scalars(tmp_path, monkeypatch):
    """Each record is one JSON line; numbers (not the step) also go to TensorBoard when it is installed (a
    stand-in module here: tensorboard is not a dependency)."""
    import json
    import sys
    import types

    scalars = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda path: types.SimpleNamespace(add_scalar=lambda *a: scalars.append(a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    tr = Trainer("t", torch.nn.Linear(2, 1), tmp_path, LoopConfig(), torch.device("cpu"))
    tr.log({"step": 3, "loss": 0.5, "note": "x"})
    tr.log({"step": 4, "loss": 0.25})
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == \
        [{"step": 3, "loss": 0.5, "note": "x"}, {"step": 4, "loss": 0.25}]
    assert scalars == [("t/loss", 0.5, 3), ("t/loss", 0.25, 4)]


def test_step_generator_streams_are_distinct_and_fixed():
    """A step's noise depends on (seed, step, rank) only, and no two of them share a stream: no collision over
    seeds 0-2, steps 0-999 and ranks 0-63 (seen to fail with the rank dropped, and with a step stride of 32)."""
    seeds = {step_generator(seed, step, rank).initial_seed()
             for seed in range(3) for step in range(1000) for rank in range(64)}
    assert len(seeds) == 3 * 1000 * 64
    first, again = (torch.randn(3, generator=step_generator(2, 5, 1)) for _ in range(2))
    assert torch.equal(first, again)
    assert step_generator(4, 7).initial_seed() == step_generator(4, 7, 0).initial_seed()  # rank 0 by default


def test_time_budget_counts_over_every_run_of_a_stage(tmp_path):
    from avatarforcing.train.recipe import _check_finished

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        return m, Trainer("toy", m, tmp_path, LoopConfig(steps=10_000, lr=1e-2, save_every=100), torch.device("cpu"))

    def slow(model):
        inner = _toy_step(model)

        def step(s, micro, gen):
            t = time.perf_counter()
            while time.perf_counter() - t < 0.01:  # 10 ms of "training" per step
                pass
            return inner(s, micro, gen)
        return step

    m, tr = make()
    tr.run(slow(m), progress=False, budget_seconds=0.05)
    first = tr.step
    assert 1 <= first < 10 and tr.seconds >= 0.05
    assert _check_finished(tr, 10_000, "toy", 0.05)["steps"] == first  # the budget finishes the stage
    m, tr = make()  # a new session: the time already spent is in the checkpoint, so nothing is left to do
    assert tr.seconds >= 0.05
    tr.run(slow(m), progress=False, budget_seconds=0.05)
    assert tr.step == first
    tr.run(slow(m), progress=False, deadline=0.0)  # a session deadline stops without finishing the stage
    with pytest.raises(TimeoutError, match="resume"):
        _check_finished(tr, 10_000, "toy", None)


def test_ode_states_are_at_exactly_the_student_levels():
    cfg = tiny_cfg(teacher_steps=20)
    torch.manual_seed(0)
    teacher = AvatarDiT(cfg.model).eval()
    ref = torch.randn(1, 4, 1, 4, 4)
    rows = torch.randn(1, 5, 4, 128)
    levels = window_sigmas(tuple(cfg.stream.denoising_steps), cfg.stream.shift)
    grid = teacher_sigmas(20, cfg.stream.shift)
    idx = {lv: min(range(len(grid)), key=lambda i: abs(grid[i] - lv)) for lv in levels}
    assert all(abs(grid[i] - lv) < 1e-9 for lv, i in idx.items())  # the grid contains the levels
    clean, kept = teacher_sample(teacher, cfg, ref, rows, 4, torch.Generator().manual_seed(1), 20, 2.0, levels)
    # independent Euler integration, recording every state
    x = torch.randn((1, 4, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    states = []
    is_ref = torch.tensor([True, False, False, False, False])
    with torch.no_grad():
        for s_now, s_next in zip(grid[:-1], grid[1:]):
            states.append(x.clone())
            t = torch.tensor([[0.0] + [s_now] * 4]) * 1000
            v = teacher_velocity(teacher, teacher.condition(torch.cat([ref, x], 2), ref, is_ref), t,
                                 torch.arange(5), rows, 2.0)
            x = x + (s_next - s_now) * v[:, :, 1:]
    assert set(kept) == set(levels)
    for lv, i in idx.items():
        assert torch.allclose(kept[lv], states[i])
    assert torch.allclose(clean, x)


@pytest.mark.parametrize("seed", range(6))
def test_stage1_blocks_at_their_window_levels(seed, monkeypatch):
    cfg = tiny_cfg(temporal_anchor_frames=1)
    B, L = cfg.stream.block_frames, cfg.stream.window_blocks
    n = 6 * B
    sample = {"ref": torch.randn(1, 4, 1, 4, 4), "rows": torch.randn(1, 1 + n, 4, 128),
              "clean": torch.randn(1, 4, n, 4, 4), "states": [torch.full((1, 4, n, 4, 4), float(j)) for j in range(L)]}
    seen = {}

    def fake_forward(model, cfg_, ref, prev, prev_rows, x, sig, rows, k):
        seen.update(x=x, sig=sig, prev=prev)
        return x * 0 + sig.view(1, 1, -1, 1, 1)

    monkeypatch.setattr(stages, "window_forward", fake_forward)
    levels = window_sigmas(tuple(cfg.stream.denoising_steps), cfg.stream.shift)
    ode_loss(None, cfg, sample, np.random.default_rng(seed))
    x, sig = seen["x"], seen["sig"]
    for f in range(x.shape[2]):
        j = int(x[0, 0, f, 0, 0])  # which stored level this frame was taken from
        assert sig[f] == pytest.approx(levels[j])
    lv = [int(x[0, 0, f, 0, 0]) for f in range(0, x.shape[2], B)]
    assert lv == sorted(lv) and all(b - a == 1 for a, b in zip(lv, lv[1:]))  # oldest block least noisy


@pytest.mark.parametrize("scheme", ["reindexed", "release"])
@pytest.mark.parametrize("k", [0, 1])
def test_ode_window_forward_equals_the_engine_step(scheme, k):
    """The ODE stage's differentiable window step gives the engine's x0 (through the sampler reference, which
    equals the engine) for a warm-up window (k=0) and a window after block 0 (k=1), in both position schemes.
    Seen to fail with the window start hard-coded to n_temporal + 1 (the old code: wrong under ``release``)."""
    from .test_sampler_reference import Reference, conditioned

    B, L, nt = 2, 2, 1
    cfg = tiny_cfg(positions=scheme, block_frames=B, window_blocks=L, temporal_anchor_frames=nt,
                   denoising_steps=[1000, 500])
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval()
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(1, 4, 1, 4, 4, generator=g)
    prev, prev_rows = torch.randn(1, 4, B, 4, 4, generator=g), torch.randn(1, B, 4, 128, generator=g)
    x, rows = torch.randn(1, 4, L * B, 4, 4, generator=g), torch.randn(1, L * B, 4, 128, generator=g)
    levels = window_sigmas((1000, 500), cfg.stream.shift)
    sig = [levels[lv] for lv in range(L) for _ in range(B)]
    r = Reference(model, ref, 0, scheme, L, B, 1, nt, [1000, 500], cfg.stream.shift)
    with torch.no_grad():
        _, r.anchor_kv = model(conditioned(ref, ref, [True]), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long),
                               audio=torch.zeros_like(rows[:, :1]), return_kv=True)
        if k:
            _, kv = r.call(prev, [0.0] * B, "clean", k - 1, prev_rows)
            r.temporal_kv = [(kk[:, -nt * r.tpf:], vv[:, -nt * r.tpf:]) for kk, vv in kv]
        v, _ = r.call(x, sig, "window", k, rows)
        want = x - torch.tensor(sig).view(1, 1, -1, 1, 1) * v
        got = stages.window_forward(model, cfg, ref, prev if k else None, prev_rows if k else None, x,
                                    torch.tensor(sig), rows, k)
    assert torch.allclose(got, want, atol=2e-6, rtol=0), (got - want).abs().max()


def test_dmd_gradient_matches_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 2, 2, requires_grad=True)
    real, fake = torch.randn(1, 2, 3, 2, 2), torch.randn(1, 2, 3, 2, 2)
    dmd_generator_loss(x, fake, real).backward()
    g = (fake - real) / (x.detach() - real).abs().mean()
    assert torch.allclose(x.grad, g / x.numel(), atol=1e-7)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, out, port, fsdp=False):
    """``world`` processes train 3 steps; with 2 processes the run is stopped after step 2 and resumed by new
    Trainers (model, optimiser and EMA restored from the gathered checkpoint, re-sharded under FSDP)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor

    seconds, saved_critic = 0.0, None
    for steps in ([2, 3] if world > 1 else [3]):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        critic = torch.nn.Linear(3, 1)  # an extra module with its own optimiser, as DMD's critic (never sharded)
        copt = torch.optim.SGD(critic.parameters(), lr=0.1)
        tr = Trainer("ddp", m, out, LoopConfig(steps=steps, lr=0.1, log_every=1, save_every=100, fsdp=fsdp,
                                               ema_decay=0.5), torch.device("cpu"), extra={"critic": critic},
                     extra_optims={"critic": copt})
        assert rank or tr.seconds == seconds  # rank 0's training time so far (it wrote the checkpoint) is restored
        assert rank or saved_critic is None or torch.equal(critic.weight, saved_critic)  # rank 0's critic restored
        sharded = isinstance(next(m.parameters()), DTensor)
        assert sharded == (fsdp and world > 1) and (tr.ddp is not None) == (not fsdp and world > 1)

        def step(s, micro, gen, tr=tr, critic=critic, copt=copt):
            g = step_generator(0, s)  # the global batch depends on the step only; each rank takes its share
            x = torch.randn(8, 3, generator=g)[rank::world]
            y = x.sum(1, keepdim=True)
            copt.zero_grad()
            (critic(x) ** 2).mean().backward()
            copt.step()
            loss = ((tr.forward_model(x) - y) ** 2).mean()
            return loss, {"loss": loss.item()}

        tr.run(step, progress=False)
        seconds, saved_critic = tr.seconds, critic.weight.detach().clone()
        dist.barrier()  # the checkpoint of step 2 is on disk before anyone resumes from it
    # a trainer without an EMA may resume a run that had one (the EMA is left out, not loaded into nothing)
    bare = Trainer("ddp", torch.nn.Linear(3, 1), out, LoopConfig(steps=3, fsdp=fsdp), torch.device("cpu"))
    assert bare.step == 3 and bare.state()["ema"] is None
    full = tr.state()  # gathers the shards under FSDP
    if rank == 0:
        torch.save([full["model"][k] for k in ("weight", "bias")] + [full["ema"]["weight"]], out / "params.pt")
    dist.barrier()
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's background threads can abort a finished process at exit
    # ("terminate called without an active exception"), after every result has been written
    os._exit(0)


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_process_gloo_equals_one_process(tmp_path, fsdp):
    """DDP, and FSDP2 (parameters, gradients, optimiser state and EMA sharded), stopped and resumed at step 2:
    the same losses and weights as one process running 3 steps (seen to fail with the FSDP checkpoint's EMA
    or optimiser state not restored)."""
    import json

    ctx = mp.get_context("spawn")
    res = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        port = free_port()  # a fixed port can still be in TIME_WAIT from an earlier run
        procs = [ctx.Process(target=_ddp_worker, args=(r, world, out, port, fsdp)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        params = torch.load(out / "params.pt")
        losses = [json.loads(line)["loss"] for line in (out / "ddp.jsonl").read_text().splitlines()]
        res[world] = (params, losses)
    assert np.allclose(res[1][1], res[2][1], atol=1e-6)
    for a, b in zip(res[1][0], res[2][0]):
        assert torch.allclose(a, b, atol=1e-6)
    # the 2-process checkpoint (gathered) resumes in one process: step, weights and EMA as the run left them
    torch.manual_seed(0)
    one = Trainer("ddp", torch.nn.Linear(3, 1), tmp_path / "w2", LoopConfig(steps=3, lr=0.1, ema_decay=0.5),
                  torch.device("cpu"))
    state = one.state()
    assert one.step == 3 and state["step"] == 3
    for a, b in zip([state["model"]["weight"], state["model"]["bias"], state["ema"]["weight"]], res[2][0]):
        assert torch.equal(a, b)

"""Callback protocol and runner in plain PyTorch / Accelerate loops; the optimizer's election and clone
schedules driven through it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp

from egg_optim import (
    ConfigError,
    EggConfig,
    LeaderCloneOptimizer,
    PlanError,
    RolePlan,
    Schedule,
    StateDictMismatchError,
)
from egg_optim.callbacks import (
    EVENTS,
    Callback,
    CallbackRunner,
    LocalLossCallback,
    RoleLogger,
    build_callbacks,
    find_leader_clone_optimizer,
)
from egg_optim.core.election import bully_ranking

PLAN = RolePlan(0.4, 0.1)  # 20-unit layers "0" and "2": 8 leaders, 2 independents, 10 clones


def make(seed: int = 0, sizes=(6, 20, 20, 3), **kw):
    torch.manual_seed(seed)
    model = mlp(sizes)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    kw.setdefault("clone_every", "never")
    return model, LeaderCloneOptimizer(model, base, kw.pop("plan", PLAN), **kw)


def batches(n: int = 10, bs: int = 4, seed: int = 1, classes: int = 3, features: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * bs, features, generator=g)
    y = torch.randint(0, classes, (n * bs,), generator=g)
    return [(x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]) for i in range(n)]


def run(runner: CallbackRunner, model, data, epochs: int, num_micro_batches: int | None = None) -> None:
    runner.train_begin()
    for _ in range(epochs):
        runner.epoch_begin(num_micro_batches=num_micro_batches)
        for x, y in data:
            with runner.micro_step():
                runner.backward(F.cross_entropy(model(x), y))
        runner.epoch_end()
    runner.train_end()


class Recorder(Callback):
    """Records (event, global_step, epoch, sync_step, grads_are_none) for every event."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __getattribute__(self, name):
        if name in EVENTS:

            def record(state):
                p = next(iter(state.model.parameters())) if state.model is not None else None
                self.events.append((name, state.global_step, state.epoch, state.sync_step, p is None or p.grad is None))

            return record
        return super().__getattribute__(name)

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


@pytest.fixture(autouse=True)
def _reset(reset_accelerate):
    yield


def expected_epoch(step_inside_last: bool) -> list[str]:
    """10 micro-batches, accumulation 4: steps after micro-batches 4, 8 and a final partial step."""
    seq = ["on_epoch_begin"]
    for i in range(1, 11):
        seq.append("on_step_begin")
        if i in (4, 8) or (i == 10 and step_inside_last):
            seq += ["on_before_optimizer_step", "on_after_optimizer_step"]
        seq.append("on_step_end")
    if not step_inside_last:
        seq += ["on_before_optimizer_step", "on_after_optimizer_step"]
    return seq + ["on_epoch_end"]


# ---------------------------------------------------------------------------------------------- events
@pytest.mark.parametrize("known_length", [False, True])
def test_event_order_and_counts_with_accumulation(known_length):
    model, opt = make()
    rec = Recorder()
    runner = CallbackRunner([rec], model=model, optimizer=opt, accumulation_steps=4)
    run(runner, model, batches(), epochs=2, num_micro_batches=10 if known_length else None)

    epoch = expected_epoch(step_inside_last=known_length)
    assert rec.names() == ["on_train_begin", *epoch, *epoch, "on_train_end"]
    afters = [e for e in rec.events if e[0] == "on_after_optimizer_step"]
    assert [e[1] for e in afters] == [1, 2, 3, 4, 5, 6]
    assert [e[2] for e in afters] == [0, 0, 0, 1, 1, 1]
    assert opt.steps == 6 and runner.state.global_step == 6 and runner.state.micro_step == 20
    befores = [e for e in rec.events if e[0] == "on_before_optimizer_step"]
    assert all(e[3] for e in befores) and not any(e[4] for e in befores)  # sync, gradients present
    # zero_grad after every real step: micro-batches 1, 5, 9 of each epoch start with no gradient
    begins = [e for e in rec.events if e[0] == "on_step_begin"]
    assert [e[4] for e in begins[:10]] == [i in (0, 4, 8) for i in range(10)]
    assert [e[3] for e in begins[:10]] == [i in (3, 7) or (known_length and i == 9) for i in range(10)]


def test_explicit_optimizer_step_inside_block_is_not_repeated():
    model, opt = make()
    rec = Recorder()
    runner = CallbackRunner([rec], model=model, optimizer=opt, accumulation_steps=2)
    stepped = []
    runner.train_begin()
    runner.epoch_begin()
    for x, y in batches(4):
        with runner.micro_step():
            runner.backward(F.cross_entropy(model(x), y))
            stepped.append(runner.optimizer_step())
            assert runner.optimizer_step() is False
    runner.epoch_end()
    assert stepped == [False, True, False, True]
    assert opt.steps == 2 and rec.names().count("on_after_optimizer_step") == 2
    with pytest.raises(RuntimeError, match="inside"):
        runner.optimizer_step()


def test_no_flush_carries_partial_accumulation_into_next_epoch():
    model, opt = make()
    runner = CallbackRunner([], model=model, optimizer=opt, accumulation_steps=4, flush_partial=False)
    run(runner, model, batches(), epochs=2)
    assert opt.steps == 5  # 20 micro-batches: steps after 4, 8, 12, 16, 20


def test_event_order_with_accelerator_matches_known_length_loop():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    model, opt = make(elect_every=2)
    x = torch.cat([b[0] for b in batches()])
    y = torch.cat([b[1] for b in batches()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model, popt, loader = acc.prepare(model, opt, loader)
    assert find_leader_clone_optimizer(popt) is opt
    rec = Recorder()
    runner = CallbackRunner([rec], model=model, optimizer=popt, accelerator=acc)
    assert runner.state.accumulation_steps == 4
    run(runner, model, loader, epochs=2)
    epoch = expected_epoch(step_inside_last=True)  # Accelerate syncs at the end of a prepared dataloader
    assert rec.names() == ["on_train_begin", *epoch, *epoch, "on_train_end"]
    assert opt.steps == 6 and opt.elections == 3

    # the runner's state goes into Accelerate checkpoints
    acc.register_for_checkpointing(runner)
    saved = (runner.state.global_step, runner.state.micro_step)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        acc.save_state(d)
        runner.state.global_step = runner.state.micro_step = 0
        acc.load_state(d)
    assert (runner.state.global_step, runner.state.micro_step) == saved
    with pytest.raises(ConfigError, match="Accelerator"):
        CallbackRunner([], accelerator=acc, accumulation_steps=2)


# ---------------------------------------------------------------------------------------------- elections
class RoleTrace(Callback):
    def __init__(self) -> None:
        self.trace: list[tuple[int, int, dict]] = []

    def on_step_end(self, state):
        opt = state.egg_optimizer
        self.trace.append((state.epoch, state.global_step, dict(opt.roles)))


@pytest.mark.parametrize("election", ["weight_norm", "random"])
def test_election_at_epoch_start_keeps_roles_for_the_epoch(election):
    model, opt = make(election=election, elect_every="epoch")
    trace = RoleTrace()
    runner = CallbackRunner([trace], model=model, optimizer=opt)
    run(runner, model, batches(5), epochs=3)
    assert opt.elections == 2
    by_epoch = {e: [roles for ep, _, roles in trace.trace if ep == e] for e in range(3)}
    for e, seen in by_epoch.items():
        assert len(seen) == 5
        for roles in seen[1:]:
            assert all(roles[name] is seen[0][name] for name in opt.layers), f"roles changed inside epoch {e}"
    for e in (1, 2):
        for name in opt.layers:
            assert not by_epoch[e][0][name].same_as(by_epoch[e - 1][0][name])


@pytest.mark.parametrize(("every", "expected"), [(3, 7), (5, 4)])
def test_election_every_steps_and_epoch_start_do_not_double(every, expected):
    # 2 epochs x 10 steps. every=3: steps 3..18 (6) + epoch-1 start (after step 10) = 7.
    # every=5: steps 5, 10, 15, 20; epoch 1 starts right after step 10's election: no second one.
    model, opt = make(elect_every=f"{every}+epoch")
    assert opt.elect_every == Schedule(steps=every, epochs=1)
    run(CallbackRunner([], model=model, optimizer=opt), model, batches(), epochs=2)
    assert opt.elections == expected


# ---------------------------------------------------------------------------------------------- cloning
class RowTrace(Callback):
    def on_train_begin(self, state):
        self.rows: list[dict] = []

    def on_after_optimizer_step(self, state):
        opt = state.egg_optimizer
        snap = {}
        for name, layer in opt.layers.items():
            r = opt.roles[name]
            snap[name] = (r, layer.weight.detach().clone(), layer.module.bias.detach().clone())
        self.rows.append((state.global_step, opt.clone_events, snap))


def test_clone_schedule_every_k_steps_copies_and_clones_stay_frozen_between():
    model, opt = make(clone_every=3)
    rows = RowTrace()
    runner = CallbackRunner([rows], model=model, optimizer=opt)
    run(runner, model, batches(), epochs=1)
    assert opt.clone_events == 3
    assert [c for _, c, _ in rows.rows] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    prev = None
    for step, _, snap in rows.rows:
        for name, (r, w, b) in snap.items():
            if step % 3 == 0:
                assert torch.equal(w[r.clones], w[r.sources]) and torch.equal(b[r.clones], b[r.sources])
            else:
                assert not torch.equal(w[r.clones], w[r.sources])
            if prev is not None:
                _, pw, pb = prev[name]
                if step % 3 != 0:
                    assert torch.equal(w[r.clones], pw[r.clones]), f"clone rows moved at step {step}"
                    assert torch.equal(b[r.clones], pb[r.clones])
                assert not torch.equal(w[r.leaders], pw[r.leaders])  # leaders do train
        prev = snap


def test_clone_right_after_election_copies_the_new_leaders():
    model, opt = make(elect_every=3, clone_every=3)
    rows = RowTrace()
    runner = CallbackRunner([rows], model=model, optimizer=opt)
    run(runner, model, batches(6), epochs=1)
    assert opt.elections == 2 and opt.clone_events == 2
    for step, _, snap in rows.rows:
        if step % 3 == 0:
            for r, w, _ in snap.values():
                assert torch.equal(w[r.clones], w[r.sources])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("epoch+end", 2),  # epoch ends 0, 1; train end adds nothing new
        ("5+epoch", 4),  # steps 5, 10 (= epoch-0 end), 15, 20 (= epoch-1 end)
        ("end", 1),
        (Schedule(epochs=2), 1),
    ],
)
def test_clone_schedule_epochs_and_train_end(spec, expected):
    model, opt = make(clone_every=spec)
    run(CallbackRunner([], model=model, optimizer=opt), model, batches(), epochs=2)
    assert opt.clone_events == expected
    for name, r in opt.roles.items():
        w = opt.layers[name].weight
        assert torch.equal(w[r.clones], w[r.sources])  # the final model holds copies


# ---------------------------------------------------------------------------------------------- logging
def test_role_logger_writes_logs_and_calls_log_fn():
    model, opt = make()
    calls = []
    logger = RoleLogger(every_steps=2, log_fn=lambda m, step: calls.append((step, m["roles/elections"])))
    opt.elect_every = Schedule(steps=4)
    runner = CallbackRunner([logger], model=model, optimizer=opt)
    run(runner, model, batches(), epochs=1)
    # train begin, steps 2, 4, 6, 8, 10, epoch end
    assert calls == [(0, 0.0), (2, 0.0), (4, 1.0), (6, 1.0), (8, 2.0), (10, 2.0), (10, 2.0)]
    logs = runner.state.logs
    assert logs["roles/total/clones"] == 20.0 and logs["roles/total/leaders"] == 16.0
    assert not any(k.startswith("roles/0/") for k in logs)
    per_layer = RoleLogger(per_layer=True)
    per_layer.on_train_begin(runner.state)
    assert per_layer.last["roles/0/clones"] == 10.0 and per_layer.last["roles/2/leaders"] == 8.0


# ---------------------------------------------------------------------------------------------- state
def test_runner_state_round_trip_and_resumed_epoch_is_not_reelected(tmp_path):
    model, opt = make(elect_every="epoch", clone_every=2)
    runner = CallbackRunner([RoleLogger()], model=model, optimizer=opt)
    runner.train_begin()
    for epoch in range(2):
        runner.epoch_begin()
        for x, y in batches(3):
            with runner.micro_step():
                runner.backward(F.cross_entropy(model(x), y))
        if epoch == 1:
            break  # "crash" in the middle of epoch 1, after its election
        runner.epoch_end()
    runner.save(tmp_path)
    opt_state = opt.state_dict()
    assert opt.elections == 1 and opt.clone_events == 3 and opt.book.epoch_begun == 1

    model2, opt2 = make(seed=5, elect_every="epoch", clone_every=2)
    opt2.load_state_dict(opt_state)
    runner2 = CallbackRunner([RoleLogger()], model=model2, optimizer=opt2)
    runner2.load(tmp_path)
    assert runner2.state.global_step == 6 and runner2.state.epoch == 1
    runner2.train_begin()
    runner2.epoch_begin(epoch=1)  # the resumed epoch keeps its roles: the optimizer remembers it began
    assert opt2.elections == 1
    runner2.epoch_end()
    runner2.epoch_begin()
    assert runner2.state.epoch == 2 and opt2.elections == 2

    with pytest.raises(StateDictMismatchError):
        CallbackRunner([], model=model2, optimizer=opt2).load(tmp_path)


# ---------------------------------------------------------------------------------------------- local losses
def test_local_loss_callback_feeds_unit_scores_into_elections():
    pytest.importorskip("egg_optim.lfnn")
    from egg_optim.lfnn import LeaderFollowerLoss

    model, opt = make(sizes=(6, 12, 12, 3), plan=RolePlan(0.5, 0.0), election="local_loss")
    lf = LeaderFollowerLoss(model, ["0", "2"], num_classes=3, delta=0.5)
    seen: list[dict] = []
    observe = opt.observe_scores
    opt.observe_scores = lambda scores: (seen.append({k: v.clone() for k, v in scores.items()}), observe(scores))
    cb = LocalLossCallback(lf)
    opt.elect_every = Schedule(steps=3)
    runner = CallbackRunner([cb], model=model, optimizer=opt)
    runner.train_begin()
    runner.epoch_begin()
    for x, y in batches(3):
        with runner.micro_step():
            with lf.targets(y):
                out = model(x)
            runner.backward(lf.loss(out))
    assert cb.observations == 3 and len(seen) == 3 and opt.elections == 1
    for name in ("0", "2"):
        mean = (seen[0][name] + seen[1][name] + seen[2][name]) / 3
        assert torch.equal(opt.roles[name].leaders, torch.sort(bully_ranking(mean)[:6]).values)
    assert LocalLossCallback(lf).state_dict()["module"].keys() == lf.state_dict().keys()


# ---------------------------------------------------------------------------------------------- config / errors
@pytest.mark.parametrize(
    "make_bad",
    [
        lambda: RoleLogger(every_steps=True),
        lambda: LocalLossCallback(object()),
        lambda: CallbackRunner([object()]),
        lambda: CallbackRunner([], accumulation_steps=0),
        lambda: EggConfig(clone_every=0),
        lambda: EggConfig(clone_every="epoch:0"),
        lambda: EggConfig(elect_every=-3),
        lambda: EggConfig(elect_every="yes"),
        lambda: EggConfig(elect_every=True),
        lambda: EggConfig(election="coin_flip"),
        lambda: EggConfig(assign="nowhere"),
        lambda: EggConfig(hysteresis=-1.0),
        lambda: EggConfig(hysteresis=float("inf")),
        lambda: EggConfig(hysteresis="0.1"),
        lambda: EggConfig(clone_blend=2.0),
        lambda: EggConfig(clone_noise=float("inf")),
        lambda: EggConfig(clone_noise=float("nan")),
        lambda: EggConfig(clone_state="forget"),
        lambda: EggConfig(state_storage="sparse"),
        lambda: EggConfig(clone_mode="gradients"),
        lambda: EggConfig(clone_mode="output", eval_mode="whatever"),
        lambda: EggConfig(skip_clone_grads=1),
        lambda: EggConfig(local_losses=["fc1"]),
        lambda: EggConfig(local_losses={"layers": ["fc1"]}),
        lambda: EggConfig(seed=1.0),
        lambda: EggConfig(seed=2**63),
        lambda: EggConfig(log_roles="yes"),
        lambda: EggConfig().replace(clone_evry=3),
        lambda: build_callbacks(EggConfig(election="local_loss")),
    ],
)
def test_bad_configuration_raises_config_error(make_bad):
    with pytest.raises(ConfigError):
        make_bad()


@pytest.mark.parametrize("plan", ["gentle", 0.5, None])
def test_bad_plan_in_a_config_raises_plan_error(plan):
    with pytest.raises(PlanError):
        EggConfig(plan=plan)


def test_schedules_need_a_leader_clone_optimizer():
    model = mlp()
    runner = CallbackRunner([RoleLogger()], model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="LeaderCloneOptimizer"):
        runner.train_begin()


def test_egg_config_builds_optimizer_and_callbacks():
    cfg = EggConfig(plan="mild", clone_every=5, elect_every="epoch", election="grad_norm")
    model = mlp()
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), config=cfg)
    assert opt.config is cfg and opt.score.name == "grad_norm"
    assert opt.clone_every == Schedule(steps=5) and opt.elect_every == Schedule(epochs=1)
    assert opt.stats()["total"]["leaders"] == 16  # uniform mild: 0.40 of 2 x 20 units
    assert [type(c).__name__ for c in build_callbacks(cfg)] == ["RoleLogger"]
    # keyword options override the config, validated the same way
    assert LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), config=cfg, seed=3).seed == 3
    with pytest.raises(ConfigError, match="clone_evry"):
        LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), config=cfg, clone_evry=3)


# ---------------------------------------------------------------------------------------------- 2 processes
class _RankNoise(Callback):
    """Feeds rank-dependent scores: without the optimizer's all-reduce, ranks would elect different leaders."""

    def on_before_optimizer_step(self, state):
        import torch.distributed as dist

        opt = state.egg_optimizer
        g = torch.Generator().manual_seed(1000 * dist.get_rank() + state.global_step)
        opt.observe_scores({n: torch.rand(layer.num_units, generator=g) for n, layer in opt.layers.items()})


def _ddp_worker():
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert acc.num_processes == 2
    model, opt = make(election="local_loss", elect_every="2+epoch", clone_every=3)
    x = torch.cat([b[0] for b in batches(10)])
    y = torch.cat([b[1] for b in batches(10)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    pmodel, popt, loader = acc.prepare(model, opt, loader)
    rec = Recorder()
    cbs = [_RankNoise(), rec]
    runner = CallbackRunner(cbs, model=pmodel, optimizer=popt, accelerator=acc)
    run(runner, pmodel, loader, epochs=2)
    # 5 micro-batches per rank and epoch, accumulation 2: steps after 2, 4 and the end of the dataloader
    assert opt.steps == 6 and opt.elections == 4 and opt.clone_events == 2
    mine = [opt.elections, opt.clone_events, rec.names()] + [
        (r.codes.tolist(), r.source_map.tolist()) for r in opt.roles.values()
    ]
    both = [None, None]
    dist.all_gather_object(both, mine)
    assert both[0] == both[1], "ranks disagree on roles"
    w = opt.layers["0"].weight.detach().clone()
    ws = [torch.zeros_like(w), torch.zeros_like(w)]
    dist.all_gather(ws, w)
    assert torch.equal(ws[0], ws[1])


@pytest.mark.distributed
def test_two_processes_elect_identical_roles():
    pytest.importorskip("accelerate")
    # A fresh interpreter: forking this (multi-threaded) pytest process can deadlock the children.
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import accelerate, test_callbacks as t; "
        "accelerate.debug_launcher(t._ddp_worker, num_processes=2)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

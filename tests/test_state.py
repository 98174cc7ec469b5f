import copy
import io

import pytest
import torch
from conftest import TinySeedNet, mlp, model_state

from egg_optim import LeaderCloneOptimizer, RolePlan, StateDictMismatchError


def _make(seed=0, plan=None, **kw):
    torch.manual_seed(seed)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        plan or RolePlan.preset("mild", table="mnist"),
        clone_every=2,
        elect_every=3,
        election="grad_norm",
        assign="random",
        seed=seed,
        **kw,
    )
    return model, opt


def _steps(model, opt, start, stop):
    for i in range(start, stop):
        gen = torch.Generator().manual_seed(i)
        model(torch.randn(4, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_layout_and_weights_only():
    model, opt = _make()
    _steps(model, opt, 0, 4)
    sd = opt.state_dict()
    assert {"state", "param_groups", "egg_optim"} <= set(sd)
    loaded = _roundtrip(sd)
    assert loaded["egg_optim"]["steps"] == 4


def test_resume_is_bit_identical():
    model_a, opt_a = _make()
    _steps(model_a, opt_a, 0, 10)

    model_b, opt_b = _make()
    _steps(model_b, opt_b, 0, 5)
    saved_model, saved_opt = _roundtrip(model_b.state_dict()), _roundtrip(opt_b.state_dict())
    model_c, opt_c = _make(seed=123)  # different init, roles and seed: everything must come from the checkpoint
    model_c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved_opt)
    _steps(model_c, opt_c, 5, 10)

    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)
    assert all(opt_a.roles[n].same_as(opt_c.roles[n]) for n in opt_a.roles)
    assert opt_a.stats() == opt_c.stats()
    assert all(torch.equal(opt_a.leadership_counts()[n], opt_c.leadership_counts()[n]) for n in opt_a.roles)


def test_roundtrip_before_first_step_like_accelerate():
    model, opt = _make()
    roles = dict(opt.roles)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.optimizer.param_groups
    assert all(roles[n].same_as(opt.roles[n]) for n in roles)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    _steps(model, opt, 0, 1)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)


def _bad_dicts():
    model, opt = _make()
    _steps(model, opt, 0, 2)
    good = opt.state_dict()
    other_plan = _make(plan=RolePlan.preset("aggressive", table="mnist"))[1].state_dict()
    no_extra = opt.optimizer.state_dict()
    bad_roles = copy.deepcopy(good)
    bad_roles["egg_optim"]["layers"]["layer1.conv1"]["codes"][:] = 2  # all clones, no leader
    wrong_units = copy.deepcopy(good)
    wrong_units["egg_optim"]["layers"]["layer1.conv1"]["units"] = 99
    bad_groups = copy.deepcopy(good)
    bad_groups["param_groups"][0]["params"] = bad_groups["param_groups"][0]["params"][:-1]
    return [
        ("plan", other_plan),
        ("not saved by", no_extra),
        ("invalid roles", bad_roles),
        ("units", wrong_units),
        ("parameter group", bad_groups),
    ]


@pytest.mark.parametrize("idx", range(5))
def test_mismatched_state_dict_refused_and_nothing_changes(idx):
    match, bad = _bad_dicts()[idx]
    model, opt = _make()
    _steps(model, opt, 0, 3)
    before_model, before_opt = model_state(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["egg_optim"]["steps"] == before_opt["egg_optim"]["steps"]
    for name in opt.roles:
        assert torch.equal(
            after["egg_optim"]["layers"][name]["codes"], before_opt["egg_optim"]["layers"][name]["codes"]
        )
    for p, st in after["state"].items():
        for k, v in st.items():
            assert torch.equal(v, before_opt["state"][p][k])
    assert all(torch.equal(v, model_state(model)[k]) for k, v in before_model.items())


def test_loading_adopts_the_saved_seed_so_draws_continue_that_run():
    _, opt = _make(seed=1)
    _, other = _make(seed=0)
    opt.load_state_dict(other.state_dict())
    assert opt.seed == opt.config.seed == 0
    opt.elect_now(), other.elect_now()
    assert all(opt.roles[n].same_as(other.roles[n]) for n in opt.roles)


def test_state_dict_from_different_model_refused():
    model, opt = _make(plan=RolePlan(0.5))
    other = mlp((5, 12, 3))
    other_opt = LeaderCloneOptimizer(other, torch.optim.AdamW(other.parameters()), RolePlan(0.5))
    with pytest.raises(StateDictMismatchError, match="manages layers"):
        opt.load_state_dict(other_opt.state_dict())


def test_step_closure_and_grad_scaler_skip():
    model, opt = _make()
    x = torch.randn(4, 1, 6, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.steps == 1

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    (model(x).logsumexp(1).mean() * float("inf")).backward()  # overflow: the step is skipped
    scaler.scale(torch.zeros((), requires_grad=True)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    opt.zero_grad()
    scaler.scale(model(x).logsumexp(1).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.steps == 2


def test_accelerate_prepare_and_gradient_accumulation():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = _make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    pmodel, popt, psched = acc.prepare(model, opt, sched)
    assert popt.optimizer is opt
    for _ in range(6):
        with acc.accumulate(pmodel):
            acc.backward(pmodel(torch.randn(4, 1, 6, 6)).logsumexp(1).mean())
            popt.step()
            psched.step()
            popt.zero_grad()
    assert opt.steps == 3  # 6 micro-steps, accumulation 2
    assert opt.elections == 1  # elect_every=3
    assert opt.clone_events == 1  # clone_every=2
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)  # the scheduler drives the wrapper's groups
    acc.free_memory()

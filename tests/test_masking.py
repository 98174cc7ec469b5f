"""Exact role masking: clone rows and their optimizer state never move; every other row gets exactly the
bare optimizer's update."""

import copy

import pytest
import torch
from conftest import TinySeedNet, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan, UnsupportedOptimizerError, register_optimizer
from egg_optim.core.masking import row_state_keys

Optim = torch.optim
OPTIMIZERS = [
    (Optim.SGD, {"lr": 0.1}),
    (Optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    (Optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (Optim.Adam, {"lr": 1e-2, "weight_decay": 0.01}),
    (Optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (Optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (Optim.RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True, "weight_decay": 0.01}),
    (Optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1, "weight_decay": 0.01}),
    (Optim.NAdam, {"lr": 1e-2, "weight_decay": 0.01}),
    (Optim.RAdam, {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.01}),
    (Optim.Adamax, {"lr": 1e-2}),
    (Optim.Adadelta, {"lr": 1.0, "weight_decay": 0.01}),
    (Optim.ASGD, {"lr": 1e-2, "weight_decay": 0.01}),
    (Optim.Rprop, {"lr": 1e-2}),
]
IMPLS = [{"foreach": False}, {"foreach": True}]
FUSED = [
    (Optim.Adam, {"lr": 1e-2, "fused": True, "weight_decay": 0.01}),
    (Optim.AdamW, {"lr": 1e-2, "fused": True}),
    (Optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
    (Optim.Adagrad, {"lr": 0.1, "fused": True}),
]


def _net(kind: str, widths: tuple[int, int], norm: bool) -> nn.Module:
    if kind == "mlp":
        return mlp((5, *widths, 3), norm=norm)
    layers = [nn.Conv2d(2, widths[0], 3, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(widths[0]))
    layers += [nn.ReLU(), nn.Conv2d(widths[0], widths[1], 1)]
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[1], 3)]
    return nn.Sequential(*layers)


def _batch(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Linear):
        return torch.randn(7, first.in_features, generator=gen)
    return torch.randn(4, first.in_channels, 5, 5, generator=gen)


def _backward(model, gen):
    model(_batch(model, gen)).square().mean().backward()


def _full_state(opt: LeaderCloneOptimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter optimizer state at full size, whatever the storage (clone rows: whatever export gives)."""
    sd = opt.export_optimizer_state()
    names = [n for n, _ in model.named_parameters()]
    return {names[i]: {k: v for k, v in st.items() if torch.is_tensor(v)} for i, st in sd["state"].items()}


def _check_one_step(opt: LeaderCloneOptimizer, model: nn.Module, cls, kwargs, exact: bool = True) -> None:
    """Compare one wrapped step against the bare optimizer from the same parameters, state and gradients.

    ``exact=False``: non-clone rows within float rounding. CPU fused kernels run a vector loop and a scalar tail
    that round differently, so a row's result may depend on the tensor's length (compact storage changes it)."""
    same = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-12)
    opt.couple_norms()  # what step() would do first: the norm entries the forward pass coupled are units' too
    ref_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()  # deepcopy drops .grad of Parameters
    ref_opt = cls(ref_model.parameters(), **kwargs)
    ref_opt.load_state_dict(copy.deepcopy(opt.export_optimizer_state()))
    names = dict(model.named_parameters())
    ref_params = dict(ref_model.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    before_state = {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for n, p in names.items()}
    clone_rows = {}
    for lname, layer in opt.layers.items():
        for pname, _ in layer.params:
            clone_rows[pname] = opt.roles[lname].clones
    ref_opt.step()
    opt.step()
    state = _full_state(opt, model)
    for n, p in names.items():
        rows = clone_rows.get(n, torch.empty(0, dtype=torch.long))
        keep = torch.ones(p.shape[0], dtype=torch.bool)
        keep[rows] = False
        assert same(p[keep], ref_params[n][keep]), f"{n}: non-clone rows differ from the bare optimizer"
        assert torch.equal(p[rows], before[n][rows]), f"{n}: clone rows moved"
        for key in row_state_keys(p, state.get(n, {})):
            ref_state = ref_opt.state[ref_params[n]][key]
            assert same(state[n][key][keep], ref_state[keep]), f"{n}.{key}: non-clone state differs"
        if opt.state_storage == "full":
            for key in row_state_keys(p, opt.state[p]):
                if key in before_state[n]:
                    moved = not torch.equal(opt.state[p][key][rows], before_state[n][key][rows])
                    assert not moved, f"{n}.{key}: clone state moved"
        elif rows.numel():
            n_active = p.shape[0] - rows.numel()
            shapes = {k: tuple(v.shape) for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()}
            assert all(s[0] == n_active for s in shapes.values()), f"{n}: clones hold state {shapes}"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    opt_spec=st.sampled_from(OPTIMIZERS),
    impl=st.sampled_from(IMPLS),
    kind=st.sampled_from(["mlp", "conv"]),
    widths=st.tuples(st.integers(4, 24), st.integers(4, 24)),
    norm=st.booleans(),
    lead=st.floats(0.2, 0.6),
    ind=st.floats(0.0, 0.3),
    seed=st.integers(0, 1000),
    storage=st.sampled_from(["compact", "full"]),
)
def test_clone_rows_frozen_and_others_exact(opt_spec, impl, kind, widths, norm, lead, ind, seed, storage):
    cls, kwargs = opt_spec
    kwargs = {**kwargs, **impl}
    torch.manual_seed(seed)
    model = _net(kind, widths, norm)
    base = cls(model.parameters(), **kwargs)
    opt = LeaderCloneOptimizer(model, base, RolePlan(lead, ind), seed=seed, state_storage=storage, clone_every=None)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):  # the first step creates state lazily; later steps exercise existing state
        _backward(model, gen)
        _check_one_step(opt, model, cls, kwargs)
        opt.zero_grad()


@pytest.mark.parametrize("storage", ["compact", "full"])
@pytest.mark.parametrize("cls, kwargs", FUSED)
def test_fused_variants(cls, kwargs, storage):
    torch.manual_seed(0)
    model = _net("conv", (8, 6), True)
    try:
        base = cls(model.parameters(), **kwargs)
    except (RuntimeError, ValueError) as e:  # pragma: no cover - platform without fused kernels
        pytest.skip(f"fused {cls.__name__} unavailable: {e}")
    opt = LeaderCloneOptimizer(model, base, RolePlan(0.3, 0.2), state_storage=storage, clone_every=None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        _backward(model, gen)
        _check_one_step(opt, model, cls, kwargs, exact=storage == "full")
        opt.zero_grad()


@settings(max_examples=15, deadline=None)
@given(opt_spec=st.sampled_from(OPTIMIZERS), impl=st.sampled_from(IMPLS), seed=st.integers(0, 1000))
def test_no_clones_is_bit_identical_to_bare(opt_spec, impl, seed):
    cls, kwargs = opt_spec
    kwargs = {**kwargs, **impl}
    runs = []
    for wrap in (False, True):
        torch.manual_seed(seed)
        model = TinySeedNet()
        base = cls(model.parameters(), **kwargs)
        plan = RolePlan(0.5, 0.5)  # leaders + independents, no clones: roles exist, elections run
        opt = LeaderCloneOptimizer(model, base, plan, elect_every=2, election="grad_norm") if wrap else base
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(4):
            model(torch.randn(3, 1, 6, 6, generator=gen)).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        runs.append(model)
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)


def test_seed_net_multi_step_clones_frozen_between_cloning():
    torch.manual_seed(0)
    model = TinySeedNet()
    opt = LeaderCloneOptimizer(
        model,
        Optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5),
        RolePlan.preset("mild", table="mnist"),
        clone_every=None,
    )
    layer = opt.layers["layer2.conv2"]
    clones = opt.roles["layer2.conv2"].clones
    # the norm is coupled at the first forward pass: snapshot both modules' tensors now
    unit_owned = {n: p for n, p in model.named_parameters() if n.startswith(("layer2.conv2.", "layer2.bn2."))}
    start = {n: p.detach()[clones].clone() for n, p in unit_owned.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        model(torch.randn(4, 1, 6, 6, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in unit_owned.items():
        assert torch.equal(p.detach()[clones], start[n]), n
    # BN parameters of the coupled norm are masked too
    assert {n for n, _ in layer.params} == {
        f"layer2.{k}" for k in ("conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias")
    }


def test_unsupported_optimizer_refused_and_registration():
    model = mlp()

    class Custom(Optim.SGD):
        pass

    with pytest.raises(UnsupportedOptimizerError, match="register_optimizer"):
        LeaderCloneOptimizer(model, Custom(model.parameters(), lr=0.1), RolePlan(0.5))
    with pytest.raises(UnsupportedOptimizerError):
        LeaderCloneOptimizer(model, Optim.LBFGS(model.parameters()), RolePlan(0.5))
    register_optimizer(Custom)
    LeaderCloneOptimizer(model, Custom(model.parameters(), lr=0.1), RolePlan(0.5))
    with pytest.raises(UnsupportedOptimizerError):
        register_optimizer(int)

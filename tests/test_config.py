"""EggConfig, Schedule and the command lines derived from them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from conftest import mlp
from hypothesis import given
from hypothesis import strategies as st

from egg_optim import (
    ConfigError,
    EggConfig,
    LeaderCloneOptimizer,
    OptimizerInfo,
    RolePlan,
    Schedule,
    add_config_arguments,
    config_from_args,
    register_optimizer,
)
from egg_optim.optim.registry import SUPPORTED_OPTIMIZERS

schedules = st.builds(Schedule, st.none() | st.integers(1, 10**6), st.none() | st.integers(1, 50), st.booleans())


@given(schedules)
def test_schedule_text_form_round_trips(s):
    assert Schedule.parse(str(s)) == s
    assert Schedule.parse(s) is s


@given(schedules, st.integers(1, 200))
def test_schedule_triggers(s, n):
    assert s.after_step(n) == (s.steps is not None and n % s.steps == 0)
    assert not s.at_epoch_begin(0)  # the initial roles serve the first epoch
    assert s.at_epoch_begin(n) == (s.epochs is not None and n % s.epochs == 0)
    assert s.at_epoch_end(n - 1) == (s.epochs is not None and n % s.epochs == 0)


@pytest.mark.parametrize("bad", ["sometimes", "0", "-3", "epoch:0", "epoch:x", "100+", 1.5, True, [3]])
def test_bad_schedules_refused(bad):
    with pytest.raises(ConfigError):
        Schedule.parse(bad)


def test_auto_clone_schedule_depends_on_the_mode():
    assert EggConfig().clone_schedule == Schedule(steps=1)
    assert EggConfig(clone_mode="output").clone_schedule.never
    assert EggConfig(clone_every="never").clone_schedule.never
    assert EggConfig(clone_every=None).clone_schedule.never


def test_config_is_frozen_and_replace_validates():
    cfg = EggConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    assert cfg.replace(seed=3).seed == 3 and cfg.seed == 0
    with pytest.raises(ConfigError, match="assign"):
        cfg.replace(assign="nobody")
    with pytest.raises(ConfigError, match="first_roles"):
        cfg.replace(first_roles="sorted")


def _parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(p, **kwargs)
    return p


def test_every_cli_field_becomes_a_flag_with_the_config_default():
    p = _parser()
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    cli = {f.name for f in dataclasses.fields(EggConfig) if f.metadata.get("cli") is not None}
    assert set(flags) == cli
    assert config_from_args(p.parse_args([])) == EggConfig()


def test_flags_parse_into_the_same_config_as_keywords():
    p = _parser(exclude=("plan",), flags={"seed": "--role-seed"})
    args = p.parse_args(
        ["--clone-mode", "output", "--elect-every", "100+epoch", "--hysteresis", "0.25", "--skip-clone-grads", "off",
         "--role-seed", "7", "--no-log-roles", "--election", "weight_norm"]
    )  # fmt: skip
    cfg = config_from_args(args, plan=RolePlan(0.3, 0.1))
    assert cfg == EggConfig(
        plan=RolePlan(0.3, 0.1),
        clone_mode="output",
        elect_every="100+epoch",
        hysteresis=0.25,
        skip_clone_grads=False,
        seed=7,
        log_roles=False,
        election="weight_norm",
    )
    assert cfg.elect_schedule == Schedule(steps=100, epochs=1)


@pytest.mark.parametrize(
    "argv",
    [["--clone-noise", "inf"], ["--hysteresis", "-1"], ["--elect-every", "often"], ["--seed", "1.5"],
     ["--clone-state", "forget"], ["--skip-clone-grads", "maybe"]],
)  # fmt: skip
def test_bad_flags_are_argparse_errors(argv):
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(argv)


def test_signature_is_primitives_only():
    sig = EggConfig(plan=RolePlan(0.3), elect_every=5, election=lambda layer: layer.weight[:, 0]).signature()
    assert sig["elect_every"] == "5" and sig["election"] == "<lambda>" and isinstance(sig["plan"], str)
    assert all(isinstance(v, (str, int, float, bool, dict, type(None))) for v in sig.values())


# ---------------------------------------------------------------------------------------------- registry
def test_registered_optimizer_declares_its_fresh_state():
    class Accumulate(torch.optim.Optimizer):
        """Elementwise: acc starts at the group's ``start`` (not zero)."""

        def __init__(self, params, lr=0.1, start=0.5):
            super().__init__(params, {"lr": lr, "start": start})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if not st:
                        st["acc"] = torch.full_like(p, g["start"])
                    st["acc"].add_(p.grad.square())
                    p.sub_(g["lr"] * p.grad / st["acc"].sqrt())

    try:
        register_optimizer(fresh={"acc": "start"})(Accumulate)
        assert SUPPORTED_OPTIMIZERS[Accumulate] == OptimizerInfo(Accumulate, {"acc": "start"})
        model = mlp()
        opt = LeaderCloneOptimizer(
            model, Accumulate(model.parameters(), start=0.5), RolePlan(0.5), clone_every=None, clone_state="reset"
        )
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        sd = opt.state_dict()  # full-size: clone rows hold the declared fresh value, not zero
        roles = opt.roles["0"]
        acc = sd["state"][0]["acc"]
        assert torch.all(acc[roles.clones] == 0.5) and bool((acc[roles.active] > 0.5).any())
        with pytest.raises(Exception, match="already registered"):
            register_optimizer(Accumulate, fresh={"acc": 1.0})
    finally:
        SUPPORTED_OPTIMIZERS.pop(Accumulate, None)

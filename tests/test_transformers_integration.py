"""The transformers Trainer adapter: EggTrainer, EggTrainerCallback, EggConfig, on real Trainer.train() runs."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from egg_optim import ConfigError, EggConfig, LeaderCloneOptimizer, RolePlan  # noqa: E402
from egg_optim.callbacks import RoleLogger  # noqa: E402
from egg_optim.integrations.transformers import (  # noqa: E402
    EggTrainer,
    EggTrainerCallback,
    EggTrainerMixin,
    make_egg_trainer,
)

PLAN = RolePlan(0.4, 0.1)  # fc1, fc2 (16 units): 6 leaders, 2 independents, 8 clones


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x, labels=None):
        logits = self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)  # 4 steps of 8 per epoch
    y = torch.randint(0, 4, (32,), generator=g)
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")


@pytest.fixture(autouse=True)
def _reset(reset_accelerate):
    yield


def targs(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_steps=3,
        logging_steps=1,
        weight_decay=0.1,  # AdamW's decay would move clone rows if masking failed
        learning_rate=1e-2,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


SCHEDULE = dict(plan=PLAN, clone_every=2, elect_every="3+epoch")


class Probe(TrainerCallback):
    """Runs after the egg callback: records what the optimizer looks like after every optimizer step."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        opt = optimizer.optimizer
        assert isinstance(opt, LeaderCloneOptimizer)
        self.rows.append(
            {
                "step": state.global_step,
                "elections": opt.elections,
                "clone_events": opt.clone_events,
                "roles": dict(opt.roles),
                "w": {n: layer.weight.detach().clone() for n, layer in opt.layers.items()},
                "lr": opt.param_groups[0]["lr"],
                "sched_lr": lr_scheduler.get_last_lr()[0],
            }
        )


@pytest.fixture(scope="module")
def schedule_run(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("egg_run")
    torch.manual_seed(0)
    trainer = EggTrainer(model=Net(), args=targs(out), train_dataset=dataset, egg=EggConfig(**SCHEDULE))
    probe = Probe()
    trainer.add_callback(probe)
    trainer.train()
    return trainer, probe, out


def test_trainer_steps_the_wrapper_and_scheduler_drives_its_groups(schedule_run):
    trainer, probe, _ = schedule_run
    opt = trainer.egg_optimizer
    assert isinstance(opt, LeaderCloneOptimizer) and trainer.optimizer.optimizer is opt
    assert opt.steps == 6
    assert trainer.lr_scheduler.optimizer is trainer.optimizer
    lrs = [r["lr"] for r in probe.rows]
    assert lrs == [r["sched_lr"] for r in probe.rows]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # linear decay reached the wrapper's param_groups
    assert opt.optimizer.param_groups is opt.param_groups


def test_roles_change_on_schedule(schedule_run):
    _, probe, _ = schedule_run
    # elect_every=3 -> step 3; epoch 1 starts after step 4 -> before step 5; step 6. clone_every=2 -> 2, 4, 6.
    assert [r["elections"] for r in probe.rows] == [0, 0, 1, 1, 2, 3]
    assert [r["clone_events"] for r in probe.rows] == [0, 1, 1, 2, 2, 3]
    for prev, cur in zip(probe.rows, probe.rows[1:]):
        changed = cur["elections"] != prev["elections"]
        for name in cur["roles"]:
            assert (cur["roles"][name] is prev["roles"][name]) != changed


def test_clone_rows_frozen_between_clone_events(schedule_run):
    _, probe, _ = schedule_run
    for prev, cur in zip(probe.rows, probe.rows[1:]):
        for name, r in cur["roles"].items():
            w, pw, pr = cur["w"][name], prev["w"][name], prev["roles"][name]
            if cur["clone_events"] != prev["clone_events"]:
                assert torch.equal(w[r.clones], w[r.sources])  # just cloned: copies of their leaders
                continue
            # the step ran under the previous or the current roles: rows that are clones in both stay put
            frozen = r.clones[torch.isin(r.clones, pr.clones)]
            trained = r.leaders[torch.isin(r.leaders, pr.leaders)]
            assert frozen.numel() and trained.numel()
            assert torch.equal(w[frozen], pw[frozen]), f"clone rows of {name} moved at step {cur['step']}"
            assert not torch.equal(w[trained], pw[trained])


def test_role_stats_in_log_history(schedule_run):
    trainer, probe, _ = schedule_run
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3, 4, 5, 6]
    assert [h["roles/elections"] for h in train_logs] == [float(r["elections"]) for r in probe.rows]
    assert [h["roles/clone_events"] for h in train_logs] == [float(r["clone_events"]) for r in probe.rows]
    assert all(h["roles/total/clones"] == 16.0 and h["roles/total/leaders"] == 12.0 for h in train_logs)


def test_checkpoint_holds_callback_state(schedule_run):
    _, _, out = schedule_run
    for step in (3, 6):
        ckpt = out / f"checkpoint-{step}"
        state = torch.load(ckpt / "egg_callbacks.pt", weights_only=True)
        assert list(state["callbacks"]) == ["0:RoleLogger"]
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)["egg_optim"]
        assert opt_state["elections"] == {3: 1, 6: 3}[step]
        assert opt_state["epoch_begun"] == {3: 0, 6: 1}[step]


def test_resume_restores_roles_and_callback_state(schedule_run, dataset, tmp_path):
    trainer_a, _, out = schedule_run
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    trainer_b = EggTrainer(model=Net(), args=targs(tmp_path), train_dataset=dataset, egg=EggConfig(**SCHEDULE))
    trainer_b.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert trainer_b.egg_callback.restored_from == str(out / "checkpoint-3")
    a, b = trainer_a.egg_optimizer, trainer_b.egg_optimizer
    # the optimizer state remembers that epoch 0 began: resuming in it does not re-elect (else 4 elections)
    assert (b.steps, b.elections, b.clone_events) == (a.steps, a.elections, a.clone_events) == (6, 3, 3)
    for name in a.roles:
        assert b.roles[name].same_as(a.roles[name])
    assert trainer_b.egg_callback.state_dict() == trainer_a.egg_callback.state_dict()


def test_plain_trainer_with_callback_and_wrapper(dataset, tmp_path):
    torch.manual_seed(0)
    model = Net()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = LeaderCloneOptimizer(model, base, PLAN, elect_every=2, clone_every=2)
    cb = EggTrainerCallback([RoleLogger()])
    trainer = Trainer(
        model=model, args=targs(tmp_path, max_steps=4), train_dataset=dataset, optimizers=(opt, None), callbacks=[cb]
    )
    trainer.train()
    assert trainer.optimizer.optimizer is opt and opt.elections == 2 and opt.clone_events == 2
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["roles/elections"] for h in train_logs] == [0.0, 1.0, 1.0, 2.0]
    assert (tmp_path / "checkpoint-3" / "egg_callbacks.pt").is_file()


def test_local_losses_join_the_one_training_loss(dataset, tmp_path):
    pytest.importorskip("egg_optim.lfnn")

    class LossProbe(EggTrainer):
        seen: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if model.training:
                self.seen.append((float(loss.detach()), float(outputs["loss"].detach())))
            return (loss, outputs) if return_outputs else loss

    cfg = EggConfig(
        plan=RolePlan(0.5, 0.0),
        election="local_loss",
        elect_every=2,
        local_losses={"layers": ["fc1", "fc2"], "num_classes": 4, "delta": 0.5},
    )
    torch.manual_seed(0)
    trainer = LossProbe(model=Net(), args=targs(tmp_path, max_steps=4, save_steps=10), train_dataset=dataset, egg=cfg)
    trainer.train()
    lf = trainer.egg_local_loss
    assert len(trainer.seen) == 4
    assert all(total > global_ + 1e-4 for total, global_ in trainer.seen)  # L_g + local terms
    local_logged = [h["local_loss"] for h in trainer.state.log_history if "loss" in h]
    assert local_logged == pytest.approx([t - g for t, g in trainer.seen], rel=1e-4, abs=1e-5)
    assert sum(int(c.sum()) for c in lf.leadership_counts().values()) == 4 * 2 * 2  # 4 steps x 2 layers x 2 leaders
    assert trainer.egg_callback.callbacks[0].observations == 4
    assert trainer.egg_optimizer.elections == 2


def test_output_cloning_follows_elections(dataset, tmp_path):
    pytest.importorskip("egg_optim.rewrites.output_cloning")
    torch.manual_seed(0)
    from egg_optim.rewrites.output_cloning import is_output_cloned

    cfg = EggConfig(plan=PLAN, elect_every=2, clone_mode="output")
    trainer = EggTrainer(model=Net(), args=targs(tmp_path, max_steps=4), train_dataset=dataset, egg=cfg)
    trainer.train()
    opt = trainer.egg_optimizer
    oc = opt.output_cloning
    assert is_output_cloned(trainer.model.fc1) and is_output_cloned(trainer.model.fc2)
    assert opt.elections == 2 and (tmp_path / "checkpoint-3" / "model.safetensors").is_file()
    for name, r in opt.roles.items():
        assert oc.roles[name].same_as(r)


def test_make_egg_trainer_and_config_errors(dataset, tmp_path):
    assert make_egg_trainer(Trainer) is EggTrainer

    class MyTrainer(Trainer):
        pass

    Egg = make_egg_trainer(MyTrainer)
    assert issubclass(Egg, MyTrainer) and issubclass(Egg, EggTrainerMixin) and make_egg_trainer(Egg) is Egg
    with pytest.raises(ConfigError):
        make_egg_trainer(object)
    with pytest.raises(ConfigError):
        EggTrainer(model=Net(), args=targs(tmp_path), train_dataset=dataset, egg={"plan": "mild"})
    with pytest.raises(ConfigError):
        EggTrainerCallback(state_file=os.path.join("a", "b.pt"))


def test_torch_compile_couples_the_norms_from_an_eager_pass_first(tmp_path):
    """TrainingArguments(torch_compile=True): the Trainer compiles the model before its first forward pass, which
    then gives the norm coupling no evidence; EggTrainer runs the first training examples through the eager model
    once (eval mode, no gradients) when it builds the optimizer, so the norms are coupled as in an eager run."""
    import logging

    class BNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn1, self.out = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

        def forward(self, x, labels=None):
            logits = self.out(torch.relu(self.bn1(self.fc1(x))))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(0)
    rows = {"x": torch.randn(32, 8, generator=g).tolist(), "labels": torch.randint(0, 4, (32,), generator=g).tolist()}
    data = datasets.Dataset.from_dict({**rows, "note": ["unused"] * 32}).with_format("torch")
    cfg = EggConfig(plan=RolePlan(0.5, 0.0), clone_mode="output")
    coupled = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        kw = {"torch_compile": True, "torch_compile_backend": "eager"} if compiled else {}
        trainer = EggTrainer(model=BNNet(), args=targs(tmp_path / str(compiled), max_steps=2, **kw),
                             train_dataset=data, egg=cfg)  # fmt: skip
        logger = logging.getLogger("egg_optim")
        seen = []
        handler = logging.Handler()
        handler.emit = lambda record, seen=seen: seen.append(record.getMessage())
        logger.addHandler(handler)
        try:
            trainer.train()
        finally:
            logger.removeHandler(handler)
        assert not any("no complete eager forward pass" in m for m in seen), seen
        coupled[compiled] = trainer.egg_optimizer.coupled_norms
    assert coupled[True] == coupled[False] == {"fc1": "bn1"}

"""What a run manages, said once at construction and returned by ``opt.coverage()`` (issue 20)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from egg_optim import EggConfig, LeaderCloneOptimizer, PlanError, RolePlan
from egg_optim.core.coverage import Coverage

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def llama(heads: int = 4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    if heads != 4:  # the config now says 3 heads of 8 (the model has 4): the attention cannot be decomposed
        cfg.num_attention_heads = heads
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def test_one_line_is_logged_and_coverage_returns_it_as_frozen_data(caplog):
    model = llama()
    with caplog.at_level(logging.INFO, logger="egg_optim"):
        opt = LeaderCloneOptimizer(model, torch.optim.AdamW(model.parameters()), RolePlan(0.4, 0.1),
                                   clone_mode="output")  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "transformer blocks found" in r.getMessage()]
    assert len(lines) == 1
    cov = opt.coverage()
    assert isinstance(cov, Coverage) and lines[0] == cov.line()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cov.blocks_found = 0
    blocks = {f"model.layers.{i}.{b}": k for i in (0, 1) for b, k in (("self_attn", "attention"), ("mlp", "mlp"))}
    assert cov.blocks_found == 4 and dict(cov.blocks) == blocks and dict(cov.managed_blocks) == blocks
    assert dict(cov.units) == {"attention units": 4, "mlp neurons": 96} and cov.row_layers == ()
    assert list(cov.left_alone) == ["lm_head"] and "output head" in cov.left_alone["lm_head"]
    owned = sum(p.numel() for lay in opt.layers.values() for _, p in lay.params)
    embedding = model.model.embed_tokens.weight.numel()
    assert cov.managed_params == owned and cov.total_params == sum(p.numel() for p in model.parameters()) - embedding
    assert 0.5 < cov.share < 1 and "roles on" in cov.line()
    assert set(cov.modes.values()) == {"unchecked"}  # output mode: decided at the first forward pass
    model(input_ids=ids())
    assert set(opt.coverage().modes.values()) == {"shrink"}
    assert cov.as_dict()["units"] == {"attention units": 4, "mlp neurons": 96}


def test_a_block_found_but_not_decomposed_warns_and_its_layers_are_left_alone():
    model = llama(heads=3)
    base = torch.optim.AdamW(model.parameters())
    with pytest.warns(UserWarning, match=r"2 transformer block\(s\).*not decomposed.*model\.layers\.0\.self_attn"):
        opt = LeaderCloneOptimizer(model, base, RolePlan(0.4, 0.1))
    cov = opt.coverage()
    assert set(cov.not_decomposed) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert "3 heads" in cov.not_decomposed["model.layers.0.self_attn"]
    assert set(opt.layers) == {"model.layers.0.mlp", "model.layers.1.mlp"}  # q/k/v/o: not rows by accident
    assert cov.row_layers == () and cov.blocks_found == 4 and len(cov.blocks) == 2
    # strict mode refuses, before anything changes
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(PlanError, match=r"not decomposed.*strict_blocks"):
        LeaderCloneOptimizer(model, base, config=EggConfig(plan=RolePlan(0.4, 0.1), strict_blocks=True,
                                                           clone_mode="output"))  # fmt: skip
    assert {n: type(m) for n, m in model.named_modules()} == classes
    # a plan that names them manages them as rows
    with pytest.warns(UserWarning, match="not decomposed"):
        named = LeaderCloneOptimizer(model, base, RolePlan(0.5, layers=["*.o_proj", "*.mlp"]))
    assert named.coverage().row_layers == ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj")


def test_layers_the_optimizer_does_not_train_are_reported():
    model = llama()
    model.model.layers[1].mlp.requires_grad_(False)
    with pytest.warns(UserWarning, match="unmanaged"):
        opt = LeaderCloneOptimizer(model, torch.optim.AdamW(p for p in model.parameters() if p.requires_grad))
    cov = opt.coverage()
    assert cov.left_alone["model.layers.1.mlp"] == "its parameters are frozen or not in the optimizer"
    assert "model.layers.1.mlp" in cov.blocks and "model.layers.1.mlp" not in cov.managed_blocks


def test_strict_blocks_is_an_option_like_any_other():
    assert EggConfig().strict_blocks is False
    from egg_optim.errors import ConfigError

    with pytest.raises(ConfigError, match="strict_blocks"):
        EggConfig(strict_blocks="yes")

"""Runs of LeaderCloneOptimizer under FSDP2 (``fully_shard``) for tests/test_fsdp.py: the 2-process worker and the
one-process references it is compared with. Not a test module (imported by the spawned processes too)."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from conftest import TinySeedNet, mlp
from torch import nn

from egg_optim import LeaderCloneOptimizer, RolePlan

STEPS = 9
COMMON = {"clone_every": 2, "elect_every": 3, "assign": "random", "seed": 7}
# name -> how the model is built, sharded and trained. order: "after" (optimizer built on the sharded model),
# "before" (built first, then sharded and the optimizer's params swapped, as Accelerate's prepare does),
# "nested"/"nested_before" (blocks / decoder layers sharded too); eval_elect: an election right after an evaluation
# pass (as at an epoch start)
SCENARIOS: dict[str, dict[str, Any]] = {
    "mlp_weight": dict(kind="mlp", order="before", clone_mode="weight", election="grad_norm",
                       clone_noise=0.05, clone_state="copy"),
    "seed_output": dict(kind="seed", order="after", clone_mode="output", election="weight_norm", assign="nearest",
                        eval_elect=True),
    "llama_output": dict(kind="llama", order="nested", clone_mode="output", election="random"),
    # attention that splits its fused qkv at a stored width: set to the active heads' for each forward pass
    "gpt2_output": dict(kind="gpt2", order="nested", clone_mode="output", election="random"),
    "llama_weight": dict(kind="llama", order="after", clone_mode="weight", election="taylor", clone_blend=0.5,
                         clone_state="reset"),
    "seed_weight_grad_skip": dict(kind="seed", order="nested_before", clone_mode="weight", election="random"),
    "mlp_frozen": dict(kind="mlp", order="after", clone_mode="weight", election="random", clone_every=4,
                       elect_every="never"),
    "mlp_rank_data": dict(kind="mlp", order="after", clone_mode="weight", election="random", rank_data=True),
    "llama_output_graduate": dict(kind="llama", order="nested", clone_mode="output", elect_every="never",
                                  graduate="3:0.7,6:1", graduate_noise=0.05),
    "moe_output": dict(kind="moe", order="nested", clone_mode="output", election="weight_norm"),
    # packed roles kept (no election): full storage masks every rank's clone slices by runs
    "moe_weight_packed": dict(kind="moe", order="after", clone_mode="weight", elect_every="never"),
    "moe_weight": dict(kind="moe", order="after", clone_mode="weight", election="grad_norm", clone_state="copy"),
    "seed_weight_graduate": dict(kind="seed", order="after", clone_mode="weight", elect_every="never",
                                 graduate="4:1", graduate_state="reset"),
    # packed roles whose sources cycle over a run: a clone event moves the sources' run (broadcast by the ranks
    # holding it: with 60 % leaders 13 leader rows of 21, across both ranks' shards), the experts nothing; with
    # 40 % the clones straddle the ranks' shards, rank 1's starting at the cycle's second source
    "mlp_weight_views": dict(kind="mlp", order="after", clone_mode="weight", elect_every="never", clone_every=1,
                             assign="round_robin", plan=(0.6, 0.1), measure=True),
    "mlp_weight_views_cycle": dict(kind="mlp", order="after", clone_mode="weight", elect_every="never",
                                   clone_every=1, assign="round_robin", measure=True),
    "llama_weight_views": dict(kind="llama", order="nested", clone_mode="weight", elect_every="never",
                               clone_every=1, assign="first", measure=True),
    "moe_weight_views": dict(kind="moe", order="after", clone_mode="weight", elect_every="never", clone_every=1,
                             assign="round_robin", measure=True),
    # drawn (scattered) roles, as elections leave them: the distinct sources' rows, broadcast by their ranks
    "mlp_weight_drawn": dict(kind="mlp", order="after", clone_mode="weight", elect_every="never", clone_every=1,
                             assign="random", first_roles="drawn", measure=True),
    "moe_weight_drawn": dict(kind="moe", order="after", clone_mode="weight", elect_every="never", clone_every=1,
                             assign="round_robin", first_roles="drawn", measure=True),
    # optimizer state copied with the rows (clone_state="copy"): the sources' state rows broadcast too
    "mlp_weight_drawn_copy": dict(kind="mlp", order="after", clone_mode="weight", elect_every="never", clone_every=1,
                                  assign="random", first_roles="drawn", clone_state="copy", measure=True),
    "llama_weight_drawn": dict(kind="llama", order="nested", clone_mode="weight", elect_every="never",
                               clone_every=1, assign="round_robin", first_roles="drawn", clone_noise=0.05,
                               measure=True),
}  # fmt: skip
# checkpoint round trips: name -> (scenario options, how the checkpoint is written and read)
CHECKPOINTS: dict[str, tuple[dict[str, Any], str]] = {
    "per_rank": (dict(kind="seed", clone_mode="output", election="weight_norm", assign="nearest"), "per_rank"),
    "full_broadcast": (dict(kind="seed", clone_mode="weight", election="weight_norm"), "full"),
    "dcp_sharded": (dict(kind="llama", clone_mode="output", election="random"), "dcp"),
    "unsharded_into_sharded": (dict(kind="mlp", clone_mode="weight", election="grad_norm"), "plain"),
    "moe_per_rank": (dict(kind="moe", clone_mode="weight", election="grad_norm", clone_state="copy"), "per_rank"),
}  # fmt: skip


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "seed":
        return TinySeedNet()
    if kind == "mlp":
        return mlp((6, 21, 13, 3))  # odd widths: uneven shards (11/10 and 7/6 rows)
    import transformers

    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_inner=48, n_layer=2, n_head=4, vocab_size=50, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "moe":  # fused experts, 5 of them: uneven shards of whole experts (3 / 2)
        cfg = transformers.Qwen2MoeConfig(
            hidden_size=32, intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=24,
            num_experts=5, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50, tie_word_embeddings=False,
        )  # fmt: skip
        return transformers.Qwen2MoeForCausalLM(cfg)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=50, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def batch(kind: str, step: int, rank: int | None = None) -> torch.Tensor:
    """The batch of ``step`` (``rank``: that rank's own half of a batch twice the size, else the shared one)."""
    g = torch.Generator().manual_seed(1000 + step)
    n = {"seed": 4, "mlp": 8, "llama": 2, "moe": 2, "gpt2": 2}[kind]
    if kind == "seed":
        x = torch.randn(2 * n, 1, 6, 6, generator=g)
    elif kind == "mlp":
        x = torch.randn(2 * n, 6, generator=g)
    else:
        x = torch.randint(0, 50, (2 * n, 8), generator=g)
    return x if rank is None else x[rank * n : (rank + 1) * n]


def loss_of(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x).logits if kind in ("llama", "moe", "gpt2") else model(x)
    return out.float().logsumexp(-1).mean()


def shard(model: nn.Module, order: str) -> None:
    from torch.distributed.fsdp import fully_shard

    if order.startswith("nested"):
        for m in list(model.modules()):
            if type(m).__name__.endswith("DecoderLayer") or type(m).__name__ in ("TinyBlock", "GPT2Block"):
                fully_shard(m)
    fully_shard(model)


def make(opts: dict[str, Any], sharded: bool) -> tuple[nn.Module, LeaderCloneOptimizer]:
    """Model and optimizer for ``opts`` (a scenario), sharded over the world or not."""
    opts = {**COMMON, **opts}
    kind, order, plan = opts.pop("kind"), opts.pop("order", "after"), opts.pop("plan", (0.4, 0.1))
    for key in ("rank_data", "eval_elect", "measure"):
        opts.pop(key, None)
    model = build(kind)
    names = {id(p): n for n, p in model.named_parameters()}
    if sharded and not order.endswith("before"):
        shard(model, order)
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = LeaderCloneOptimizer(model, base, RolePlan(*plan), **opts)
    if sharded and order.endswith("before"):  # what Accelerate's prepare does after the optimizer exists
        shard(model, order)
        new = dict(model.named_parameters())
        for g in base.param_groups:
            g["params"] = [new[names[id(p)]] for p in g["params"]]
    return model, opt


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as full tensors (clone rows filled, as saved)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def own_rows(opt: LeaderCloneOptimizer) -> dict[str, torch.Tensor]:
    """Every unit-owned tensor as it is (not as saved: output mode saves clones filled), gathered."""
    return {
        q: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for _, q, t in opt.controller.owned()
    }


def roles_of(opt: LeaderCloneOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: r.state() for n, r in opt.roles.items()}


def train(opts: dict[str, Any], sharded: bool, steps: int = STEPS, rank: int | None = None) -> dict[str, Any]:
    """Train a scenario; ``rank`` (with ``opts["rank_data"]``): this rank's half of each batch, ``-1``: both halves
    in one process. Records every unit-owned tensor after each step (``frozen`` scenarios)."""
    model, opt = make(opts, sharded)
    kind = opts["kind"]
    history = []
    for s in range(steps):
        x = batch(kind, s, rank) if opts.get("rank_data") and rank is not None and rank >= 0 else batch(kind, s)
        loss_of(model, kind, x).backward()
        if opts.get("measure") and s == steps - 1:
            count = counted(opt.step)
        else:
            opt.step()
        opt.zero_grad()
        if opts.get("elect_every") == "never":
            history.append(own_rows(opt))
        if opts.get("eval_elect") and s == 4:  # an evaluation pass leaves FSDP2's root gathered; then an election
            model.eval()
            with torch.no_grad():
                loss_of(model, kind, batch(kind, s))
            model.train()
            opt.elect_now()
    out = {"state": gathered(model), "roles": roles_of(opt), "elections": opt.elections, "steps": opt.steps}
    out.update(history=history, storage=opt.state_storage, sharded=opt.sharded, grad_skip=opt.grad_skip is not None)
    # full storage's entries: how many mask this rank's clone slices by strided copies of runs (no index op)
    out["mask_runs"] = sum(e.runs is not None for e in opt.masked._mask), len(opt.masked._mask)
    if opt.output_cloning is not None:
        out["fused"] = opt.output_cloning.norms
    if opt.block_output is not None:  # blocks computing their active units with their width attributes set
        out["resized"] = sorted(n for n in opt.block_output.groups if opt.block_output.resized(n))
    if opts.get("measure"):  # the last step's collectives and host reads, and a bare Adam step's on this model
        bare = build(kind)
        if sharded:
            shard(bare, opts.get("order", "after"))
        adam = torch.optim.Adam(bare.parameters(), lr=1e-2)
        loss_of(bare, kind, batch(kind, 0)).backward()
        out["step"], out["bare_step"] = count, counted(adam.step)
    return out


def counted(step) -> dict[str, Any]:
    """Collectives, their bytes and host reads (``_local_scalar_dense``) of one optimizer step."""
    from egg_optim.utils.profiling import DispatchCounter

    with DispatchCounter() as c:
        step()
    return {"collectives": dict(c.collectives), "bytes": c.collective_bytes, "reads": c.ops["_local_scalar_dense"]}


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_round_trip(opts: dict[str, Any], how: str, folder: str) -> dict[str, Any]:
    """Train 7 steps, checkpoint, train 6 more; then a fresh model and optimizer load the checkpoint and train
    the same 6: both must end identical. ``how``: per-rank ``state_dict()`` files, a full state dict through
    ``get/set_optimizer_state_dict`` (rank 0 writes, broadcast on load), DCP shards, or (``plain``) the
    checkpoint of an unsharded run (every rank trains the same) loaded into the sharded one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    kind, rank = opts["kind"], dist.get_rank()

    def run(model, opt, lo, hi):
        for s in range(lo, hi):
            loss_of(model, kind, batch(kind, s)).backward()
            opt.step()
            opt.zero_grad()

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt = make(opts, sharded=how != "plain")
    run(model, opt, 0, 7)
    if how == "per_rank":
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, os.path.join(folder, f"r{rank}.pt"))
    elif how == "full":
        saved = {
            "model": get_model_state_dict(model, options=full),
            "optim": get_optimizer_state_dict(model, opt, options=full),
        }
        if rank == 0:
            torch.save(saved, os.path.join(folder, "full.pt"))
    elif how == "dcp":
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder
        )
    else:
        plain = {"model": model.state_dict(), "optim": opt.state_dict()}
        model, opt = make(opts, sharded=True)  # the sharded run to compare with, uninterrupted
        run(model, opt, 0, 7)
    dist.barrier()
    run(model, opt, 7, 13)
    reference = {"state": gathered(model), "own": own_rows(opt), "roles": roles_of(opt), "steps": opt.steps}

    model, opt = make(opts, sharded=True)
    if how == "per_rank":
        saved = torch.load(os.path.join(folder, f"r{rank}.pt"), weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
    elif how == "full":
        saved = (
            torch.load(os.path.join(folder, "full.pt"), weights_only=True) if rank == 0 else {"model": {}, "optim": {}}
        )
        o = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, saved["model"], options=o)
        set_optimizer_state_dict(model, opt, saved["optim"], options=o)
    elif how == "dcp":
        template = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=folder)
        set_model_state_dict(model, template["model"])
        set_optimizer_state_dict(model, opt, template["optim"])
    else:
        set_model_state_dict(model, plain["model"], options=StateDictOptions(full_state_dict=True))
        opt.load_state_dict(plain["optim"])
    loaded_steps = opt.steps
    run(model, opt, 7, 13)
    resumed = {"state": gathered(model), "own": own_rows(opt), "roles": roles_of(opt), "steps": opt.steps}
    return {"reference": reference, "resumed": resumed, "loaded_steps": loaded_steps}


# ---------------------------------------------------------------------------------------------- Accelerate
def accelerate_round_trip(folder: str) -> dict[str, Any]:
    """Accelerate's own FSDP2 code (prepare swaps in sharded parameters after the optimizer was built;
    save_state / load_state through get/set_optimizer_state_dict). Accelerate picks multi-CPU whenever it runs on
    CPU, so FSDP is forced onto its state after the Accelerator is built; everything after that is Accelerate's."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, state_dict_type="FULL_STATE_DICT", auto_wrap_policy="transformer_based_wrap"
    )
    opts = dict(kind="mlp", clone_mode="output", election="weight_norm", assign="nearest")

    def prepared():
        model, opt = make(opts, sharded=False)
        model, wrapped = acc.prepare(model, opt)
        return model, wrapped, opt

    def run(model, wrapped, lo, hi):
        for s in range(lo, hi):
            acc.backward(loss_of(model, "mlp", batch("mlp", s)))
            wrapped.step()
            wrapped.zero_grad()

    model, wrapped, opt = prepared()
    run(model, wrapped, 0, 7)
    acc.save_state(folder)
    run(model, wrapped, 7, 12)
    reference = {"state": gathered(model), "roles": roles_of(opt), "sharded": opt.sharded}
    acc._models.clear()
    acc._optimizers.clear()
    model, wrapped, opt = prepared()
    acc.load_state(folder)
    loaded_steps = opt.steps
    run(model, wrapped, 7, 12)
    return {
        "reference": reference,
        "resumed": {"state": gathered(model), "roles": roles_of(opt)},
        "loaded_steps": loaded_steps,
    }


# ---------------------------------------------------------------------------------------------- the probe
# attention that mixes its heads (left alone), a fused qkv projection interleaved per head (its layout found by the
# probe), ALiBi heads (clones said to be approximate; its BloomBlocks are not sharded apart: only the root is),
# linear attention (a depthwise convolution among its unit slices, its weight read without calling it)
PROBED = ("diffllama", "gpt_neox", "bloom", "qwen3_5")


def probed(family: str, sharded: bool) -> dict[str, Any]:
    """Coverage of a default output-mode plan on a tiny ``family`` (decoder layers and root ``fully_shard``-ed first:
    the blocks are checked by dataflow all the same), the loss of one step after it, and whether construction left
    every parameter sharded."""
    from egg_recipes import tiny_transformers as tiny

    model = tiny.make(family)
    if sharded:
        shard(model, "nested")
    opt = LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), clone_mode="output")
    resharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    loss = model(**tiny.inputs(family)).loss
    loss.backward()
    opt.step()
    layouts = {n: lay.group.layout for n, lay in opt.controller.layers.items() if lay.group is not None}
    return {"coverage": opt.coverage().as_dict(), "layouts": layouts, "resharded": resharded, "loss": loss.item()}


# ---------------------------------------------------------------------------------------------- non-finite
NONFINITE = ("moe_weight_views", "moe_weight_drawn", "mlp_weight_drawn")


def nonfinite(sharded: bool, name: str) -> dict[str, Any]:
    """Clone events after a NaN was put into a source row that only rank 1 holds (of a fused expert, copied in
    place; of a Linear, fetched by both ranks): the step path's check (per layer, on the device), then
    ``clone_now``'s (per clone unit); every rank must decide as one process does. Returns the unit-owned tensors
    after each and the clone units kept at the step."""
    from egg_optim.core.sharding import full, write_full_

    model, opt = make(SCENARIOS[name], sharded)
    kind = SCENARIOS[name]["kind"]
    for s in range(2):
        loss_of(model, kind, batch(kind, s)).backward()
        opt.step()
        opt.zero_grad()
    if kind == "moe":  # the last expert's first neuron: a leader, the source of clones
        p, at = dict(model.named_parameters())["model.layers.1.mlp.experts.gate_up_proj"], (-1, 0)
    else:  # the last source of the first layer's clones: in rank 1's rows (11 of 21 on rank 0)
        lname, layer = next(iter(opt.layers.items()))
        p, at = layer.params[0][1], (int(opt.roles[lname].sources.max()), 0)
        assert at[0] >= 11, at
    value = full(p).clone()
    value[at] = float("nan")
    write_full_(p.detach(), value)
    opt.controller._clone(on_device=True)
    out: dict[str, Any] = {"kept_step": opt.controller.settle_clone_checks()}
    out["step"] = {k: v.nan_to_num(123.0) for k, v in own_rows(opt).items()}
    opt.clone_now()
    out["now"] = {k: v.nan_to_num(123.0) for k, v in own_rows(opt).items()}
    return out


# ---------------------------------------------------------------------------------------------- fetches
def fetches() -> dict[tuple, bool]:
    """``sharding.fetch`` of runs of a tensor sharded along ``dim`` (uneven shards, a rank with none, a run
    across both ranks' shards) and of scattered positions: (size, dim, first, count) or (size, dim, positions) ->
    whether every rank got exactly those positions."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from egg_optim.core import sharding

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for n, dim in ((21, 0), (1, 0), (7, 1)):
        shape = (n, 3) if dim == 0 else (4, n)
        whole = torch.arange(float(n * shape[1 - dim])).view(shape)
        t = distribute_tensor(whole, mesh, [Shard(dim)])
        shards = sharding.row_shards(t, dim)
        for first, count in {(0, n), (max(0, n // 2 - 1), min(n, 3)), (n - 1, 1)}:
            got, works = sharding.fetch(t, dim, (first, count), shards)
            for work in works:
                work.wait()
            out[n, dim, first, count] = torch.equal(got, whole.narrow(dim, first, count))
        positions = torch.tensor(
            sorted({0, n // 3, n // 2, min(n // 2 + 1, n - 1), n - 1})
        )  # drawn roles: distinct sources
        got, works = sharding.fetch(t, dim, positions, shards)
        for work in works:
            work.wait()
        out[n, dim, tuple(positions.tolist())] = torch.equal(got, whole.index_select(dim, positions))
    return out


# ---------------------------------------------------------------------------------------------- refusals
def refusals() -> dict[str, str]:
    """Error type and message of what FSDP2 cannot do with roles."""
    from torch.distributed.fsdp import fully_shard

    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "no error"
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            out[name] = f"{type(exc).__name__}: {exc}"

    def leaf_first():  # fully_shard on a managed layer itself, then output mode
        model = build("mlp")
        fully_shard(model[0])
        fully_shard(model)
        LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), RolePlan(0.4, 0.1), clone_mode="output")

    def leaf_after():  # output mode first, then Accelerate-style sharding of a managed layer
        model, opt = make(dict(kind="mlp", clone_mode="output", election="random"), sharded=False)
        names = {id(p): n for n, p in model.named_parameters()}
        fully_shard(model[0])
        fully_shard(model)
        new = dict(model.named_parameters())
        for g in opt.param_groups:
            g["params"] = [new[names[id(p)]] for p in g["params"]]
        loss_of(model, "mlp", batch("mlp", 0)).backward()
        opt.step()

    def export():
        model, opt = make(dict(kind="mlp", clone_mode="output", election="random"), sharded=True)
        opt.export_model()

    def experts_split():  # fused experts sharded along their neurons: no rank holds a whole unit's slices
        from torch.distributed.tensor import Shard

        model = build("moe")
        fully_shard(model, shard_placement_fn=lambda p: Shard(1) if p.dim() == 3 else None)
        LeaderCloneOptimizer(model, torch.optim.Adam(model.parameters()), RolePlan(0.4, 0.1))

    attempt("leaf_first", leaf_first)
    attempt("experts_split", experts_split)
    attempt("leaf_after", leaf_after)
    attempt("export_model", export)
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    results: dict[str, Any] = {}

    def part(name, fn, *args):
        # an error both ranks raise alike is recorded for the test that reads this part; the others still run
        try:
            results[name] = fn(*args)
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}

    try:
        for name, opts in SCENARIOS.items():
            part(name, train, opts, True, STEPS, rank)
        for name, (opts, how) in CHECKPOINTS.items():
            folder = os.path.join(out_dir, f"ck_{name}")
            os.makedirs(folder, exist_ok=True)
            part(f"ckpt_{name}", checkpoint_round_trip, {**opts, "order": "after"}, how, folder)
            dist.barrier()
        for family in PROBED:
            part(f"probe_{family}", probed, family, True)
        part("fetches", fetches)
        for name in NONFINITE:
            part(f"nonfinite_{name}", nonfinite, True, name)
        part("refusals", refusals)
        part("accelerate", accelerate_round_trip, os.path.join(out_dir, "acc"))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()

"""Roles under FSDP2 (``fully_shard``, 2 CPU processes over gloo): training with roles gives, bit for bit, the
weights and roles of one process without FSDP (identical data on both ranks), on both ranks; clone rows stay
frozen between clone events; every checkpoint route resumes exactly; Accelerate's own FSDP2 code works; what
cannot work is refused with a typed error.

One 2-process run (module fixture) does everything; each test reads its part and, where it compares with one
process, computes that reference here."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import _fsdp_worker as w  # noqa: E402
from conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of the 2-process run."""
    out = tmp_path_factory.mktemp("fsdp")
    tests_dir = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")
    ctx = mp.spawn(w.worker, args=(2, free_port(), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the FSDP2 processes did not finish in {TIMEOUT_S} s")
    except Exception:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for i in range(2):
            path = out / f"rank{i}.pt"
            if path.exists():
                errors = [f"{k}: {v['error']}" for k, v in torch.load(path, weights_only=False).items() if "error" in v]
                if errors:
                    raise AssertionError(f"rank {i} failed:\n" + "\n".join(errors)) from None
        raise
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]


def part(ranks, name: str) -> list[dict]:
    """Both ranks' results of one part of the run; a part that raised fails the test with its traceback."""
    out = [r[name] for r in ranks]
    for i, res in enumerate(out):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"rank {i}, {name}:\n{res['error']}")
    return out


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {bad[:5]} differ"


def assert_same_roles(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        for k in ("codes", "source_map"):
            assert torch.equal(a[n][k], b[n][k]), f"{what}: roles of {n} ({k}) differ"


@pytest.mark.parametrize(
    "name", [n for n in w.SCENARIOS if n not in ("mlp_frozen", "mlp_rank_data") and "graduate" not in w.SCENARIOS[n]]
)
def test_sharded_training_is_bit_identical_to_one_process(ranks, name):
    """Same data on both ranks: gathered weights (as saved: clone rows filled) and roles equal a one-process run
    without FSDP, bit for bit, on both ranks. FSDP2 uses full storage; the reference uses the default compact
    storage, which trains the same, except that clone_state="copy"/"reset" act at clone events in full storage
    and at promotions in compact storage: those references use full storage."""
    r0, r1 = part(ranks, name)
    opts = w.SCENARIOS[name]
    ref = w.train({**opts, "state_storage": "full"} if opts.get("clone_state", "keep") != "keep" else opts, False)
    assert r0["sharded"] and r0["storage"] == "full"
    elections = 0 if opts.get("elect_every") == "never" else 3 + bool(opts.get("eval_elect"))
    assert r0["elections"] == ref["elections"] == elections
    for r in (r0, r1):
        assert_same_roles(r["roles"], ref["roles"], name)
        assert_same(r["state"], ref["state"], name)
    if opts.get("elect_every") == "never" and opts.get("clone_every") != 1:  # packed roles, clones masked: every
        # local clone slice is a few runs, no index op (cloned at every step, they are not masked at all)
        for r in (r0, r1):
            runs, entries = r["mask_runs"]
            assert entries and runs == entries, r["mask_runs"]
    if name == "seed_output":  # the BatchNorms were fused under FSDP2 as without it
        assert r0["fused"] and r0["fused"] == ref["fused"]
    if name == "seed_weight_grad_skip":
        assert r0["grad_skip"] and ref["grad_skip"]
    if name == "gpt2_output":  # under FSDP2 as without it: attention at the active heads, split_size set
        assert r0["resized"] == r1["resized"] == ref["resized"] == ["transformer.h.0.attn", "transformer.h.1.attn"]


@pytest.mark.parametrize("name", [n for n in w.SCENARIOS if "graduate" in w.SCENARIOS[n]])
def test_graduation_under_fsdp2_is_bit_identical_to_one_process(ranks, name):
    """Graduating sharded units (noise and state policies included) gives, on both ranks, the weights and roles of
    one process without FSDP (full storage, where the state policy acts alike), ending dense."""
    r0, r1 = part(ranks, name)
    ref = w.train({**w.SCENARIOS[name], "state_storage": "full"}, False)
    assert r0["sharded"] and r0["elections"] == ref["elections"] == 0
    for r in (r0, r1):
        assert_same_roles(r["roles"], ref["roles"], name)
        assert_same(r["state"], ref["state"], name)
        assert all(not bool((roles["codes"] == 2).any()) for roles in r["roles"].values()), "clones left"


@pytest.mark.parametrize("name", [n for n in w.SCENARIOS if w.SCENARIOS[n].get("measure")])
def test_a_weight_mode_clone_event_moves_only_the_sources_rows(ranks, name):
    """A clone event at every step: no all-gather of the managed tensors, only the distinct sources' rows broadcast
    by the ranks holding them (fused experts, whole per rank, copied in place: nothing), on packed roles as on the
    drawn roles elections leave; no host read beyond a bare Adam step's (the finiteness check stays on the device;
    ranks agree by an all-reduce; each writes the clone positions it holds)."""
    _, opt = w.make(w.SCENARIOS[name], sharded=False)
    sources = 0  # bytes of the sources' rows of every tensor FSDP2 splits along its unit axis
    for lname, layer in opt.layers.items():
        for q, p in layer.params:
            if layer.copied_by_clones(q) and layer.dim_of(q) == 0:
                er = layer.roles_of(q, opt.roles[lname])
                sources += er.sources.unique().numel() * p[0].numel() * p.element_size()
    copied = sum(p.numel() * p.element_size() for layer in opt.layers.values() for q, p in layer.params)
    assert 0 < sources < copied / 2
    for r in part(ranks, name):
        step, bare = r["step"], r["bare_step"]
        assert step["collectives"].get("broadcast_") and set(step["collectives"]) <= {"broadcast_", "allreduce_"}
        flags = 8 * len(opt.layers) * step["collectives"].get("allreduce_", 0)  # the check's per-layer flags
        copies = 3 if w.SCENARIOS[name].get("clone_state") == "copy" else 1  # Adam's two state rows move too
        assert step["bytes"] <= copies * sources + flags, (step, sources)
        assert bare["collectives"] == {}
        if copies == 1:  # the check stays on the device, packed roles or drawn (copying state reads it on the host)
            assert step["reads"] == bare["reads"], (step, bare)


@pytest.mark.parametrize("name", w.NONFINITE)
def test_ranks_agree_on_clones_whose_source_is_not_finite(ranks, name):
    """A NaN in a source row that only rank 1 holds (a fused expert copied in place, packed roles or drawn; a
    Linear's row fetched by both ranks, drawn roles): the step path keeps that layer's clones on both ranks (its
    check on the device, each rank writing its own clone rows), clone_now keeps the clones of that source, as one
    process does."""
    ref = w.nonfinite(False, name)
    assert ref["kept_step"] > 0
    for r in part(ranks, f"nonfinite_{name}"):
        assert r["kept_step"] == ref["kept_step"]
        assert_same(r["step"], ref["step"], "after the step path's clone event")
        assert_same(r["now"], ref["now"], "after clone_now")


def test_fetch_broadcasts_a_run_from_every_rank_holding_part_of_it(ranks):
    """``sharding.fetch``: a run of positions of a sharded tensor (along dim 0 or 1, uneven shards, a rank holding
    none, a run across both ranks' shards), or scattered positions, arrive whole on every rank."""
    for got in part(ranks, "fetches"):
        assert len(got) == 10 and all(got.values()), got
        assert (21, 0, 9, 3) in got  # the run across both shards (rows 0-10 and 11-20)
        assert (21, 0, (0, 7, 10, 11, 20)) in got  # scattered positions on both shards


def test_clone_rows_stay_frozen_between_clone_events(ranks):
    """clone_every=4, no elections: a clone's rows change only at steps 4 and 8 (and then equal its source's);
    the leaders' rows change every step. Checked on the gathered tensors of the sharded run."""
    r = part(ranks, "mlp_frozen")[0]
    ref = w.train(w.SCENARIOS["mlp_frozen"], sharded=False)
    model, opt = w.make(w.SCENARIOS["mlp_frozen"], sharded=False)
    start = w.own_rows(opt)
    history = [start, *r["history"]]
    for name, layer in opt.layers.items():
        roles = opt.roles[name]
        for qname, _ in layer.params:
            er, dim = layer.roles_of(qname, roles), layer.dim_of(qname)
            for step in range(1, len(history)):
                before, after = history[step - 1][qname], history[step][qname]
                clones_before, clones_after = (t.index_select(dim, er.clones) for t in (before, after))
                if step % 4:
                    assert torch.equal(clones_after, clones_before), (qname, step)
                else:
                    assert torch.equal(clones_after, after.index_select(dim, er.sources)), (qname, step)
                assert not torch.equal(after.index_select(dim, er.leaders), before.index_select(dim, er.leaders))
    for a, b in zip(r["history"], ref["history"]):
        assert_same(a, b, "frozen history vs one process")


def test_ranks_with_their_own_data_agree(ranks):
    """Each rank trains on its own half of every batch (FSDP2 averages the gradients): both ranks hold the same
    roles; weights equal one process on whole batches up to the rounding of the gradient average."""
    r0, r1 = part(ranks, "mlp_rank_data")
    ref = w.train(w.SCENARIOS["mlp_rank_data"], sharded=False, rank=-1)
    assert_same_roles(r0["roles"], r1["roles"], "rank 0 vs rank 1")
    assert_same(r0["state"], r1["state"], "rank 0 vs rank 1")
    assert_same_roles(r0["roles"], ref["roles"], "vs one process")
    for k in ref["state"]:
        torch.testing.assert_close(r0["state"][k], ref["state"][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(w.CHECKPOINTS))
def test_checkpoint_round_trip_resumes_exactly(ranks, name):
    """per_rank: each rank's state_dict() files; full_broadcast: get/set_optimizer_state_dict with a full state
    dict on rank 0 (DCP's state-initialising step must count as nothing); dcp_sharded: DCP shards;
    unsharded_into_sharded: an unsharded run's state dict loads into sharded parameters."""
    for res in part(ranks, f"ckpt_{name}"):
        assert res["loaded_steps"] == 7
        assert res["resumed"]["steps"] == res["reference"]["steps"] == 13
        assert_same_roles(res["resumed"]["roles"], res["reference"]["roles"], name)
        assert_same(res["resumed"]["state"], res["reference"]["state"], name)
        assert_same(res["resumed"]["own"], res["reference"]["own"], f"{name}: clones' own rows")


def test_accelerate_fsdp2_prepare_save_and_load(ranks):
    """Accelerate's FSDP2 prepare replaces the parameters after the optimizer was built; save_state / load_state
    (FULL_STATE_DICT) resume exactly."""
    for res in part(ranks, "accelerate"):
        assert res["reference"]["sharded"] and res["loaded_steps"] == 7
        assert_same_roles(res["resumed"]["roles"], res["reference"]["roles"], "accelerate")
        assert_same(res["resumed"]["state"], res["reference"]["state"], "accelerate")


@pytest.mark.parametrize("family", w.PROBED)
def test_blocks_of_a_sharded_model_are_checked_by_dataflow_as_on_one_process(ranks, family):
    """Decoder layers and root fully_shard-ed before the optimizer is built (FSDP2's own order): the probe gathers
    each checked block and finds what it finds on one process (DiffLlama's attention left alone, GPT-NeoX's
    interleaved qkv layout); construction leaves every parameter sharded and training goes on."""
    reference = w.probed(family, sharded=False)
    assert reference["coverage"]["by_structure"] == []
    for res in part(ranks, f"probe_{family}"):
        assert res["coverage"] == reference["coverage"] and res["layouts"] == reference["layouts"]
        assert res["resharded"] and torch.isfinite(torch.tensor(res["loss"]))


def test_what_fsdp2_cannot_do_is_refused(ranks):
    got, other = part(ranks, "refusals")
    assert got["leaf_first"].startswith("PlanError") and "itself wrapped by fully_shard" in got["leaf_first"]
    assert got["leaf_first"].count("'0'"), got["leaf_first"]  # names the layer
    assert got["leaf_after"].startswith("ConfigError") and "module '0' is itself wrapped" in got["leaf_after"]
    assert got["export_model"].startswith("ConfigError") and "get_model_state_dict" in got["export_model"]
    assert (
        got["experts_split"].startswith("PlanError")
        and "'model.layers.0.mlp.experts.gate_up_proj' of fused experts is sharded along dimension 1"
        in got["experts_split"]
    )
    assert other == got

"""What egg_optim adds to the traffic between ranks of an FSDP2 training step (issue 19, multi-GPU nodes), measured
on the CPU with 2 gloo processes: the small Llama and small Mixtral of ``bench_dispatch.py`` (hidden 256, 4
layers, GQA 8/2; Mixtral: 4 experts of half the MLP width, top 2), every decoder layer and the root
``fully_shard``-ed, AdamW, the same batch on both ranks.

Per case, for one training step (forward, backward, optimizer step; :class:`egg_optim.utils.DispatchCounter`):
the collectives and the bytes they move (the largest tensor of each: an all-gather's output, a broadcast's or
all-reduce's tensor, per rank), the part of them in the optimizer step (what egg_optim adds: the bare optimizer
step has none), its host reads (``_local_scalar_dense``: a device synchronisation on a GPU), and the median step
time over interleaved rounds (gloo on 2 CPU cores: indicative only, the counts are what a GPU node pays).

Cases: the bare model; weight mode mild (a clone event every step) with ``assign="first"`` and
``"round_robin"`` on packed roles (the sources' run broadcast by the ranks holding it; experts copied in place),
and on drawn roles, scattered as elections leave them (the distinct sources' rows broadcast; experts copied in
place); each beside the same with every tensor gathered whole, as every clone event did before
(``gathered``: the control; its finiteness check now stays on the device as the others' does, where before the
Llama's optimizer step made 60 host reads and the Mixtral's 56, drawn roles 56 and 48); output mode mild (no clone
events). Run::

    python benchmarks/bench_fsdp.py --out docs/results
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent
CASES = [  # name, clone mode, assign, gathered
    ("bare", None, None, False),
    ("weight/mild, assign first", "weight", "first", False),
    ("weight/mild, assign first, gathered (before)", "weight", "first", True),
    ("weight/mild, assign round_robin", "weight", "round_robin", False),
    ("weight/mild, assign round_robin, gathered (before)", "weight", "round_robin", True),
    ("weight/mild, drawn roles, assign round_robin", "weight", "round_robin", False),
    ("weight/mild, drawn roles, assign round_robin, gathered (before)", "weight", "round_robin", True),
    ("output/mild", "output", "first", False),
]
MB = 2**20


def _dispatch_bench():
    spec = importlib.util.spec_from_file_location("bench_dispatch", ROOT / "bench_dispatch.py")
    mod = sys.modules.setdefault("bench_dispatch", importlib.util.module_from_spec(spec))
    if not hasattr(mod, "SMALL_LLAMA"):
        spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _gathered(on: bool):
    """Clone events with every managed tensor gathered whole (the path before views of sharded tensors)."""
    from egg_optim.core import cloning

    saved = cloning._plan, cloning._fetched_sources, cloning._own_rows
    if on:
        cloning._plan = cloning._fetched_sources = cloning._own_rows = lambda *args: None
    try:
        yield
    finally:
        cloning._plan, cloning._fetched_sources, cloning._own_rows = saved


def _case(kind: str, mode: str | None, assign: str | None, drawn: bool):
    from torch.distributed.fsdp import fully_shard

    from egg_optim import LeaderCloneOptimizer, RolePlan

    bd = _dispatch_bench()
    torch.manual_seed(0)
    model = bd._bench_gpu().llama(bd.SMALL_LLAMA) if kind == "llama" else bd._small_mixtral()
    for m in list(model.modules()):
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(model)
    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt: Any = base
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = RolePlan.preset("mild", "uniform")
            first = "drawn" if drawn else "packed"
            opt = LeaderCloneOptimizer(model, base, plan, clone_mode=mode, assign=assign, seed=0, first_roles=first)
    c = bd.SMALL_LLAMA
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=torch.Generator().manual_seed(1))

    def fwd_bwd() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return model, opt, fwd_bwd


def _worker(rank: int, port: int, models: list[str], rounds: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))
    from egg_optim.utils.profiling import DispatchCounter

    rows = []
    for kind in models:
        built = {name: (_case(kind, mode, assign, "drawn" in name), gathered) for name, mode, assign, gathered in CASES}
        counts: dict[str, dict[str, Any]] = {}
        times: dict[str, list[float]] = {name: [] for name in built}
        for r in range(rounds + 2):  # 2 warm-up steps (roles settled), then the counted one, then timed rounds
            for name, ((_, opt, fwd_bwd), gathered) in built.items():
                with _gathered(gathered):
                    if r == 2:
                        with DispatchCounter() as whole:
                            fwd_bwd()
                            with DispatchCounter() as stepped:
                                opt.step()
                        counts[name] = dict(  # the outer counter sees the inner one's ops too
                            n=sum(whole.collectives.values()),
                            bytes=whole.collective_bytes,
                            opt_n=sum(stepped.collectives.values()),
                            opt_bytes=stepped.collective_bytes,
                            reads=stepped.ops["_local_scalar_dense"],
                            kinds=dict(stepped.collectives),
                        )
                    else:
                        dist.barrier()
                        t0 = time.perf_counter()
                        fwd_bwd()
                        opt.step()
                        if r > 2:
                            times[name].append(time.perf_counter() - t0)
                    opt.zero_grad(set_to_none=True)
        for name in built:
            rows.append((kind, name, counts[name], statistics.median(times[name]) if times[name] else float("nan")))
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _table(rows: list, rounds: int) -> str:
    bare = {kind: (c, t) for kind, name, c, t in rows if name == "bare"}
    lines = [
        "| model | case | collectives / step | MB / step per rank (vs bare) "
        "| of which the optimizer step: collectives, MB | host reads in the optimizer step (bare) "
        "| step time vs bare (gloo CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, name, c, t in rows:
        b, bt = bare[kind]
        kinds = ", ".join(f"{k.rstrip('_')} {v}" for k, v in sorted(c["kinds"].items())) or "none"
        lines.append(
            f"| {kind} | {name} | {c['n']} | {c['bytes'] / MB:.2f} ({100 * (c['bytes'] / b['bytes'] - 1):+.1f} %) "
            f"| {c['opt_n']} ({kinds}), {c['opt_bytes'] / MB:.3f} "
            f"| {c['reads']} ({b['reads']}) | {t / bt:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama", "mixtral"], choices=["llama", "mixtral"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the counted step")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--out", default=None, help="folder for bench_fsdp.md")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args.port, args.models, args.rounds, path), nprocs=2)
        rows = torch.load(path, weights_only=False)
    table = _table(rows, args.rounds)
    print(table)
    if args.out:
        import transformers

        cmd = "python benchmarks/bench_fsdp.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = (
            "# Traffic between ranks of an FSDP2 step: what egg_optim adds (CPU proxy, 2 gloo processes)\n\n"
            f"`{cmd.strip()}` (torch {torch.__version__}, transformers {transformers.__version__}, 2 processes on "
            f"a 2-core CPU, 1 thread each; {args.rounds} timed rounds, interleaved, medians).\n\n"
            + (__doc__ or "").split("Run::")[0].strip()
            + "\n\n"
            + table
            + "\n"
        )
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_fsdp.md").write_text(text)
    return table


if __name__ == "__main__":
    main()

"""Smoke tests of the step-time benchmarks: they run on tiny inputs and their counted quantities mean what the
results docs say (timings themselves are not asserted: the machine is noisy)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_benchmark


def test_bench_transformers_counts_fewer_flops_and_activations_in_output_mode(capsys):
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_transformers")
    argv = ["--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "16", "--no-profile", "--models", "llama"]
    result = bench.main([*argv, "--scenarios", "mild", "aggressive"])
    assert all(math.isfinite(v) and v > 0 for v in result.values()), result
    # weight mode computes every unit, less the clones' weight-gradient rows and columns (a third of each clone's
    # matmul work); output mode only the active neurons and heads (block units), the aggressive plan fewer than mild
    mild = result["llama_output_mild_flops_vs_baseline"]
    aggressive = result["llama_output_aggressive_flops_vs_baseline"]
    assert aggressive < mild < 0.6 < result["llama_weight_mild_flops_vs_baseline"] < 0.95
    # (weight mode saves the skipping layers' role indices too: a few hundred bytes, 3 % at these tiny sizes)
    assert result["llama_weight_mild_activations_vs_baseline"] == pytest.approx(1.0, rel=0.05)
    assert "| llama/output/aggressive |" in capsys.readouterr().out


def test_bench_transformers_counts_the_experts_grouped_matmuls_at_their_active_widths():
    """Mixtral's experts run ``torch._grouped_mm`` (counted by ``egg_optim.utils.flop_counter``); output mode runs
    them at each expert's active neurons, so the aggressive plan counts fewer FLOPs than the mild one."""
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_transformers")
    argv = ["--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "16", "--no-profile", "--models", "mixtral"]
    result = bench.main([*argv, "--scenarios", "mild", "aggressive"])
    assert 0.6 < result["mixtral_weight_mild_flops_vs_baseline"] <= 1.0
    assert result["mixtral_output_aggressive_flops_vs_baseline"] < result["mixtral_output_mild_flops_vs_baseline"]
    assert result["mixtral_output_mild_flops_vs_baseline"] < 0.6


def test_flop_counter_counts_grouped_matmuls_as_their_dense_equivalent():
    from egg_optim.utils import flop_counter

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm in this torch")
    x, w = torch.randn(12, 16, requires_grad=True), torch.randn(3, 16, 8, requires_grad=True)
    offs = torch.tensor([4, 8, 12], dtype=torch.int32)
    with flop_counter() as counter:
        torch._grouped_mm(x, w, offs=offs).backward(torch.randn(12, 8))
    dense = 2 * 12 * 16 * 8  # each of the 12 rows against one group's [16, 8]
    assert counter.get_total_flops() == 3 * dense  # forward, input gradient, weight gradient


def test_bench_compile_runs_without_graph_breaks():
    bench = load_benchmark("bench_compile")
    variants = ["output", "output-unfused", "weight"]
    argv = ["--steps", "1", "--warmup", "0", "--batch", "4", "--backend", "aot_eager", "--variants", *variants]
    result = bench.main(argv)
    assert all(result[f"{v.replace('-', '_')}_graph_breaks"] == 0 for v in variants), result
    assert all(math.isfinite(v) for v in result.values()), result
    # --kernel-profile: the most expensive entries of each compiled step, instead of timing
    profiled = bench.main([*argv[:8], "--kernel-profile", "3", "--variants", "output-unfused"])
    assert 0 < len(profiled) <= 6 and all(k.split(": ")[0] in ("baseline", "output-unfused") for k in profiled)
    assert all(math.isfinite(v) and v >= 0 for v in profiled.values())


def test_demotion_screen_costs_are_the_loss_change_of_the_demotion_and_its_derivative():
    """The exact cost is what the stable policy's swap really does to the eval loss; the first-order cost is the
    directional derivative of the loss along that change."""
    import torch
    import torch.nn.functional as F
    from egg_recipes.models import build_model

    from egg_optim import LeaderCloneOptimizer, RolePlan

    screen = load_benchmark("demotion_screen")
    torch.manual_seed(0)
    x, y, _, _ = screen.load("digits", 256, 64, 0)
    model = build_model("seed_mnist", in_channels=1, num_classes=10, image_size=x.shape[-2:])
    score = screen.DemotionCost()
    opt = LeaderCloneOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        RolePlan.preset("mild", table=screen.train_image.SEED_TABLES["seed_mnist"]),
        clone_mode="output",
        assign="round_robin",
        election=score,
        election_policy="stable",
        max_churn=1e-6,  # one swap per layer at most
    )
    for i in range(0, 256, 64):
        F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        opt.step()
        opt.zero_grad()
    name = "layer2.conv3"
    roles = opt.roles[name]
    group = torch.bincount(roles.source_map, minlength=roles.num_units)
    demoted = int(roles.leaders[group[roles.leaders].argmax()])  # a leader with clones: they move too
    promoted = int(roles.clones[roles.sources != demoted][0])
    exact = screen.exact_costs(model, opt, x, y)[name][demoted]

    # first order: the derivative of the loss along the merge, by central differences
    norm, target = screen._norm_of(model, name), screen.merge_targets(opt, name)[demoted]
    channels = torch.nonzero(roles.source_map == demoted).flatten()

    def loss_at(eps: float) -> float:
        handle = norm.register_forward_hook(lambda m, i, o: o + eps * (screen._merged(o, m, channels, target) - o))
        try:
            return screen._loss(model, x, y)
        finally:
            handle.remove()

    model.eval()
    # in float64 and with a step small enough to cross no ReLU kink: in float32 the difference quotient is
    # rounding noise of ~1 % (and which side of it a platform lands on varies); a step of 1e-4 crossed one on an
    # AVX-512 machine (the weights after training differ in the last bits), 1e-7 leaves float64 ample precision
    model.double()
    x = x.double()
    derivative = (loss_at(1e-7) - loss_at(-1e-7)) / 2e-7
    model.float()
    x = x.float()
    base = loss_at(0.0)
    first = screen.first_order_costs(model, opt, x, y)[name][demoted]
    assert first == pytest.approx(derivative, rel=1e-3, abs=1e-7)

    scores = {n: torch.ones(r.num_units) for n, r in opt.roles.items()}  # no swap elsewhere
    scores[name][roles.clones] = 0.0
    scores[name][promoted] = 0.5
    scores[name][demoted] = -1.0
    score.costs = scores
    opt.elect_now()
    after = opt.roles[name]
    assert demoted in after.clones.tolist() and promoted in after.leaders.tolist()
    model.eval()
    assert screen._loss(model, x, y) - base == pytest.approx(exact, rel=1e-3, abs=1e-5)
    assert abs(exact) > 1e-4  # the check above is not vacuous


def test_bench_gpu_smoke_runs_the_checks_and_every_case_kind(tmp_path):
    """The GPU benchmark's CPU smoke mode: the device checks pass, each group measures its cases against the bare
    step of the same group, and the report is written."""
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_gpu")
    # the fp32 CNN also matches its compiled group
    groups = ["tiny CNN b4 fp32", "tiny Llama bf16", "tiny MoE", "tiny GPT-2"]
    result = bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--groups", *groups])
    assert [c["check"] for c in result["checks"]] == list(bench.CHECKS)
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    rows = {(r["group"], r["case"]): r for r in result["rows"]}
    assert not result["skipped"], result["skipped"]
    cnn = "tiny CNN b4 fp32"
    assert {c for g, c in rows if g == cnn} == {
        *bench._CNN_SCENARIOS,
        bench._DRAWN,
        bench._NOSKIP,
        bench._SKIPALL,
        bench._UNFUSED,
        bench._FUSED,
        bench._INDEXADD,
    }
    # unfused norms: the same FLOPs as the fused ones (norms are not counted)
    assert rows[cnn, bench._UNFUSED]["flop_ratio"] == pytest.approx(rows[cnn, "output/mild"]["flop_ratio"])
    # weight mode skips the clones' weight-gradient rows; without skipping it computes what the bare step does
    noskip, skip = rows[cnn, bench._NOSKIP]["flop_ratio"], rows[cnn, "weight/mild"]["flop_ratio"]
    assert noskip == pytest.approx(1.0) and skip < noskip
    assert rows[cnn, bench._SKIPALL]["flop_ratio"] == pytest.approx(skip)  # no work floor on the CPU: the same split
    assert rows[cnn, bench._DRAWN]["param_index_ops"] > 0  # the gather path, against packed roles' none
    assert rows[cnn, "bare"]["vs_bare"] == 1.0 and rows[cnn, "bare"]["param_index_ops"] == 0
    for case in ("output/mild", "output/aggressive", "dense@mild", "dense@aggressive"):
        assert 0 < rows[cnn, case]["flop_ratio"] < 1, case
        assert math.isfinite(rows[cnn, case]["vs_bare"]) and rows[cnn, case]["step_ms"] > 0
    assert rows[cnn, "dense@aggressive"]["flop_ratio"] < rows[cnn, "output/aggressive"]["flop_ratio"]
    assert rows[cnn, "output/mild"]["param_index_ops"] == 0  # packed roles: views, no index traffic (issue 19)
    assert rows[cnn, "output/mild"]["state_mb"] < rows[cnn, "bare"]["state_mb"]
    assert ("tiny CNN b4 fp32 compiled", "output/mild/compiled") in rows
    llama = "tiny Llama bf16"
    assert {c for g, c in rows if g == llama} == {"bare", "output/aggressive", "output/aggressive-align1"}
    assert "mlp 62/176" in rows[llama, "output/aggressive"]["widths"]  # CPU: the seed's counts (align 1)
    moe = "tiny MoE fp32"  # experts at their active neurons: by views on packed roles, gathers on drawn ones
    assert {c for g, c in rows if g == moe} == set(bench._MOE_SCENARIOS)
    assert rows[moe, "output/mild"]["flop_ratio"] < 0.6 and rows[moe, "output/mild"]["param_index_ops"] == 0
    assert rows[moe, "weight/mild"]["param_index_ops"] == 0 < rows[moe, bench._DRAWN]["param_index_ops"]
    gpt2 = "tiny GPT-2 autocast"  # its attention at the active heads too (split_size set): no index op either
    assert {c for g, c in rows if g == gpt2} == set(bench._GPT2_SCENARIOS)
    assert rows[gpt2, "output/mild"]["flop_ratio"] < 0.6 and rows[gpt2, "output/mild"]["param_index_ops"] == 0
    text = (tmp_path / "bench_gpu.md").read_text()
    assert "| no-clone plan bit-exact to the bare optimizer | PASS |" in text and "## tiny Llama bf16" in text
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]


def test_bench_gpu_lists_where_the_device_time_goes():
    """The kernel table of a profiled step (device kernels by name, their summed device time, index calls) and
    its section in the report: what tells a launch-bound step (device busy a small part of the step) from a
    compute-bound one. Profiler events are stood in for: a CPU has no CUDA kernels to profile."""
    from types import SimpleNamespace

    import torch
    from torch.autograd.profiler_util import Interval

    bench = load_benchmark("bench_gpu")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=Interval(0, us))

    events = [ev("gemm", cuda, 300), ev("gemm", cuda, 200), ev("bn_fwd", cuda, 100), ev("copy", cuda, 50),
              ev("aten::index_select", cpu, 9), ev("aten::index_add_", cpu, 9), ev("aten::mm", cpu, 9),
              ev("tiny", cuda, 1)]  # fmt: skip
    table = bench.kernel_table(events, top=2)
    assert table["kernels"] == 5 and table["index_kernels"] == 2
    assert table["busy_ms"] == pytest.approx(0.651)
    assert table["top"] == [("gemm", pytest.approx(0.5), 2), ("bn_fwd", pytest.approx(0.1), 1)]
    meta = {k: "-" for k in ("device_name", "torch", "cuda", "transformers", "python", "mode")}
    meta.update(elapsed_s=1.0, tf32_matmul=False, tf32_cudnn=True)
    row = {"group": "g", "case": "output/mild", "step_ms": 2.0, "vs_bare": 1.0, "host_step_ms": 0.1, "widths": ""}
    text = bench.report(meta, [], [{**row, **table}], [])
    assert "## Where the device time goes" in text
    assert "| g | output/mild | 0.65 | 0.33 | `gemm` 0.50 (2); `bn_fwd` 0.10 (1) |" in text


def test_bench_gpu_seed_nets_are_the_kits():
    models = pytest.importorskip("egg_recipes.models")
    bench = load_benchmark("bench_gpu")
    import torch

    for mine, theirs in ((bench.seed_cifar(), models.SeedCIFARNet()), (bench.seed_mnist(), models.SeedMNISTNet())):
        a = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert a == b
    widths = {"layer1.conv1": 48, "layer3.conv3": 16}
    a = {k: tuple(v.shape) for k, v in bench.seed_cifar(widths).state_dict().items()}
    b = {k: tuple(v.shape) for k, v in models.SeedCIFARNet(widths=widths).state_dict().items()}
    assert a == b
    assert torch.is_tensor(bench.seed_cifar()(torch.zeros(2, 3, 32, 32)))


def test_bench_dispatch_counts_and_memory(capsys):
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_dispatch")
    result = bench.main(["--steps", "1", "--cnn-batch", "2", "--models", "cnn"])
    bare, none = result["cnn/bare"], result["cnn/output/no clones"]
    assert bare["param_index_ops"] == 0 and none["param_index_ops"] == 0
    assert none["launches"] <= bare["launches"] + 2
    mild = result["cnn/output/mild"]
    assert mild["param_index_ops"] == 0 and mild["state_mb"] < bare["state_mb"]
    # channels_last costs output mode no more than the default layout does: no layout conversions around the
    # expansions, no stand-in copies of the weights' active rows (their buffers were resident state)
    cl, cl_bare = result["cnn/output/mild, channels_last"], result["cnn/bare, channels_last"]
    assert cl["launches"] - cl_bare["launches"] <= mild["launches"] - bare["launches"]
    assert cl["state_mb"] == mild["state_mb"]
    assert "| cnn/output/aggressive |" in capsys.readouterr().out


def test_bench_host_times_phases_and_counts_python_calls(capsys):
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_host")
    result = bench.main(["--rounds", "2"])
    unfused = {f"llama/{c[0]}" for c in bench.CASES if "unfused" in c[0]}  # the Llama has no norm to fuse
    assert set(result) == {f"{k}/{c[0]}" for k in ("cnn", "llama") for c in bench.CASES} - unfused
    for name, row in result.items():
        assert all(math.isfinite(row[p]) and row[p] > 0 for p in (*bench.PHASES, "step")), name
        assert row["step"] >= max(row[p] for p in bench.PHASES)
    # Python calls are exact: a plan without clones adds a few hundred to the bare step, a plan with clones more
    for kind in ("cnn", "llama"):
        bare = result[f"{kind}/bare"]["python_calls"]
        assert bare < result[f"{kind}/output/no clones"]["python_calls"] < result[f"{kind}/output/mild"]["python_calls"]
    # unfused coupled norms (the CUDA default) spend less Python than the fused norm's autograd function
    assert result["cnn/output/mild, unfused norms"]["python_calls"] < result["cnn/output/mild"]["python_calls"]
    # the fold's autograd function costs Python calls that the gather's index_add (C++ autograd) does not: small
    # layers keep the index_add
    assert result[f"cnn/{bench.FOLDED}"]["python_calls"] > result["cnn/output/mild, unfused norms"]["python_calls"]
    assert "| llama/output/aggressive |" in capsys.readouterr().out


def test_bench_norms_runs_every_norm_path():
    bench = load_benchmark("bench_norms")
    result = bench.main(["--batch", "4", "--rounds", "1", "--warmup", "0", "--presets", "mild"])
    assert set(result) == {f"mild/{c}" for c in bench.CASES[1:]} | {"bare"}
    assert "mild/unfused, index_add" in result
    assert result["bare"] == 1.0 and all(math.isfinite(v) and v > 0 for v in result.values())


def test_bench_construct_times_the_probe_and_the_whole_construction(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_construct")
    monkeypatch.setattr(bench, "MODELS", {"tiny llama": bench._llama(32, 1, 48, 4, 2)})
    result = bench.main(["--rounds", "1", "--out", str(tmp_path)])
    row = result["tiny llama"]
    assert all(math.isfinite(v) and v > 0 for v in row.values()), row
    assert row["probe"] > row["structure"]  # the probe runs the model; the structure alone reads shapes
    assert "| tiny llama |" in (tmp_path / "bench_construct.md").read_text()


def test_bench_transformers_runs_vision_and_speech_models_at_their_active_widths():
    """ViT, ConvNeXt (its MLP blocks) and Whisper take images and spectrograms, no token ids: output mode computes
    far fewer FLOPs than the bare step, weight mode fewer (the clones' weight-gradient rows and columns skipped)."""
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_transformers")
    argv = ["--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "16", "--no-profile", "--scenarios", "mild"]
    result = bench.main([*argv, "--models", "vit", "convnext", "whisper"])
    for kind in ("vit", "convnext", "whisper"):
        weight = result[f"{kind}_weight_mild_flops_vs_baseline"]
        assert result[f"{kind}_output_mild_flops_vs_baseline"] < min(0.85, weight) and 0.6 < weight < 1.0, kind

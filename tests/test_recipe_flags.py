"""Flags a run would ignore are refused in one line, not run as if absent (issue 21, case 9), and the sweep
checks its output folder and every run's flags before the first run (case 11)."""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

from egg_recipes import sweep, train_image  # noqa: E402


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--clone-mode", "weight", "--eval-mode", "own_weights"],
         "--eval-mode own_weights: no effect with --clone-mode weight (it acts in output mode only)"),
        (["--clone-mode", "weight", "--fuse-norms", "off"],
         "--fuse-norms off: no effect with --clone-mode weight (it acts in output mode only)"),
        (["--clone-mode", "output", "--skip-clone-grads", "on"],
         "--skip-clone-grads on: no effect with --clone-mode output (it acts in weight mode only)"),
        (["--scenario", "baseline", "--elect-every", "epoch", "--election", "weight_norm"],
         "--elect-every epoch, --election weight_norm: no effect with --scenario baseline, which trains no clones"),
        (["--scenario", "baseline", "--clone-mode", "weight", "--eval-mode", "own_weights"],
         "--eval-mode own_weights: no effect with --scenario baseline"),
        (["--scenario", "baseline", "--leaders", "0.4"],
         "--leaders 0.4: replaces the plan of --scenario baseline, which would then train clones"),
        (["--scenario", "narrow-mild", "--clone-mode", "output", "--elect-every", "1"],
         "--elect-every 1: no effect with --scenario narrow-mild (a dense control), which trains no clones"),
        (["--scenario", "mild", "--width-match", "flops"],
         "--width-match flops: no effect with --scenario mild"),
    ],
)  # fmt: skip
def test_train_image_refuses_flags_it_would_ignore(argv, fragment, capsys):
    assert fragment in _refused(train_image.main, argv, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenario", "baseline"],
        ["--scenario", "baseline", "--seed", "3"],  # seeds the init and the data order: never a role flag
        ["--scenario", "narrow-mild", "--seed", "3"],
        ["--scenario", "baseline", "--clone-mode", "output", "--assign", "round_robin"],  # the defaults, spelled out
        ["--scenario", "baseline", "--clone-mode", "weight", "--skip-clone-grads", "off"],  # how it is computed
        ["--scenario", "narrow-mild", "--clone-mode", "weight"],
        ["--scenario", "narrow-mild", "--width-match", "flops", "--leaders", "0.3"],  # what sizes the control
        ["--scenario", "mild", "--clone-mode", "output", "--eval-mode", "own_weights"],
        ["--scenario", "mild", "--clone-mode", "weight", "--skip-clone-grads", "off", "--elect-every", "epoch"],
    ],
)
def test_flags_that_act_are_accepted(argv):
    train_image.parse_args(argv)


def test_trainer_recipe_refuses_the_same(capsys):
    pytest.importorskip("transformers")
    from egg_recipes import train_trainer

    err = _refused(train_trainer.main, ["--scenario", "baseline", "--elect-every", "epoch"], capsys)
    assert "--elect-every epoch: no effect with --scenario baseline" in err


def test_lm_recipe_refuses_role_flags_with_the_baseline(capsys):
    pytest.importorskip("transformers")
    from egg_recipes import train_lm

    assert train_lm.parse_args(["--scenario", "baseline", "--seed", "3"]).seed == 3  # a run flag, not a role flag

    err = _refused(train_lm.main, ["--scenario", "baseline", "--election", "weight_norm"], capsys)
    assert "--election weight_norm: no effect with --scenario baseline" in err
    err = _refused(train_lm.main, ["--scenario", "baseline", "--independents", "0.2"], capsys)
    assert "--independents 0.2: replaces the plan of --scenario baseline" in err


# ---------------------------------------------------------------------------------------------- sweep
def test_sweep_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out"
    assert sweep.main(["--output-dir", str(target), "--scenarios", "mild"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot create output folder {target}: {tmp_path / 'file'} is a file, not a folder\n"


def test_sweep_passes_role_flags_to_runs_with_clones_only(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(train_image, "train", lambda args: ran.append(args) or _fake_metrics())
    code = sweep.main(["--output-dir", str(tmp_path), "--scenarios", "baseline", "narrow-mild", "mild",
                       "--clone-modes", "weight", "--elect-every", "epoch", "--election", "weight_norm"])  # fmt: skip
    assert code == 0
    assert [(a.scenario, a.elect_every, a.election) for a in ran] == [
        ("baseline", "never", "random"), ("narrow-mild", "never", "random"), ("mild", "epoch", "weight_norm"),
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert "[sweep] baseline: trains no clones, so --elect-every epoch, --election weight_norm left out" in out


def test_sweep_checks_every_run_before_the_first(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(train_image, "train", lambda args: ran.append(args) or _fake_metrics())
    with pytest.raises(SystemExit) as info:
        sweep.main(["--output-dir", str(tmp_path), "--scenarios", "mild", "aggressive", "--clone-modes", "weight",
                    "--eval-mode", "own_weights"])  # fmt: skip
    assert info.value.code == 2 and ran == []
    assert "--eval-mode own_weights: no effect with --clone-mode weight" in capsys.readouterr().err


def _fake_metrics() -> dict:
    return {
        "test_accuracy": 0.5, "updates_per_epoch": 1.0, "updates_per_batch": 1.0, "flops_per_epoch": 1.0,
        "time_per_epoch": 1.0, "steps": 1, "history": [{"accuracy": 0.5, "train_time": 1.0}], "epochs": [],
    }  # fmt: skip

"""The package's import boundaries: the core never pulls in the training kit or a framework."""

import subprocess
import sys
from pathlib import Path

HEAVY = ("egg_recipes", "transformers", "accelerate", "datasets", "evaluate", "wandb", "safetensors")


def test_import_egg_optim_imports_no_training_kit_or_framework():
    code = (
        "import sys, egg_optim, egg_optim.callbacks, egg_optim.integrations\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _package_data(pyproject: Path) -> tuple[list[str], dict[str, list[str]]]:
    import tomllib

    cfg = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    return cfg["packages"]["find"]["include"], cfg.get("package-data", {})


def test_distributions_ship_what_exists_and_the_library_ships_no_kit():
    """The library's wheel holds only ``egg_optim`` (no training kit), the recipes' kit is its own distribution,
    and every package-data pattern of either matches a file (a dead entry hides a missing file)."""
    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    for folder in (root, root / "recipes"):
        include, data = _package_data(folder / "pyproject.toml")
        packages = find_packages(str(folder), include=include)
        assert packages, folder
        for pkg, patterns in data.items():
            base = folder.joinpath(*pkg.split("."))
            for pattern in patterns:
                assert list(base.glob(pattern)), f"{folder.name}/pyproject.toml: {pkg}: {pattern} matches nothing"
        if folder == root:
            assert all(p == "egg_optim" or p.startswith("egg_optim.") for p in packages), packages
            assert not any(p.split(".")[-1] in ("kit", "egg_recipes") for p in packages), packages
        else:
            assert packages[0] == "egg_recipes" and "egg_recipes.metrics" in packages, packages


def test_no_sys_path_edits_in_library_recipes_or_benchmarks():
    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(f.relative_to(root))
        for folder in ("egg_optim", "recipes", "benchmarks")
        for f in (root / folder).rglob("*.py")
        if "sys.path.insert" in f.read_text() or "sys.path.append" in f.read_text()
    ]
    assert offenders == []

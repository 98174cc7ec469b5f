"""The package's import boundaries: the core never pulls in the training kit or a framework."""

import subprocess
import sys

HEAVY = ("egg_optim.kit", "transformers", "accelerate", "datasets", "evaluate", "wandb", "safetensors")


def test_import_egg_optim_imports_no_training_kit_or_framework():
    code = (
        "import sys, egg_optim, egg_optim.callbacks, egg_optim.integrations\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out

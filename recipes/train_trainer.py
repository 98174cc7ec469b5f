#!/usr/bin/env python
"""Recipe launcher: ``python recipes/train_trainer.py --help``. The code is :mod:`egg_recipes.train_trainer`."""

import sys

from egg_recipes.train_trainer import main

if __name__ == "__main__":
    sys.exit(main())

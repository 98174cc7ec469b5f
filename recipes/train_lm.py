#!/usr/bin/env python
"""Recipe launcher: ``python recipes/train_lm.py --help``. The code is :mod:`egg_recipes.train_lm`."""

import sys

from egg_recipes.train_lm import main

if __name__ == "__main__":
    sys.exit(main())

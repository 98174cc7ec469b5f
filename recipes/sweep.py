#!/usr/bin/env python
"""Recipe launcher: ``python recipes/sweep.py --help``. The code is :mod:`egg_recipes.sweep`."""

import sys

from egg_recipes.sweep import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Recipe launcher: ``python recipes/train_blockwise.py --help``. The code is :mod:`egg_recipes.train_blockwise`."""

import sys

from egg_recipes.train_blockwise import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Recipe launcher: ``python recipes/train_image.py --help``. The code is :mod:`egg_recipes.train_image`."""

import sys

from egg_recipes.train_image import main

if __name__ == "__main__":
    sys.exit(main())

"""The training kit used by the recipes: datasets, the seed's models, checkpoints, tracking and metrics.

Needs the ``[recipes]`` extra. ``import egg_optim`` never imports this package.
"""

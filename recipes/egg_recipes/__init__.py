"""The recipes and their training kit: datasets, the seed's models, checkpoints, tracking and metrics.

A distribution of its own (``egg-optim-recipes``: ``pip install -e ./recipes``); ``import egg_optim`` never
imports this package.
"""

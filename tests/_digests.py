"""Digests of everything a refused call must leave as it was: parameters and buffers (the raw tensors, not the
state_dict view, which output mode fills), optimizer state and hyperparameters (parked slices included), roles,
counters, running scores, and the global RNG states. Compare ``state_digest(...)`` before and after."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def _update(h: Any, value: Any) -> None:
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(value.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _update(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _update(h, v)
    else:
        h.update(repr(value).encode())


def _hex(value: Any) -> str:
    h = hashlib.sha256()
    _update(h, value)
    return h.hexdigest()


def _lco(opt: Any) -> Any:
    from egg_optim import find_leader_clone_optimizer

    return find_leader_clone_optimizer(opt)


def state_digest(model: torch.nn.Module, opt: Any = None, scheduler: Any = None) -> dict[str, str]:
    """sha256 per part: ``params``, ``buffers``, ``optimizer``, ``roles``, ``book``, ``scheduler``, ``rng``."""
    out = {
        "params": _hex({n: p for n, p in model.named_parameters()}),
        # the model's own buffers (a rewrite's private index buffers, "_egg...", are not state)
        "buffers": _hex({n: b for n, b in model.named_buffers() if not n.split(".")[-1].startswith("_")}),
        "rng": _hex([torch.get_rng_state(), repr(random.getstate()), repr(np.random.get_state())]),
    }
    if opt is not None:
        lco = _lco(opt)
        base = lco.optimizer if lco is not None else opt
        params = [p for g in base.param_groups for p in g["params"]]
        out["optimizer"] = _hex(
            {
                "state": [dict(base.state.get(p, {})) for p in params],
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
                "parked": [dict(lco.masked.parked.get(p, {})) for p in params] if lco is not None else [],
            }
        )
        if lco is not None:
            book = lco.book
            out["roles"] = _hex({n: [r.codes, r.source_map] for n, r in lco.roles.items()})
            out["book"] = _hex(
                {
                    "counters": [book.steps, book.elections, book.clone_events, book.roles_since, book.epoch_begun,
                                 book.epoch_ended, book.last_election_step, book.last_clone_key, lco.seed],
                    "layers": {
                        n: [lb.cloned_units, lb.churn, lb.led_steps, lb.seated_at, lb.score_sum, lb.score_count]
                        for n, lb in book.layers.items()
                    },
                }
            )  # fmt: skip
    if scheduler is not None:
        out["scheduler"] = _hex(scheduler.state_dict())
    return out

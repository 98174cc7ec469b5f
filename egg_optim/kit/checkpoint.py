"""Atomic, verified checkpoints around ``accelerator.save_state`` / ``load_state``.

A checkpoint is a folder written by ``accelerator.save_state(..., safe_serialization=True)`` (model weights
as safetensors, optimizer / scheduler state, per-rank RNG states) plus a completion marker,
``egg_optim_checkpoint.json``, holding the step, the epoch, caller metadata and a manifest of every file
with its size and sha256.

Saving writes everything into ``<dir>.tmp-<random>`` next to the target, writes the marker last, then
renames the folder into place with ``os.replace``: a crash at any point leaves either the previous checkpoint
or a ``*.tmp-*`` folder without a marker, never a folder that looks complete. Loading checks the marker,
the manifest (sizes and hashes), the caller's expectations and the weight names before touching anything,
and rolls the models, optimizers, schedulers and RNG states back if Accelerate fails halfway; every refusal is
a :class:`CheckpointError`.

All ranks must call :func:`save_checkpoint` and :func:`load_checkpoint` (they synchronise); the folder must
be on a file system all ranks share.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import EggOptimError

MARKER_NAME = "egg_optim_checkpoint.json"
FORMAT_VERSION = 1
_TMP_RE = re.compile(r"\.(tmp|old)-[0-9a-f]+$")
_STEP_RE = re.compile(r"(\d+)$")

__all__ = [
    "MARKER_NAME",
    "CheckpointError",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_incomplete",
    "save_checkpoint",
    "verify_checkpoint",
]


class CheckpointError(EggOptimError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run; nothing was changed."""


# ---------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MARKER_NAME:
            continue
        out[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    part = path.with_name(path.name + ".part")
    with part.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _discard(folder: Path) -> None:
    """Best-effort removal of a temporary folder (a hard crash skips it; the folder then stays incomplete)."""
    shutil.rmtree(folder, ignore_errors=True)


def _shared_token(accelerator: Any) -> str:
    token = secrets.token_hex(4)
    if getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import broadcast_object_list

        box = [token]
        broadcast_object_list(box, from_process=0)
        token = box[0]
    return token


def _jsonable(obj: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} must be JSON-serialisable: {exc}") from exc


# ---------------------------------------------------------------------------- save
def save_checkpoint(
    accelerator: Any,
    directory: str | os.PathLike,
    *,
    step: int,
    epoch: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``accelerator``'s prepared objects into ``directory`` atomically; returns the final path.

    ``metadata`` (JSON-serialisable) is stored in the marker and returned by :func:`load_checkpoint`; use it
    for the data-loader position and anything a resume must check. An existing checkpoint at ``directory`` is
    replaced only once the new one is complete."""
    final = Path(directory)
    meta = _jsonable(dict(metadata or {}), "checkpoint metadata")
    token = _shared_token(accelerator)
    tmp = final.with_name(f"{final.name}.tmp-{token}")
    main = accelerator.is_main_process
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            marker = {
                "format": FORMAT_VERSION,
                "step": int(step),
                "epoch": int(epoch),
                "num_processes": int(getattr(accelerator, "num_processes", 1)),
                "saved_at": time.time(),
                "metadata": meta,
                "files": _manifest(tmp),
            }
            _write_json_atomic(tmp / MARKER_NAME, marker)
            _fsync_dir(tmp)
            old = None
            if final.exists():
                old = final.with_name(f"{final.name}.old-{token}")
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            if old is not None:
                _discard(old)
    except BaseException:
        if main:
            _discard(tmp)
        raise
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------- inspect
def verify_checkpoint(directory: str | os.PathLike, *, check_hashes: bool = True) -> dict[str, Any]:
    """Return the marker of a complete checkpoint; raise :class:`CheckpointError` if the folder is missing,
    has no (valid) marker, or a file in the manifest is missing or has another size or hash."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    marker_path = folder / MARKER_NAME
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: no {MARKER_NAME} (was the save interrupted?)")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: unreadable {MARKER_NAME} ({exc})") from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder}: marker format {marker.get('format') if isinstance(marker, dict) else marker!r}, "
            f"expected {FORMAT_VERSION}"
        )
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {folder}: marker has no file manifest")
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {rel} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: {rel} has {size} bytes, expected {entry.get('size')}"
            )
        if check_hashes and _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} does not match its sha256")
    return marker


def is_complete(directory: str | os.PathLike, *, check_hashes: bool = False) -> bool:
    """True when ``directory`` is a finished checkpoint (sizes checked; hashes too if asked)."""
    try:
        verify_checkpoint(directory, check_hashes=check_hashes)
    except CheckpointError:
        return False
    return True


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints directly below ``root``, oldest first (by the step in the marker)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and not _TMP_RE.search(path.name) and is_complete(path):
            step = json.loads((path / MARKER_NAME).read_text())["step"]
            found.append((int(step), path.name, path))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint below ``root`` with the highest step, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_incomplete(root: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted saves (``*.tmp-*`` / ``*.old-*`` folders) below ``root``; call it on
    the main process only, when no save is running. Returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and _TMP_RE.search(path.name):
                _discard(path)
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------- load
def _check_weight_names(accelerator: Any, folder: Path) -> None:
    from safetensors import safe_open

    for i, model in enumerate(getattr(accelerator, "_models", [])):
        name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name} (saved without safe_serialization?)")
        try:
            with safe_open(str(path), framework="pt") as f:
                saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {folder}: unreadable {name} ({exc})") from exc
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if saved != expected:
            missing = sorted(set(expected) - set(saved))[:5]
            unexpected = sorted(set(saved) - set(expected))[:5]
            shapes = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])[:5]
            raise CheckpointError(
                f"checkpoint {folder}: weights do not match model {i} (missing {missing}, unexpected "
                f"{unexpected}, other shape {shapes}); was it saved with another model or number of processes?"
            )


def _snapshot(accelerator: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "models": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in accelerator._models],
        "optimizers": [copy.deepcopy(o.state_dict()) for o in accelerator._optimizers],
        "schedulers": [copy.deepcopy(s.state_dict()) for s in accelerator._schedulers],
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "step": getattr(accelerator, "step", None),
    }
    try:
        import numpy as np

        snap["np_rng"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda_rng"] = torch.cuda.get_rng_state_all()
    return snap


def _restore(accelerator: Any, snap: dict[str, Any]) -> None:
    for m, sd in zip(accelerator._models, snap["models"]):
        m.load_state_dict(sd)
    for o, sd in zip(accelerator._optimizers, snap["optimizers"]):
        o.load_state_dict(sd)
    for s, sd in zip(accelerator._schedulers, snap["schedulers"]):
        s.load_state_dict(sd)
    torch.set_rng_state(snap["torch_rng"])
    random.setstate(snap["py_rng"])
    if "np_rng" in snap:
        import numpy as np

        np.random.set_state(snap["np_rng"])
    if "cuda_rng" in snap:
        torch.cuda.set_rng_state_all(snap["cuda_rng"])
    if snap["step"] is not None:
        accelerator.step = snap["step"]


def load_checkpoint(
    accelerator: Any,
    directory: str | os.PathLike,
    *,
    expect: Mapping[str, Any] | None = None,
    check_hashes: bool = True,
) -> dict[str, Any]:
    """Verify and load a checkpoint made by :func:`save_checkpoint` into the prepared objects; returns the
    marker (``step``, ``epoch``, ``metadata``...).

    ``expect`` maps metadata keys to required values (a plan signature, a model name...). Any refusal or
    failure raises :class:`CheckpointError` with the models, optimizers, schedulers and RNG states unchanged."""
    folder = Path(directory)
    marker = verify_checkpoint(folder, check_hashes=check_hashes)
    meta = marker.get("metadata", {})
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have != _jsonable(want, f"expected {key!r}"):
            raise CheckpointError(f"checkpoint {folder} was saved with {key}={have!r}, this run has {want!r}")
    _check_weight_names(accelerator, folder)
    snap = _snapshot(accelerator)
    try:
        accelerator.load_state(str(folder))
    except Exception as exc:
        _restore(accelerator, snap)
        raise CheckpointError(f"checkpoint {folder} could not be loaded, nothing was changed: {exc}") from exc
    return marker


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The trailing number of a checkpoint folder name (``checkpoint-120`` -> 120), or ``None``."""
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None

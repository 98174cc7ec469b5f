"""Atomic, verified checkpoints around ``accelerator.save_state`` / ``load_state``.

A checkpoint is a folder written by ``accelerator.save_state(..., safe_serialization=True)`` (model weights
as safetensors, optimizer / scheduler state, per-rank RNG states) plus a completion marker,
``egg_optim_checkpoint.json``, holding the step, the epoch, caller metadata, a manifest of every other file in
the folder with its size and sha256, and the sha256 of the marker itself (over its canonical JSON form), so a
damaged marker is refused rather than trusted.

Saving writes everything into ``<dir>.tmp-<random>`` next to the target, writes the marker last, then
renames the folder into place with ``os.replace``: a crash at any point leaves either the previous checkpoint
or a ``*.tmp-*`` folder without a marker, never a folder that looks complete. Removing a checkpoint (pruning)
first renames it to ``<dir>.trash-<random>``, so a kill mid-delete cannot leave a half-deleted folder under a
checkpoint's name. Those leftovers (and half-deleted folders of older versions) are removed by
:func:`remove_incomplete`, which :func:`save_checkpoint` and :func:`resume_path` run on the main process.

Loading checks the marker, the manifest (exactly the files present, sizes and hashes), the caller's
expectations and the weight names before touching anything, and rolls the models, optimizers, schedulers and
RNG states back if Accelerate fails halfway; every refusal is a :class:`CheckpointError`. A full disk or a
folder that cannot be written while saving is a :class:`~egg_recipes.storage.StorageError` (the previous
checkpoint is kept).

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

from egg_optim.errors import EggOptimError

from . import storage

MARKER_NAME = "egg_optim_checkpoint.json"
RUN_SETTINGS_NAME = "egg_optim_run.json"  # the run's settings inside a checkpoint written by someone else
FORMAT_VERSION = 2  # 2: the manifest lists every file and the marker carries its own sha256
DIGEST_KEY = "marker_sha256"
DEFAULT_PREFIX = "checkpoint-"
_TMP_RE = re.compile(r"\.(tmp|old|trash)-[0-9a-f]+$")
_STEP_RE = re.compile(r"(\d+)$")

__all__ = [
    "DEFAULT_PREFIX",
    "MARKER_NAME",
    "RUN_SETTINGS_NAME",
    "CheckpointError",
    "IncompleteCheckpointError",
    "check_run_settings",
    "checkpoint_step",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "remove_checkpoint",
    "remove_incomplete",
    "resume_path",
    "save_checkpoint",
    "run_settings_callback",
    "verify_checkpoint",
    "write_run_settings",
]


class CheckpointError(EggOptimError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run; nothing was changed."""


class IncompleteCheckpointError(CheckpointError):
    """The folder has no marker, or files its marker lists are gone: a save or a removal that did not finish.

    Unlike a corrupt checkpoint (other bytes, extra files, a damaged marker), such a folder holds nothing worth
    keeping, and :func:`remove_incomplete` deletes it."""


# ---------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative, POSIX), the marker excluded."""
    rels = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(r for r in rels if r != MARKER_NAME)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)} for rel in _files(folder)}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _marker_digest(marker: Mapping[str, Any]) -> str:
    """sha256 of the marker without its digest, in a canonical serialisation (indentation-independent)."""
    return hashlib.sha256(_canonical({k: v for k, v in marker.items() if k != DIGEST_KEY})).hexdigest()


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


def _family(name: str) -> str | None:
    """``checkpoint-12`` -> ``checkpoint-``: the prefix of a numbered checkpoint name (None if not numbered)."""
    m = re.fullmatch(r"(.*\D)\d+", name)
    return m.group(1) if m else None


def _numbered(path: Path, prefix: str) -> bool:
    return path.name.startswith(prefix) and path.name[len(prefix) :].isdigit()


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
    keep: int | None = None,
) -> Path:
    """Save ``accelerator``'s prepared objects into ``directory`` atomically; returns the final path.

    ``metadata`` (JSON-serialisable) is stored in the marker and returned by :func:`load_checkpoint`; use it
    for the data-loader position and anything a resume must check. An existing checkpoint at ``directory`` is
    replaced only once the new one is complete. Before writing, the main process removes leftovers of
    interrupted saves and removals next to ``directory`` (:func:`remove_incomplete`); after a successful save
    with ``keep`` > 0 it keeps the newest ``keep`` numbered checkpoints of the same name family, this one
    included (:func:`prune_checkpoints`). A full disk or an unwritable folder raises
    :class:`~egg_recipes.storage.StorageError` after removing the partial folder."""
    final = Path(directory)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise CheckpointError(f"keep must be an integer >= 0, got {keep!r}")
    meta = _jsonable(dict(metadata or {}), "checkpoint metadata")
    token = _shared_token(accelerator)
    tmp = final.with_name(f"{final.name}.tmp-{token}")
    family = _family(final.name)
    main = accelerator.is_main_process
    try:
        if main:
            with storage.writing(final.parent):
                final.parent.mkdir(parents=True, exist_ok=True)
            remove_incomplete(final.parent, prefix=family, protect=(final,))
        accelerator.wait_for_everyone()
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
            marker[DIGEST_KEY] = _marker_digest(marker)
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
    except BaseException as exc:
        if main:
            _discard(tmp)
        error = storage.write_error(exc, final)
        if error is not None:
            raise error from exc
        raise
    if main and keep and family is not None:
        prune_checkpoints(final.parent, keep, prefix=family, protect=(final,))
    accelerator.wait_for_everyone()
    return final


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Delete a checkpoint folder so that no kill can leave it half deleted under its name: it is renamed to
    ``<name>.trash-<random>`` first (atomic), then deleted; a leftover ``.trash-`` folder is removed by
    :func:`remove_incomplete`. Main process only."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    trash = folder.with_name(f"{folder.name}.trash-{secrets.token_hex(4)}")
    with storage.writing(folder.parent):
        os.replace(folder, trash)
    _fsync_dir(folder.parent)
    _discard(trash)


def prune_checkpoints(
    root: str | os.PathLike,
    keep: int,
    *,
    prefix: str = DEFAULT_PREFIX,
    protect: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Remove the oldest complete ``<prefix><N>`` checkpoints below ``root`` (by the step in their marker) so
    that ``keep`` remain; folders in ``protect`` (e.g. the one just saved) always stay. ``keep=0`` keeps all.
    Main process only; returns what was removed."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise CheckpointError(f"keep must be an integer >= 0, got {keep!r}")
    if keep == 0:
        return []
    found = [p for p in list_checkpoints(root) if _numbered(p, prefix)]
    kept = {Path(p).resolve() for p in protect}
    candidates = [p for p in found if p.resolve() not in kept]
    excess = max(len(found) - keep, 0)
    removed = candidates[:excess]
    for path in removed:
        remove_checkpoint(path)
    return removed


# ---------------------------------------------------------------------------- inspect
def verify_checkpoint(directory: str | os.PathLike, *, check_hashes: bool = True) -> dict[str, Any]:
    """Return the marker of a complete checkpoint.

    Raises :class:`IncompleteCheckpointError` if the marker is missing or a file it lists is gone, and
    :class:`CheckpointError` if the folder is missing, the marker is unreadable or fails its own sha256, the
    folder holds a file the marker does not list, or a listed file has another size (or hash, when
    ``check_hashes``)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    marker_path = folder / MARKER_NAME
    if not marker_path.is_file():
        raise IncompleteCheckpointError(
            f"checkpoint {folder} is incomplete: no {MARKER_NAME} (was the save interrupted?)"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: unreadable {marker_path} ({_first_line(exc)})") from exc
    if not isinstance(marker, dict) or not isinstance(marker.get(DIGEST_KEY), str):
        version = marker.get("format") if isinstance(marker, dict) else None
        old = version not in (None, FORMAT_VERSION)
        hint = f" (marker format {version}, made by an older egg_optim)" if old else ""
        raise CheckpointError(f"checkpoint {folder}: {marker_path} has no {DIGEST_KEY}{hint}, refusing to trust it")
    if marker[DIGEST_KEY] != _marker_digest(marker):
        raise CheckpointError(f"checkpoint {folder} is corrupt: {marker_path} does not match its {DIGEST_KEY}")
    if marker.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder}: marker format {marker.get('format')!r}, expected {FORMAT_VERSION}")
    files = marker.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(e, dict) for e in files.values()):
        raise CheckpointError(f"checkpoint {folder}: marker has no valid file manifest")
    present = set(_files(folder))
    missing = sorted(set(files) - present)
    if missing:
        raise IncompleteCheckpointError(
            f"checkpoint {folder} is incomplete: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            f"missing ({len(missing)} of {len(files)} files)"
        )
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} "
            f"not in its manifest"
        )
    for rel, entry in files.items():
        path = folder / rel
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: {rel} has {size} bytes, expected {entry.get('size')}"
            )
        if check_hashes and _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} does not match its sha256")
    return marker


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


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
        if not path.is_dir() or _TMP_RE.search(path.name):
            continue
        try:
            step = verify_checkpoint(path, check_hashes=False)["step"]
        except CheckpointError:
            continue
        found.append((int(step), path.name, path))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint below ``root`` with the highest step, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_incomplete(
    root: str | os.PathLike,
    *,
    prefix: str | None = DEFAULT_PREFIX,
    protect: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Delete what interrupted saves and removals left directly below ``root``: ``*.tmp-*`` / ``*.old-*`` /
    ``*.trash-*`` folders, and ``<prefix><N>`` folders that are incomplete (no marker, or listed files gone:
    a half-deleted checkpoint). Complete checkpoints, corrupt ones (kept for inspection; loading them is
    refused), other names and the folders in ``protect`` are left alone. Call it on the main process only,
    when no save into ``root`` is running. Returns what was removed."""
    root = Path(root)
    kept = {Path(p).resolve() for p in protect}
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.is_symlink() or path.resolve() in kept:
            continue
        if not _TMP_RE.search(path.name):
            if prefix is None or not _numbered(path, prefix):
                continue
            try:
                verify_checkpoint(path, check_hashes=False)
                continue
            except IncompleteCheckpointError:
                pass
            except CheckpointError:
                continue
        _discard(path)
        removed.append(path)
    return removed


def resume_path(
    accelerator: Any, resume_from: str | os.PathLike, root: str | os.PathLike, *, prefix: str = DEFAULT_PREFIX
) -> Path:
    """The checkpoint to resume from: ``"latest"`` is the newest complete one below ``root``, anything else a
    folder path. First the main process clears leftovers of interrupted saves below ``root`` (all processes
    wait for it), the requested folder excepted so that loading it reports what is wrong with it. With
    ``"latest"``, newer ``<prefix><N>`` folders that fail verification are named in a warning rather than
    skipped silently. Raises :class:`CheckpointError` when ``"latest"`` finds nothing."""
    root = Path(root)
    target = None if str(resume_from) == "latest" else Path(resume_from)
    if accelerator.is_main_process:
        remove_incomplete(root, prefix=prefix, protect=() if target is None else (target,))
    accelerator.wait_for_everyone()
    if target is not None:
        return target
    found = latest_checkpoint(root)
    newest = -1 if found is None else int(verify_checkpoint(found, check_hashes=False)["step"])
    candidates = root.iterdir() if root.is_dir() else ()
    damaged = sorted(
        (p for p in candidates if _numbered(p, prefix) and int(p.name[len(prefix) :]) > newest and p != found),
        key=lambda p: int(p.name[len(prefix) :]),
    )
    damaged = [p.name for p in damaged if not is_complete(p)]
    if damaged and accelerator.is_main_process:  # 'latest' must not fall back to an older one without a word
        print(f"warning: skipping damaged checkpoint(s) {', '.join(damaged)} in {root} (loading them is refused)")
    if found is None:
        raise CheckpointError(f"resume from 'latest': no complete checkpoint in {root}")
    return found


# ---------------------------------------------------------------------------- load
def _fsdp_weight_shapes(folder: Path, i: int) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes in an FSDP model file of Accelerate (``pytorch_model_fsdp[_i].bin``, a full state dict);
    ``None`` for a sharded (DCP) folder, which DCP checks itself when loading."""
    name = "pytorch_model_fsdp.bin" if i == 0 else f"pytorch_model_fsdp_{i}.bin"
    if (folder / f"pytorch_model_fsdp_{i}").is_dir():
        return None
    if not (folder / name).is_file():
        raise CheckpointError(f"checkpoint {folder} has no {name} (not saved by an FSDP run?)")
    try:
        saved = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure is an unreadable file
        raise CheckpointError(f"checkpoint {folder}: unreadable {name} ({exc})") from exc
    return {k: tuple(v.shape) for k, v in saved.items()}


def _check_weight_names(accelerator: Any, folder: Path) -> None:
    from safetensors import safe_open

    fsdp = getattr(accelerator, "distributed_type", None) == "FSDP"  # a str enum
    for i, model in enumerate(getattr(accelerator, "_models", [])):
        name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
        path = folder / name
        if fsdp:  # FSDP models are saved by Accelerate's FSDP code, as a full state dict or DCP shards
            saved = _fsdp_weight_shapes(folder, i)
            if saved is None:
                continue
        elif not path.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name} (saved without safe_serialization?)")
        else:
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

    ``expect`` maps metadata keys to required values (a plan signature, a model name...); every mismatch is
    named in one refusal. Any refusal or failure raises :class:`CheckpointError` with the models, optimizers,
    schedulers and RNG states unchanged."""
    folder = Path(directory)
    marker = verify_checkpoint(folder, check_hashes=check_hashes)
    _refuse_mismatches(folder, marker.get("metadata", {}), expect or {})
    _check_weight_names(accelerator, folder)
    snap = _snapshot(accelerator)
    try:
        accelerator.load_state(str(folder))
    except Exception as exc:
        _restore(accelerator, snap)
        raise CheckpointError(f"checkpoint {folder} could not be loaded, nothing was changed: {exc}") from exc
    return marker


def _refuse_mismatches(folder: Path, saved: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    mismatches = [
        f"{key}={saved.get(key)!r} (this run: {want!r})"
        for key, want in expect.items()
        if saved.get(key) != _jsonable(want, f"expected {key!r}")
    ]
    if mismatches:
        raise CheckpointError(
            f"checkpoint {folder} was saved with other settings: {', '.join(mismatches)}; resume with the "
            f"checkpoint's settings, or start a new run elsewhere"
        )


# ---------------------------------------------------------------------------- checkpoints of other tools
def write_run_settings(directory: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Store ``settings`` (JSON) as ``RUN_SETTINGS_NAME`` in a checkpoint folder written by another tool (the
    transformers Trainer), so that :func:`check_run_settings` can refuse a resume with other settings."""
    path = Path(directory) / RUN_SETTINGS_NAME
    storage.write_text_atomic(path, json.dumps(_jsonable(dict(settings), "run settings"), indent=1, sort_keys=True))
    return path


def check_run_settings(directory: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Refuse (:class:`CheckpointError`, every difference named) to resume from ``directory`` unless its
    stored settings (:func:`write_run_settings`) equal ``settings``."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    path = folder / RUN_SETTINGS_NAME
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {folder} has no {RUN_SETTINGS_NAME}, so its settings cannot be checked (was it saved by "
            f"another program, or interrupted?)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: unreadable {path} ({_first_line(exc)})") from exc
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {folder}: {path} does not hold a JSON object")
    _refuse_mismatches(folder, saved, settings)


def run_settings_callback(settings: Mapping[str, Any]):
    """A ``transformers.TrainerCallback`` writing ``settings`` into every checkpoint the Trainer saves (world
    process zero only), for :func:`check_run_settings` on resume."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    frozen = _jsonable(dict(settings), "run settings")

    class _RunSettings(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                if folder.is_dir():
                    write_run_settings(folder, frozen)
            return control

    return _RunSettings()


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The trailing number of a checkpoint folder name (``checkpoint-120`` -> 120), or ``None``."""
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None

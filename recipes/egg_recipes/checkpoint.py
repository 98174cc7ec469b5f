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
checkpoint's name.

Nothing that might be the only copy of a state is deleted. :func:`recover_leftovers` (which
:func:`save_checkpoint` and :func:`resume_path` run on the main process) finishes what a kill interrupted: it
deletes ``*.trash-*`` folders (removals that were asked for), installs a complete ``*.tmp-*`` folder whose
target name is free (a save killed between its two renames) and puts a ``*.old-*`` folder back under its name
when nothing replaced it; everything else that might hold a state (a ``*.tmp-*`` folder without a marker, a
``*.old-*`` folder beside its replacement, a ``<prefix><N>`` folder that lost its marker or some files) is moved
aside to ``<name>.quarantine-<n>`` and named in one warning line. Quarantined folders are never read, listed,
pruned or deleted by this module: inspect them, then delete them or rename them back. The only checkpoints
deleted are those a caller replaces or prunes: the previous checkpoint of a same-name save (once the new one is
in place, and only when it was complete) and the oldest ones beyond ``keep``.

Loading checks the marker, the manifest (exactly the files present, sizes and hashes), the caller's
expectations and the weight names before touching anything, and rolls the models, optimizers, schedulers and
RNG states back if Accelerate fails halfway; every refusal is a :class:`CheckpointError`. A full disk or a
folder that cannot be written while saving is a :class:`~egg_recipes.storage.StorageError` (the previous
checkpoint is kept).

All ranks must call :func:`save_checkpoint` and :func:`load_checkpoint` (they synchronise); the folder must
be on a file system all ranks share.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import numbers
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

from egg_optim.errors import CheckpointError

from . import storage

logger = logging.getLogger(__name__)

MARKER_NAME = "egg_optim_checkpoint.json"
RUN_SETTINGS_NAME = "egg_optim_run.json"  # the run's settings inside a checkpoint written by someone else
FORMAT_VERSION = 2  # 2: the manifest lists every file and the marker carries its own sha256
DIGEST_KEY = "marker_sha256"
DEFAULT_PREFIX = "checkpoint-"
QUARANTINE = "quarantine"  # <name>.quarantine-<n>: moved aside, never read or deleted here
_LEFTOVER_RE = re.compile(r"\.(tmp|old|trash)-[0-9a-f]+$")
_NOT_A_CHECKPOINT_RE = re.compile(r"\.(?:(?:tmp|old|trash)-[0-9a-f]+|" + QUARANTINE + r"-\d+)$")
_STEP_RE = re.compile(r"(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"  # what a transformers Trainer checkpoint holds

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
    "recover_leftovers",
    "remove_checkpoint",
    "remove_incomplete",
    "resume_path",
    "save_checkpoint",
    "run_settings_callback",
    "verify_checkpoint",
    "write_run_settings",
]


class IncompleteCheckpointError(CheckpointError):
    """The folder has no marker, or files its marker lists are gone: a save or a removal that did not finish,
    or a marker (or file) lost since. It may still hold a usable state, so :func:`recover_leftovers` moves such
    a ``<prefix><N>`` folder aside (quarantine) rather than deleting it. (A corrupt checkpoint, with other bytes,
    extra files or a damaged marker, stays where it is; loading it is refused.)"""


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
def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CheckpointError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


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

    ``step`` and ``epoch`` are integers >= 0. ``metadata`` (JSON-serialisable) is stored in the marker and
    returned by :func:`load_checkpoint`; use it for the data-loader position and anything a resume must check. An
    existing checkpoint at ``directory`` is replaced only once the new one is complete (a folder there that is not
    a complete checkpoint is moved aside, not deleted). Before writing, the main process recovers leftovers of
    interrupted saves and removals next to ``directory`` (:func:`recover_leftovers`); after a successful save
    with ``keep`` > 0 it keeps the newest ``keep`` numbered checkpoints of the same name family, this one
    included (:func:`prune_checkpoints`). A full disk or an unwritable folder raises
    :class:`~egg_recipes.storage.StorageError` after removing this save's own unfinished folder; the previous
    checkpoint is kept."""
    final = Path(directory)
    step, epoch = _count("step", step), _count("epoch", epoch)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise CheckpointError(f"keep must be an integer >= 0, got {keep!r}")
    meta = _jsonable(dict(metadata or {}), "checkpoint metadata")
    token = _shared_token(accelerator)
    tmp = final.with_name(f"{final.name}.tmp-{token}")
    family = _family(final.name)
    main = accelerator.is_main_process
    marked = False  # tmp holds a complete checkpoint from here on
    old = None
    try:
        if main:
            with storage.writing(final.parent):
                final.parent.mkdir(parents=True, exist_ok=True)
            recover_leftovers(final.parent, prefix=family, protect=(final,))
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            marker = {
                "format": FORMAT_VERSION,
                "step": step,
                "epoch": epoch,
                "num_processes": int(getattr(accelerator, "num_processes", 1)),
                "saved_at": time.time(),
                "metadata": meta,
                "files": _manifest(tmp),
            }
            marker[DIGEST_KEY] = _marker_digest(marker)
            _write_json_atomic(tmp / MARKER_NAME, marker)
            _fsync_dir(tmp)
            marked = True
            if final.exists():
                old = final.with_name(f"{final.name}.old-{token}")
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            if old is not None:
                if is_complete(old):  # the checkpoint this save replaces, as asked
                    _discard(old)
                else:  # not a checkpoint of ours that was complete: keep it
                    _report([_quarantine(old, final.name, f"was at {final.name}, which this save replaced")])
    except BaseException as exc:
        if main:
            _abandon(tmp, final, old, marked)
        error = storage.write_error(exc, final)
        if error is not None:
            raise error from exc
        raise
    if main and keep and family is not None:
        prune_checkpoints(final.parent, keep, prefix=family, protect=(final,))
    accelerator.wait_for_everyone()
    return final


def _abandon(tmp: Path, final: Path, old: Path | None, marked: bool) -> None:
    """After a failed save: put the previous checkpoint back under its name if it was moved, and remove this
    save's own folder unless it is complete (then :func:`recover_leftovers` deals with it later)."""
    if old is not None and old.exists() and not final.exists():
        with contextlib.suppress(OSError):  # else left as *.old-*: recover_leftovers puts it back
            os.replace(old, final)
    if not marked and tmp.exists():
        _discard(tmp)  # this save's unfinished files (no marker, the save raised); the live state is in memory


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
        raise _no_marker_error(folder)
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


def _no_marker_error(folder: Path) -> CheckpointError:
    """What a folder without a marker is: a Trainer checkpoint, a folder of checkpoints, or an incomplete one."""
    if (folder / TRAINER_STATE_NAME).is_file():
        return CheckpointError(
            f"{folder} is a transformers Trainer checkpoint ({TRAINER_STATE_NAME}), not one written by "
            "save_checkpoint: resume it through the Trainer (train_lm.py --trainer hf, train_trainer.py, "
            "Trainer.train(resume_from_checkpoint=...))"
        )
    inside = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and ((p / MARKER_NAME).is_file() or _numbered(p, DEFAULT_PREFIX))
    )
    if inside:
        shown = ", ".join(inside[:3]) + (" ..." if len(inside) > 3 else "")
        return CheckpointError(
            f"{folder} is a folder of checkpoints ({shown}), not a checkpoint: pass one of them, or 'latest' "
            "with this folder as the root"
        )
    if not any(folder.iterdir()):
        return IncompleteCheckpointError(f"checkpoint {folder} is incomplete: the folder is empty")
    return IncompleteCheckpointError(
        f"checkpoint {folder} is incomplete: no {MARKER_NAME} (an interrupted save, or the marker was lost)"
    )


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
        if not path.is_dir() or _NOT_A_CHECKPOINT_RE.search(path.name):
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


def _quarantine(path: Path, base: str, why: str) -> tuple[Path, Path | None, str]:
    """Move ``path`` aside to ``<base>.quarantine-<n>`` (the first free ``n``); returns the action."""
    for n in itertools.count(1):
        dest = path.with_name(f"{base}.{QUARANTINE}-{n}")
        if not dest.exists():
            break
    with storage.writing(path.parent):
        os.replace(path, dest)
    return path, dest, why


def _describe(actions: list[tuple[Path, Path | None, str]]) -> str:
    return "; ".join(f"{src.name} -> {dst.name if dst else 'deleted'} ({why})" for src, dst, why in actions)


def _report(actions: list[tuple[Path, Path | None, str]], suffix: str = "") -> None:
    """One warning line for what was moved aside or put back (finished removals are not news), and ``suffix``."""
    shown = [a for a in actions if a[1] is not None]
    parts = []
    if shown:
        parts.append(f"recovered leftovers of interrupted saves in {shown[0][0].parent}, deleting nothing: "
                     f"{_describe(shown)}")  # fmt: skip
        if any(QUARANTINE in dst.name for _, dst, _ in shown if dst is not None):
            parts.append("quarantined folders may hold a complete state: inspect them, then delete or rename back")
    if suffix:
        parts.append(suffix)
    if parts:
        logger.warning("egg_optim: %s", "; ".join(parts))


def recover_leftovers(
    root: str | os.PathLike,
    *,
    prefix: str | None = DEFAULT_PREFIX,
    protect: tuple[str | os.PathLike, ...] = (),
    report: bool = True,
) -> list[tuple[Path, Path | None, str]]:
    """Finish what interrupted saves and removals left directly below ``root``, deleting nothing that might be
    the only copy of a state:

    - ``*.trash-*`` folders (a removal that was asked for, killed midway) are deleted;
    - a ``*.tmp-*`` folder (a killed save) that is a complete checkpoint (hashes checked) is renamed to its target
      name when that name is free (the save was killed between its two renames); otherwise it is moved aside;
    - a ``*.old-*`` folder (the checkpoint a same-name save was replacing) is renamed back to its name when nothing
      took it, else moved aside;
    - ``<prefix><N>`` folders that are incomplete (no marker, or listed files gone: may still hold a usable
      model and optimizer) are moved aside; empty ones are removed.

    Moving aside is renaming to ``<name>.quarantine-<n>``; with ``report`` one warning line names every folder
    moved or put back. Complete checkpoints, corrupt ones (kept for inspection; loading them is refused), Trainer
    checkpoints, other names and the folders in ``protect`` are left alone. Call it on the main process only, when
    no save into ``root`` is running. Returns ``(folder, where it went or None if deleted, why)`` per folder."""
    root = Path(root)
    if not root.is_dir():
        return []
    kept = {Path(p).resolve() for p in protect}

    def entries(kind: str | None) -> list[Path]:
        out = []
        for path in sorted(root.iterdir()):
            if not path.is_dir() or path.is_symlink() or path.resolve() in kept:
                continue
            m = _LEFTOVER_RE.search(path.name)
            if (m.group(1) if m else None) == kind:
                out.append(path)
        return out

    actions: list[tuple[Path, Path | None, str]] = []
    for path in entries("trash"):
        _discard(path)
        actions.append((path, None, "a removal that was asked for"))
    for path in entries("tmp"):
        base = _LEFTOVER_RE.sub("", path.name)
        target = root / base
        complete = is_complete(path, check_hashes=True)
        if complete and not target.exists():
            with storage.writing(root):
                os.replace(path, target)
            actions.append((path, target, "a complete save killed before its final rename, installed"))
        else:
            why = "a save that was killed before it finished" if not complete else f"a complete save beside {base}"
            actions.append(_quarantine(path, base, why))
    for path in entries("old"):
        base = _LEFTOVER_RE.sub("", path.name)
        target = root / base
        if not target.exists():
            with storage.writing(root):
                os.replace(path, target)
            actions.append((path, target, "the checkpoint a killed save was replacing, put back"))
        else:
            actions.append(_quarantine(path, base, f"the checkpoint a save replaced with {base}"))
    if prefix is not None:
        for path in entries(None):
            if not _numbered(path, prefix) or _NOT_A_CHECKPOINT_RE.search(path.name):
                continue
            try:
                verify_checkpoint(path, check_hashes=False)
                continue
            except IncompleteCheckpointError as exc:
                if not any(path.iterdir()):
                    path.rmdir()  # an empty folder: no file to lose
                    actions.append((path, None, "empty"))
                    continue
                reason = str(exc).split(": ", 1)[-1]
            except CheckpointError:
                continue  # complete but corrupt, or not ours: left where it is
            actions.append(_quarantine(path, path.name, reason))
    if report:
        _report(actions)
    return actions


def remove_incomplete(
    root: str | os.PathLike,
    *,
    prefix: str | None = DEFAULT_PREFIX,
    protect: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Former name of :func:`recover_leftovers` (which no longer deletes folders that might hold a state);
    returns the folders it dealt with."""
    return [src for src, _, _ in recover_leftovers(root, prefix=prefix, protect=protect)]


def resume_path(
    accelerator: Any, resume_from: str | os.PathLike, root: str | os.PathLike, *, prefix: str = DEFAULT_PREFIX
) -> Path:
    """The checkpoint to resume from: ``"latest"`` is the newest complete one below ``root``, anything else a
    folder path. First the main process recovers leftovers of interrupted saves below ``root``
    (:func:`recover_leftovers`: nothing that might hold a state is deleted; all processes wait for it), the
    requested folder excepted so that loading it reports what is wrong with it. With ``"latest"``, newer
    ``<prefix><N>`` folders that were moved aside or fail verification are named, with what was recovered, in one
    warning line, rather than skipped silently. Raises :class:`CheckpointError` when ``"latest"`` finds nothing."""
    root = Path(root)
    target = None if str(resume_from) == "latest" else Path(resume_from)
    actions: list[tuple[Path, Path | None, str]] = []
    if accelerator.is_main_process:
        actions = recover_leftovers(root, prefix=prefix, protect=() if target is None else (target,), report=False)
    accelerator.wait_for_everyone()
    if target is not None:
        if accelerator.is_main_process:
            _report(actions)
        return target
    found = latest_checkpoint(root)
    newest = -1 if found is None else int(verify_checkpoint(found, check_hashes=False)["step"])
    candidates = root.iterdir() if root.is_dir() else ()
    damaged = sorted(
        (p for p in candidates if _numbered(p, prefix) and int(p.name[len(prefix) :]) > newest and p != found),
        key=lambda p: int(p.name[len(prefix) :]),
    )
    damaged = [p.name for p in damaged if not is_complete(p)]
    passed_over = [
        f"{src.name} (moved aside)"
        for src, dst, _ in actions
        if dst is not None and QUARANTINE in dst.name and _numbered(src, prefix)
        and int(src.name[len(prefix) :]) > newest
    ]  # fmt: skip
    passed_over += [f"{name} (damaged, kept; loading it is refused)" for name in damaged]
    if accelerator.is_main_process:  # 'latest' must not fall back to an older one without a word
        suffix = ""
        if passed_over and found is not None:
            suffix = f"resuming from {found.name}, not from newer {', '.join(passed_over)}"
        elif passed_over:
            suffix = f"no complete checkpoint left to resume from ({', '.join(passed_over)})"
        _report(actions, suffix)
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


def _check_rng_files(accelerator: Any, folder: Path) -> None:
    """Refuse a checkpoint whose RNG states Accelerate would fail to restore: it catches any error there and
    only logs it at info level, so a resume would go on with this process's RNG, silently not exact. Every
    process's file is checked (on every process, so all ranks decide alike), by restoring it into scratch
    generators."""
    import numpy as np
    from accelerate.utils import RNG_STATE_NAME
    from accelerate.utils.other import load

    for i in range(int(getattr(accelerator, "num_processes", 1))):
        name = f"{RNG_STATE_NAME}_{i}.pkl"
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}, so process {i}'s RNG could not be restored")
        try:
            states = load(path)
            if not isinstance(states, Mapping):
                raise TypeError(f"holds a {type(states).__name__}, not a dict of RNG states")
            random.Random().setstate(states["random_state"])
            np.random.RandomState().set_state(states["numpy_random_seed"])
            torch.Generator().set_state(states["torch_manual_seed"])
            for key, value in states.items():
                if key.startswith("torch_") and key.endswith("_manual_seed") and key != "torch_manual_seed":
                    values = value if isinstance(value, (list, tuple)) else [value]
                    if not all(torch.is_tensor(v) and v.dtype == torch.uint8 for v in values):
                        raise TypeError(f"{key} is not a device RNG state")
        except Exception as exc:  # noqa: BLE001 - whatever makes the restore fail
            raise CheckpointError(
                f"checkpoint {folder}: {name} does not hold RNG states Accelerate can restore ({_first_line(exc)}); "
                "the resume would not be exact, nothing was changed"
            ) from exc


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
    named in one refusal. The weight names and shapes and every process's RNG-state file are checked before
    anything is loaded. Any refusal or failure raises :class:`CheckpointError` with the models, optimizers,
    schedulers and RNG states unchanged."""
    folder = Path(directory)
    marker = verify_checkpoint(folder, check_hashes=check_hashes)
    _refuse_mismatches(folder, marker.get("metadata", {}), expect or {})
    _check_weight_names(accelerator, folder)
    _check_rng_files(accelerator, folder)
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

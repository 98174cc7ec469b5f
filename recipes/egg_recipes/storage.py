"""Writing run outputs: an up-front check of the output folder, atomic writes, and one-line errors.

A full disk, a read-only or forbidden folder or an output path through an existing file surface from deep
inside torch, safetensors or the OS as tracebacks with messages like ``unexpected pos 704 vs 598`` (torch's zip
writer on a full disk). :func:`write_error` turns them into a :class:`StorageError` whose message names the
path and the cause in one line; :func:`writing` and :func:`atomic_path` apply it at the save points, and
:func:`prepare_output_dir` finds an unusable folder before any compute is spent.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from egg_optim.errors import EggOptimError

__all__ = ["StorageError", "atomic_path", "prepare_output_dir", "write_error", "write_text_atomic", "writing"]

_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM}
_OS_ERROR_RE = re.compile(r"os error (\d+)")  # Rust's io::Error text (safetensors)
# torch's PytorchStreamWriter (torch.save) and C++ streams report a failed write without the errno
_TORCH_WRITE_RE = re.compile(
    r"unexpected pos|file write failed|PytorchStreamWriter failed|basic_ios::clear|iostream error", re.IGNORECASE
)
_LOW_SPACE = 16 * 1024 * 1024


class StorageError(EggOptimError, OSError):
    """An output cannot be written (no space left, read-only or forbidden folder, a path through a file).

    The message is one line naming the path; ``errno`` is set when known. Whatever was being written is not
    left half written (atomic writes) and earlier outputs are kept."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _file_in_the_way(path: Path) -> Path | None:
    """The first component of ``path`` that exists and is not a folder."""
    for candidate in reversed((path, *path.parents)):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_existing_ancestor(path)).free < _LOW_SPACE
    except OSError:
        return False


def _error_code(exc: BaseException, path: Path) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    m = _OS_ERROR_RE.search(str(exc))
    if m:
        return int(m.group(1))
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_RE.search(str(exc)) and _disk_full(path):
        return errno.ENOSPC
    return None


def write_error(exc: BaseException, path: str | os.PathLike) -> StorageError | None:
    """The :class:`StorageError` that explains ``exc``, raised while writing ``path``; ``None`` when ``exc``
    is not a storage problem (it should then propagate as it is)."""
    if isinstance(exc, StorageError):
        return exc
    path = Path(path)
    code = _error_code(exc, path)
    if code in _SPACE:
        what = "disk quota exceeded" if code != errno.ENOSPC else "no space left on device"
        return StorageError(f"{what} while writing {path}", code)
    if code == errno.EROFS:
        return StorageError(f"cannot write to {_existing_ancestor(path)}: read-only file system", code)
    if code in _DENIED:
        return StorageError(f"cannot write to {_existing_ancestor(path)}: permission denied", code)
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return StorageError(f"cannot write {path}: {blocker} is a file, not a folder", code)
    if code == errno.ENAMETOOLONG:
        return StorageError(f"cannot write {path}: file name too long", code)
    return None


@contextmanager
def writing(path: str | os.PathLike, *, only_space: bool = False) -> Iterator[None]:
    """Turn storage failures raised inside the block (while writing ``path``) into :class:`StorageError`;
    with ``only_space`` just a full disk or quota, for blocks that also read (where a permission error need
    not be about ``path``)."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, path)
        if error is None or (only_space and error.errno not in _SPACE):
            raise
        raise error from exc


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (not created yet) to write to; on success it is synced and
    renamed onto ``path`` (atomic: readers see the old file or the new one, never a part), on failure removed,
    and a storage failure becomes a :class:`StorageError` naming ``path``."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.part")
    with writing(final):
        try:
            yield tmp
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` if needed and prove it writable (a small file is created and
    removed), so a run that could not save its results fails before training. Raises :class:`StorageError`
    with a one-line message: a file in the way, a read-only file system, no permission, no space."""
    folder = Path(path)
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise StorageError(f"cannot create output folder {folder}: {blocker} is a file, not a folder", errno.ENOTDIR)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".egg_optim-write-test-")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    return folder

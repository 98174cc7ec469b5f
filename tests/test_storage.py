"""egg_recipes.storage: output-folder check, atomic writes, storage failures as one-line StorageErrors.

Faults are simulated (patched writes, patched free space): the tests run as root, where a chmod'ed folder is
still writable, and never fill a disk."""

from __future__ import annotations

import errno
from collections import namedtuple
from pathlib import Path

import pytest
from egg_recipes import storage
from egg_recipes.storage import StorageError, atomic_path, prepare_output_dir, write_error, write_text_atomic

from egg_optim.errors import EggOptimError

_Usage = namedtuple("_Usage", "total used free")


def _free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: _Usage(10**12, 10**12 - free, free))


@pytest.mark.parametrize(
    "exc, message",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device while writing {p}"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded while writing {p}"),
        # safetensors (Rust) reports the errno only in its text
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
         "no space left on device while writing {p}"),
        (OSError(errno.EROFS, "Read-only file system"), "cannot write to {d}: read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied"), "cannot write to {d}: permission denied"),
        (OSError(errno.EPERM, "Operation not permitted"), "cannot write to {d}: permission denied"),
    ],
)  # fmt: skip
def test_write_error_messages(tmp_path, exc, message):
    target = tmp_path / "out" / "model.safetensors"  # "out" does not exist: the folder named is tmp_path
    error = write_error(exc, target)
    assert isinstance(error, StorageError) and isinstance(error, EggOptimError) and isinstance(error, OSError)
    assert str(error) == message.format(p=target, d=tmp_path)
    assert "\n" not in str(error)


def test_torch_zip_writer_failure_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch.save on a full disk raises "unexpected pos" without an errno: free space decides."""
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    _free_space(monkeypatch, 4096)
    assert str(write_error(exc, tmp_path / "optimizer.bin")) == (
        f"no space left on device while writing {tmp_path / 'optimizer.bin'}"
    )
    _free_space(monkeypatch, 10**11)
    assert write_error(exc, tmp_path / "optimizer.bin") is None  # not explained: propagates as it is


def test_unrelated_errors_are_not_storage_errors(tmp_path):
    assert write_error(ValueError("bad value"), tmp_path) is None
    assert write_error(OSError(errno.ECONNRESET, "reset"), tmp_path) is None
    with pytest.raises(KeyError), storage.writing(tmp_path):
        raise KeyError("bug")


def test_writing_only_space(tmp_path):
    with pytest.raises(PermissionError), storage.writing(tmp_path, only_space=True):
        raise PermissionError(errno.EACCES, "Permission denied")  # maybe a read: not translated
    with pytest.raises(StorageError, match="no space left"), storage.writing(tmp_path, only_space=True):
        raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------- output folder
def test_output_dir_created_and_probe_removed(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("depth", ["under", "is"])
def test_output_dir_through_a_file(tmp_path, depth):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" / "run" if depth == "under" else tmp_path / "f"
    with pytest.raises(StorageError) as info:
        prepare_output_dir(target)
    assert str(info.value) == f"cannot create output folder {target}: {tmp_path / 'f'} is a file, not a folder"
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_unwritable_output_dir(tmp_path, monkeypatch, code, cause):
    def refuse(*args, **kwargs):
        raise OSError(code, "refused")

    monkeypatch.setattr(storage.tempfile, "mkstemp", refuse)
    with pytest.raises(StorageError) as info:
        prepare_output_dir(tmp_path / "run")
    assert str(info.value) == f"cannot write to {tmp_path / 'run'}: {cause}"


def test_full_output_dir_is_found_up_front(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "write", full)
    with pytest.raises(StorageError, match="no space left on device while writing"):
        prepare_output_dir(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


# ---------------------------------------------------------------------------- atomic writes
def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_text_atomic(target, "old")
    real = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(StorageError) as info:
        write_text_atomic(target, "new contents")
    assert str(info.value) == f"no space left on device while writing {target}"
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_path_other_errors_propagate_and_leave_nothing(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        _ = 1 / 0
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]

"""Atomic file and directory writes.

Every output of amtl-compress is written under a temporary sibling name and renamed into place,
so an interrupted run never leaves a file or directory that looks complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from amtl_compress.errors import OutputExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it to ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` (if it existed) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """``safetensors.torch.save_file`` written atomically; tensors are made contiguous first."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


#: Linux ``renameat2`` flag that swaps two paths in one step (include/uapi/linux/fs.h).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` atomically; False where the OS cannot.

    A reader resolving ``b`` sees the old or the new directory, never no directory, which the
    portable two-rename fallback cannot promise.
    """
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc < 2.28 or another libc
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file that guards writes to ``path``: the hidden sibling ``.<name>.lock``."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` for the duration of the block.

    The lock is ``fcntl.flock`` on :func:`lock_path`, which exists only while a writer holds it.
    The kernel releases a flock when its holder dies, so a killed writer leaves at most an
    unlocked file that the next writer takes over. A writer that locked a file which was
    unlinked meanwhile (the previous holder finishing) retries on the new one, so two writers can
    never both believe they hold the lock.

    Raises:
        OutputExistsError: another process holds the lock (it is writing ``path`` right now).
    """
    path = Path(path)
    if fcntl is None:  # no flock (Windows): the atomic rename alone still prevents torn output
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(
                f"output `{path}` is being written by another process; wait for it to finish "
                "or choose another output"
            ) from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # we locked a file its holder has just removed: take the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it, so no one can be waiting on it
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary siblings of ``path`` left by writers that were killed.

    Only called under :func:`output_lock`, when no live writer of ``path`` can own one.
    """
    name = glob.escape(path.name)
    for pattern in (f".{name}.*.tmp", f".{name}.*.old"):
        for stale in path.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; move it to ``path`` if the block succeeds.

    The whole block runs under :func:`output_lock`, so two writers of the same ``path`` never
    interleave: the second fails at once with ``OutputExistsError``. If ``path`` exists and
    ``overwrite`` is true, it is replaced only after the new one is complete, by one atomic
    exchange where the OS supports it (Linux ``renameat2``), so readers see either the old or the
    new complete version. On an exception the temporary directory is removed; temporaries of
    writers that were killed are removed by the next writer.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        OutputExistsError: another process is writing ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        if path.exists() and not overwrite:  # created by a writer that held the lock before us
            raise FileExistsError(path)
        _remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            _fsync_dir(tmp)
            if path.exists():
                if not overwrite:
                    raise FileExistsError(path)
                if not _exchange(tmp, path):  # tmp now holds the old version, removed below
                    old = Path(
                        tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
                    )
                    os.replace(path, old / "d")
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

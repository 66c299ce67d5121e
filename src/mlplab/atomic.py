"""Atomic writes that follow no symlink: whole or absent, never through a planted link.

Every file mlplab writes for keeps (checkpoints, ``run.json``, sweep summaries, extracted
data) goes through :func:`atomic_write`: the content is written to a new temporary file
beside the target, created exclusively (``O_CREAT | O_EXCL``, so a file or symlink planted
under a predictable name is never opened), then renamed over the target. ``rename``
replaces a symlink at the target itself rather than writing through it. A failed write
removes its temporary file; a full disk is one :class:`~mlplab.errors.StorageError` line.

Temporary files are named ``.<target name>.<random>.partial``; one left behind by a killed
process is removed by :func:`remove_stale_partials` when its folder is used again (as are the
``<name>.partial`` files of older versions).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from mlplab.errors import StorageError

PARTIAL_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: errnos of a folder this process may not write into (read-only mount, permissions).
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(err: OSError, path: Path) -> StorageError:
    """One line for an OSError while writing ``path``: the disk and its free space when it is full.

    The returned error's ``errno`` attribute is ``err.errno`` (callers tell a read-only
    folder from a full disk by it).
    """
    folder = path.parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        error = StorageError(
            f"the disk holding {folder} is full ({free}) while writing {path.name}; the partial file was removed "
            "and earlier files are intact; allowed: free space there, or write elsewhere (paths.log_dir=...)"
        )
    else:
        error = StorageError(f"cannot write {path} ({err.strerror or err}); allowed: a writable folder")
    error.errno = err.errno
    return error


def _discard(tmp: Path) -> None:
    """Remove a temporary file; a failure to do so must not hide the error being raised."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, exclusively created temporary path beside ``target``; rename it onto ``target`` on success.

    The writer fills the yielded path (it exists, empty). On any exception the temporary
    file is removed; an ``OSError`` is re-raised as :class:`StorageError`.
    """
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    except OSError as err:
        raise storage_error(err, target) from None
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; keep the usual permissions
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        _discard(tmp)
        raise storage_error(err, target) from None
    except BaseException:
        _discard(tmp)
        raise


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a fresh temporary file, which then replaces ``target``; returns ``target``."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def atomic_write_bytes(target: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` as ``target``, atomically; returns ``target``."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    return atomic_write(target, write)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) as ``target``, atomically; returns ``target``."""
    return atomic_write_bytes(target, text.encode())


def is_partial(path: Path) -> bool:
    """A temporary file of :func:`atomic_path` (or the older ``<name>.partial`` form)."""
    return path.name.endswith(PARTIAL_SUFFIX)


def _partial_target(name: str) -> str:
    """The name a temporary file was written for: ``.<name>.<8 random>.partial`` or ``<name>.partial``."""
    fresh = re.fullmatch(r"\.(.+)\.[0-9a-z_]{8}\.partial", name)
    return fresh.group(1) if fresh else name.removesuffix(PARTIAL_SUFFIX)


def remove_stale_partials(folder: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Remove the ``*.partial`` files and symlinks directly in ``folder``, left by a killed write.

    Both namings count: ``.<name>.<random>.partial`` (:func:`atomic_path`) and the
    ``<name>.partial`` of older versions. Only names of that form are touched, never a
    directory (nor what a symlink points to); with ``suffix``, only temporary files of targets
    named ``*<suffix>`` (``.ckpt``). Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        target = _partial_target(path.name)
        if is_partial(path) and not is_dir and target.endswith(suffix):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed

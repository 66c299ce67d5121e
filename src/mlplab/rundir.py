"""A run dir's life: what a run made there, who holds it, and how it is resumed.

- :func:`note_birth` (before Hydra makes the dir) and :func:`remove_what_the_run_made`: a
  run that fails before training removes exactly the files and folders it created --
  never a pre-existing folder or anything that was in it.
- :func:`hold`: one process per run dir (``train`` and ``resume=``), by an advisory lock
  on ``<dir>/.mlplab.lock`` that the kernel releases when the holder dies, so the lock
  of a killed process is taken over without any stale-lock guessing.
- :func:`resume_command`: the ``resume=`` command for a dir, quoted so that it works when
  pasted (sweep job dirs hold ``=`` and ``,``, which Hydra's grammar would split).
- :func:`newest_last_checkpoint`: the checkpoint a resume continues from -- the newest
  completed epoch among ``last.ckpt`` and versioned ``last-v<N>.ckpt`` files.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shlex
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from omegaconf import DictConfig

from mlplab.errors import CheckpointError, ConfigError, StorageError

log = logging.getLogger(__name__)
LOCK_FILE = ".mlplab.lock"


@dataclass(frozen=True)
class Birth:
    """What existed before a run used ``path``: whether the dir did, its entries, and its missing ancestors."""

    path: Path
    existed: bool
    entries: frozenset[str]
    made_parents: tuple[Path, ...]  # ancestors this run creates, innermost first


_births: dict[Path, Birth] = {}


def note_birth(path: str | os.PathLike) -> Birth:
    """Record what is at ``path`` before the run writes anything there."""
    path = Path(path).absolute()
    made = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    existed = path.is_dir()
    entries = frozenset(os.listdir(path)) if existed else frozenset()
    birth = Birth(path, existed, entries, tuple(made))
    _births[path] = birth
    return birth


def birth_of(path: str | os.PathLike) -> Birth | None:
    return _births.get(Path(path).absolute())


def remove_what_the_run_made(birth: Birth) -> None:
    """Remove the entries the run added to ``birth.path``, the dir if the run made it, and the parents it made.

    Entries that were there before are left as they are; folders are removed only when empty
    (another run may have started in the same date folder meanwhile).
    """
    path = birth.path
    if not path.is_dir() or path.is_symlink():
        return
    for name in os.listdir(path):
        if name in birth.entries:
            continue
        entry = path / name
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            pass
    for folder in ((path,) if not birth.existed else ()) + birth.made_parents:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break


class RunDirBusy(ConfigError):
    """Another live process holds the run dir."""


@contextmanager
def hold(run_dir: str | os.PathLike, key: str) -> Iterator[None]:
    """Hold ``run_dir`` for this process; another live holder is one :class:`RunDirBusy` line.

    The lock file is created by the first holder and left in place (it is empty of meaning
    without the kernel's lock); a holder that dies releases the lock with its process.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError as err:  # a planted symlink or FIFO, a read-only dir
        raise StorageError(
            f"{key}={run_dir} cannot be locked for this run: {path} ({err.strerror or err}); "
            "allowed: a run dir whose .mlplab.lock is a regular file mlplab made (remove it)"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise StorageError(f"{key}={run_dir} cannot be locked for this run ({err.strerror or err})") from None
            holder = "".join(ch for ch in os.pread(fd, 32, 0).decode(errors="replace") if ch.isdigit()) or "?"
            raise RunDirBusy(
                f"{key}={run_dir} is in use by another run (pid {holder}), which this one would interleave with; "
                "allowed: wait until that run ends (or stop it), then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_HYDRA_SAFE = re.compile(r"^[\w./~+\-@%:]+$")


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: as it is when Hydra reads it back unchanged, else single-quoted."""
    if _HYDRA_SAFE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unquote_hydra_value(text: str) -> str:
    """The inverse of :func:`hydra_value` for a quoted value (``'...'`` or ``"..."``)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        inner = text[1:-1]
        return re.sub(r"\\(.)", r"\1", inner)
    return text


def resume_command(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> str:
    """The command that resumes ``run_dir``, safe to paste into a POSIX shell.

    ``overrides`` (the run's own) that ``resume=`` takes only when repeated
    (:func:`mlplab.trust.untrusted_overrides`, e.g. a ``+callbacks.x._target_=...`` of the
    user's) are repeated: the run that prints the command ran them itself.
    """
    from mlplab.trust import untrusted_overrides

    try:
        again = [text for text, _why in untrusted_overrides(list(overrides or []))]
    except Exception:
        again = []
    args = [f"resume={hydra_value(str(run_dir))}", *again]
    return "python src/train.py " + " ".join(shlex.quote(a) for a in args)


def checkpoint_progress(path: Path) -> tuple[int, int] | None:
    """(epoch, global step) of a Lightning checkpoint, or None if it cannot be read as one."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"]), int(ckpt.get("global_step", 0))
    except Exception:
        return None


def newest_last_checkpoint(checkpoints: Path) -> Path | None:
    """The ``last*.ckpt`` in ``checkpoints`` holding the most progress (epoch, global step); None if none is readable."""
    candidates = sorted(checkpoints.glob("last*.ckpt")) if checkpoints.is_dir() else []
    best, best_progress = None, None
    for path in candidates:
        if not re.fullmatch(r"last(-v\d+)?\.ckpt", path.name) or not path.is_file():
            continue
        progress = checkpoint_progress(path)
        if progress is not None and (best_progress is None or progress > best_progress):
            best, best_progress = path, progress
    return best


def resume_checkpoint(cfg: "DictConfig") -> Path | None:
    """The checkpoint training starts from: ``ckpt_path``, or the newest ``last*.ckpt`` of the resumed run.

    A resumed run with no last checkpoint (stopped before its first epoch ended) starts
    over, in the same dir, from the same seed. One whose last checkpoints exist but none
    can be read is refused: starting over would overwrite its best checkpoint.
    """
    if cfg.get("ckpt_path") is not None:
        return Path(str(cfg.ckpt_path)).expanduser()
    if cfg.get("resume") is None:
        return None
    checkpoints = Path(str(cfg.resume)).expanduser() / "checkpoints"
    newest = newest_last_checkpoint(checkpoints)
    if newest is not None:
        return newest
    present = sorted(p.name for p in checkpoints.glob("last*.ckpt")) if checkpoints.is_dir() else []
    if present:
        raise CheckpointError(
            f"resume={cfg.resume}: {', '.join(present)} in {checkpoints} cannot be read as a checkpoint, and starting "
            "over would overwrite the run's checkpoints; allowed: a run dir with a readable last.ckpt (or remove the "
            "unreadable file to start that run over)"
        )
    log.warning("resume=%s: no checkpoints/last.ckpt (no epoch had completed): starting over", cfg.resume)
    return None

"""Atomic writes (``mlplab.atomic``): whole or absent, never through a planted symlink, a full disk is one line.

- no write follows a symlink planted at a predictable temporary name or at the target itself;
- the temporary file is created exclusively (``O_CREAT | O_EXCL``);
- a write that hits ENOSPC halfway raises one :class:`StorageError` line naming the folder,
  removes its temporary file and leaves the earlier file intact -- also for a checkpoint
  saved by a real training run, whose earlier checkpoints still load;
- stale temporary files of both namings are cleaned, directories never.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK, compose_cfg
from mlplab import atomic
from mlplab.atomic import atomic_write_bytes, atomic_write_text, remove_stale_partials
from mlplab.errors import StorageError

SENTINEL = "sentinel: must stay as it is\n"


def plant_symlinks(folder: Path, target: str, outside: Path) -> Path:
    """A sentinel file outside ``folder``, and symlinks to it at every temporary name a writer could predict."""
    outside.mkdir(exist_ok=True)
    sentinel = outside / "sentinel.txt"
    sentinel.write_text(SENTINEL)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (f"{target}.partial", f".{target}.partial", f".{target}.tmp{os.getpid()}", f"{target}.tmp"):
        (folder / name).symlink_to(sentinel)
    return sentinel


def assert_sentinel_untouched(sentinel: Path) -> None:
    assert sentinel.read_text() == SENTINEL
    assert not sentinel.is_symlink()


def disk_full_after(monkeypatch: pytest.MonkeyPatch, folder: Path, nbytes: int, armed=lambda: True) -> dict[str, int]:
    """Make ``os.write`` to a temporary (``*.partial``) file in ``folder`` fail with ENOSPC after ``nbytes`` bytes.

    Returns the bytes written so far per temporary file. ``armed()`` says whether the disk is full yet.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("finds an fd's file through /proc/self/fd")
    real_write, folder = os.write, folder.resolve()
    written: dict[str, int] = {}

    def write(fd: int, data) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return real_write(fd, data)
        if Path(name).parent != folder or not name.endswith(".partial") or not armed():
            return real_write(fd, data)
        room = nbytes - written.get(name, 0)
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(memoryview(data)[:room]))
        written[name] = written.get(name, 0) + n
        return n

    monkeypatch.setattr(os, "write", write)
    return written


def test_a_symlink_at_a_predictable_temporary_name_is_never_written_through(tmp_path):
    folder = tmp_path / "run"
    sentinel = plant_symlinks(folder, "run.json", tmp_path / "outside")
    atomic_write_text(folder / "run.json", '{"status": "ok"}\n')
    assert (folder / "run.json").read_text() == '{"status": "ok"}\n'
    assert_sentinel_untouched(sentinel)
    assert (folder / "run.json.partial").is_symlink()  # left alone, not opened


def test_a_symlink_at_the_target_is_replaced_by_a_regular_file(tmp_path):
    folder = tmp_path / "run"
    sentinel = plant_symlinks(folder, "summary.md", tmp_path / "outside")
    (folder / "summary.md").symlink_to(sentinel)
    atomic_write_bytes(folder / "summary.md", b"# table\n")
    assert not (folder / "summary.md").is_symlink()
    assert (folder / "summary.md").read_bytes() == b"# table\n"
    assert_sentinel_untouched(sentinel)


def test_the_temporary_file_is_created_exclusively_and_gets_the_usual_permissions(tmp_path, monkeypatch):
    real_open, opened = os.open, []

    def recording_open(path, flags, *args, **kwargs):
        opened.append((Path(path), flags))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    atomic_write_text(tmp_path / "run.json", "{}\n")
    created = [(p, f) for p, f in opened if f & os.O_CREAT]
    assert len(created) == 1, opened
    path, flags = created[0]
    assert path.parent == tmp_path and path.name.startswith(".run.json.") and path.name.endswith(".partial")
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(tmp_path) == ["run.json"]


def test_a_full_disk_is_one_line_naming_the_folder_and_the_old_file_stays(tmp_path, monkeypatch):
    target = tmp_path / "summary.csv"
    target.write_text("old,complete\n")
    written = disk_full_after(monkeypatch, tmp_path, nbytes=1000)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"x" * 100_000)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"the disk holding {tmp_path} is full (") and "while writing summary.csv" in msg, msg
    assert info.value.errno == errno.ENOSPC
    assert list(written.values()) == [1000]  # it failed halfway, not before the first byte
    assert target.read_text() == "old,complete\n"
    assert os.listdir(tmp_path) == ["summary.csv"]


def test_a_read_only_folder_is_one_line_with_its_errno(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(StorageError) as info:
        atomic_write_text(tmp_path / "run.json", "{}")
    assert (
        str(info.value) == f"cannot write {tmp_path / 'run.json'} (Read-only file system); allowed: a writable folder"
    )
    assert info.value.errno == errno.EROFS


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(tmp_path / "last.ckpt", interrupted)
    assert os.listdir(tmp_path) == []


def test_stale_partials_of_both_namings_are_removed_directories_and_link_targets_never(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.ckpt.partial").write_text("not in the folder")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt.partial").write_bytes(b"older versions' name")
    (folder / ".last.ckpt.k3j2h1.partial").write_bytes(b"this version's name")
    (folder / "link.partial").symlink_to(outside / "keep.ckpt.partial")
    (folder / "dir.partial").mkdir()
    (folder / "dir.partial" / "inside.partial").write_text("in a dir")
    (folder / "epoch_000.ckpt").write_bytes(b"good")
    (folder / "notes.partial.txt").write_text("not a temporary name")

    removed = remove_stale_partials(folder)
    assert sorted(p.name for p in removed) == [".last.ckpt.k3j2h1.partial", "last.ckpt.partial", "link.partial"]
    assert sorted(os.listdir(folder)) == ["dir.partial", "epoch_000.ckpt", "notes.partial.txt"]
    assert (folder / "dir.partial" / "inside.partial").is_file()
    assert (outside / "keep.ckpt.partial").read_text() == "not in the folder"
    assert remove_stale_partials(tmp_path / "absent") == []


def test_a_checkpoint_save_never_writes_through_a_planted_symlink(tmp_path):
    from mlplab.callbacks import AtomicCheckpointIO

    folder = tmp_path / "checkpoints"
    sentinel = plant_symlinks(folder, "last.ckpt", tmp_path / "outside")
    (folder / "last.ckpt").symlink_to(sentinel)
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3.0)}, folder / "last.ckpt")
    assert not (folder / "last.ckpt").is_symlink()
    assert torch.equal(torch.load(folder / "last.ckpt", weights_only=True)["w"], torch.arange(3.0))
    assert_sentinel_untouched(sentinel)


def test_a_full_disk_in_epoch_2_stops_training_with_one_line_and_epoch_1_checkpoints_load(
    tmp_path, monkeypatch, one_torch_thread
):
    from mlplab.callbacks import ModelCheckpoint
    from mlplab.engines import fit

    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    sentinels = []
    setup = ModelCheckpoint.setup

    def setup_then_plant(self, *args, **kwargs):
        # Planted once the run started (a checkpoint dir holding files is refused at the start).
        setup(self, *args, **kwargs)
        if sentinels:  # setup runs again for the test stage
            return
        for i, name in enumerate(("last.ckpt", "epoch_000.ckpt", "epoch_001.ckpt")):
            sentinels.append(plant_symlinks(ckpt_dir, name, tmp_path / f"outside{i}"))

    monkeypatch.setattr(ModelCheckpoint, "setup", setup_then_plant)
    # The disk fills up once epoch 1's checkpoints are complete.
    epoch_1_done = lambda: (ckpt_dir / "epoch_000.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()  # noqa: E731
    written = disk_full_after(monkeypatch, ckpt_dir, nbytes=4096, armed=epoch_1_done)
    cfg = compose_cfg(QUICK + ["trainer.max_epochs=2", "logger=none"], out)
    with pytest.raises(StorageError) as info:  # Lightning neither swallows nor wraps it
        fit(cfg)
    assert type(info.value) is StorageError
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"the disk holding {ckpt_dir} is full ("), msg
    assert list(written.values()) == [4096]  # one save failed, halfway through
    names = sorted(p.name for p in ckpt_dir.iterdir() if not p.is_symlink())
    assert names == ["epoch_000.ckpt", "last.ckpt"], names  # no temporary file left
    for name in names:
        ckpt = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 0 and ckpt["state_dict"]
    assert len(sentinels) == 3
    for sentinel in sentinels:
        assert_sentinel_untouched(sentinel)


def test_sweep_summaries_never_follow_a_symlink_and_a_full_disk_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from mlplab import runs
    from mlplab.sweeps import SUMMARY_FILES, main

    sweep_dir = tmp_path / "sweep"
    for name in ("0_lr=0.1", "1_lr=0.2"):
        runs.write_run_record(sweep_dir / name, {"status": "ok", "metrics": {"val/acc_best": 0.5}, "overrides": [name]})
    sentinels = [plant_symlinks(sweep_dir, name, tmp_path / f"outside{i}") for i, name in enumerate(SUMMARY_FILES)]
    for name, sentinel in zip(SUMMARY_FILES, sentinels):
        (sweep_dir / name).symlink_to(sentinel)
    assert main([str(sweep_dir)]) == 0
    for name, sentinel in zip(SUMMARY_FILES, sentinels):
        assert (sweep_dir / name).is_file() and not (sweep_dir / name).is_symlink()
        assert_sentinel_untouched(sentinel)
    before = {name: (sweep_dir / name).read_bytes() for name in SUMMARY_FILES}
    capsys.readouterr()

    disk_full_after(monkeypatch, sweep_dir, nbytes=100)
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the disk holding {sweep_dir} is full (") and err.count("\n") == 1, err
    assert {name: (sweep_dir / name).read_bytes() for name in SUMMARY_FILES} == before
    assert not list(sweep_dir.glob("*.partial")) or all(p.is_symlink() for p in sweep_dir.glob("*.partial"))
    assert not [p for p in sweep_dir.glob(".*") if not p.is_symlink()]


def test_the_epoch_timer_file_never_follows_a_symlink(tmp_path):
    from mlplab.callbacks import EpochTimer

    sentinel = plant_symlinks(tmp_path / "run", "epochs.json", tmp_path / "outside")
    (tmp_path / "run" / "epochs.json").symlink_to(sentinel)
    timer = EpochTimer(out_file=str(tmp_path / "run" / "epochs.json"))
    timer.epoch_seconds = [0.5, 0.25]
    timer._write()
    assert (tmp_path / "run" / "epochs.json").read_text() == '{"epoch_seconds": [0.5, 0.25]}'
    assert not (tmp_path / "run" / "epochs.json").is_symlink()
    assert_sentinel_untouched(sentinel)

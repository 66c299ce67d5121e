"""Faults and careless use cost at most the work in flight, never a user's file or a run's record.

- a failed run removes exactly what it created, never a folder that was there before;
- ``run.json`` is a record: a refused ``resume=`` never touches it, a resumed run keeps its
  earlier metrics, a completed run is not "resumed" into a worse record;
- one process per run dir; a moved run dir resumes from where it is now, from its newest epoch;
- a cosine schedule resumed for longer is re-planned (bit-identical to the longer run);
- SIGTERM in the test stage, between sweep jobs, and Ctrl+C twice stop cleanly, say how to
  resume, and the printed command works when pasted, also for sweep job dirs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK, REPO, assert_same_nested, compose_cfg, load_ckpt, run_cli
from mlplab import runs
from mlplab.engines import train
from mlplab.rundir import hold, resume_command

SEND_SIGNAL = "+callbacks.send_signal._target_=send_signal.SendSignal"
ARGS = [*QUICK, "logger=none"]


def _env(tmp_path: Path, signal_at: str | None = None) -> dict[str, str]:
    env = {
        "MLPLAB_ROOT": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    return {**env, "MLPLAB_TEST_SIGNAL": signal_at} if signal_at else env


def _error_lines(stderr: str, prefix: str = "error:") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def _tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# -- a failed run never deletes a user's folder ----------------------------------------------------


def test_a_run_that_fails_before_training_removes_only_what_it_made(tmp_path: Path) -> None:
    users = tmp_path / "my-notes"
    (users / "figures").mkdir(parents=True)
    (users / "notes.log").write_text("my own notes\n")
    (users / "figures" / "a.png").write_bytes(b"png")
    before = _tree(users)
    fresh = tmp_path / "new" / "deeper" / "run"
    for run_dir in (users, fresh):
        proc = run_cli(
            "train", [*ARGS, f"hydra.run.dir={run_dir}", "optimizer.lr=nan"], cwd=tmp_path, env=_env(tmp_path)
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert _error_lines(proc.stderr) == ["error: optimizer.lr=nan is invalid; allowed: a finite number > 0"], (
            proc.stderr
        )
    assert _tree(users) == before  # the folder, its notes.log and its subfolder, untouched; nothing added
    assert not (tmp_path / "new").exists()  # the folders the failed run made are gone


# -- run.json is a record; resume from anywhere, one process at a time -----------------------------


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed one-epoch CLI run (cosine schedule planned for 1 epoch)."""
    root = tmp_path_factory.mktemp("completed")
    run_dir = root / "logs" / "run"
    proc = run_cli("train", [*ARGS, f"hydra.run.dir={run_dir}"], cwd=root, env=_env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # over ~15 s: the default suite stays under 10 minutes
def test_refused_resumes_never_touch_the_record(completed: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(completed, run_dir)
    record = (run_dir / "run.json").read_bytes()
    checkpoints = _tree(run_dir / "checkpoints")
    cases = [
        (
            [],
            f"error: resume={run_dir} completed its 1 epochs (run.json status ok), so there is nothing to resume; "
            f"allowed: resume={run_dir} trainer.max_epochs=N with N > 1 to train longer",
        ),
        (["trainer.max_epochs=2", "optimizer.lr=nan"], "error: optimizer.lr=nan is invalid"),
        (["trainer.max_epochs=2", "scheduler=onecycle"], "error: trainer.max_epochs=2 but ckpt_path="),
    ]
    for extra, expected in cases:
        proc = run_cli("train", [f"resume={run_dir}", *extra], cwd=tmp_path, env=_env(tmp_path))
        assert proc.returncode == 2, proc.stderr[-2000:]
        [line] = _error_lines(proc.stderr)
        assert line.startswith(expected), line
        assert "Traceback" not in proc.stderr
        assert (run_dir / "run.json").read_bytes() == record
        assert _tree(run_dir / "checkpoints") == checkpoints

    # Another live process holds the dir: a second run there is refused, the record untouched.
    with hold(run_dir, "resume"):
        proc = run_cli("train", [f"resume={run_dir}", "trainer.max_epochs=2"], cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = _error_lines(proc.stderr)
    assert line.startswith(f"error: resume={run_dir} is in use by another run (pid {os.getpid()})"), line
    assert (run_dir / "run.json").read_bytes() == record

    # Its last checkpoint damaged: starting over would overwrite the best checkpoint, so it is refused.
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")
    checkpoints = _tree(run_dir / "checkpoints")
    proc = run_cli("train", [f"resume={run_dir}", "trainer.max_epochs=2"], cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = _error_lines(proc.stderr)
    assert line.startswith(f"error: resume={run_dir}: last.ckpt in {run_dir / 'checkpoints'} cannot be read"), line
    assert _tree(run_dir / "checkpoints") == checkpoints and (run_dir / "run.json").read_bytes() == record


def test_a_moved_run_dir_resumes_longer_from_its_newest_epoch_with_the_schedule_replanned(
    completed: Path, tmp_path: Path
) -> None:
    copied = tmp_path / "copied-then-moved"
    shutil.copytree(completed, copied)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    copied.rename(moved)
    previous = runs.read_run_record(moved)
    # What a kill -9 in the middle of a save leaves: partial files, removed when the dir is used again.
    (moved / "checkpoints" / ".last.ckpt.1a2b3c4d.partial").write_bytes(b"half")
    (moved / "checkpoints" / "last.ckpt.partial").write_bytes(b"half")
    # A stale lock of a process that is gone is no obstacle.
    (moved / ".mlplab.lock").write_text("999999\n")

    proc = run_cli("train", [f"resume={moved}", "trainer.max_epochs=2"], cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "the cosine lr schedule is re-planned for 2 epochs (the checkpoint's was planned for 1)"
        in proc.stdout + proc.stderr
    )
    files = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in files and not [f for f in files if f.endswith(".partial")], files
    assert load_ckpt(moved / "checkpoints" / "last.ckpt")["epoch"] == 1
    record = runs.read_run_record(moved)
    assert record["status"] == "ok" and record["epochs"] == 2
    # The earlier part's metrics are kept where this part did not measure them again.
    assert set(previous["metrics"]) <= set(record["metrics"])

    # Re-planned as if planned for 2 epochs from the start: the same weights as a fresh 2-epoch run.
    fresh = tmp_path / "fresh"
    train(compose_cfg([o for o in ARGS if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"], fresh))
    assert_same_nested(
        load_ckpt(moved / "checkpoints" / "last.ckpt")["state_dict"],
        load_ckpt(fresh / "checkpoints" / "last.ckpt")["state_dict"],
        "state_dict",
    )


# -- signals ----------------------------------------------------------------------------------------


def _paste(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a printed ``python src/train.py ...`` command as pasted into a shell, from the checkout."""
    command = command.replace("python src/train.py", f"{sys.executable} src/train.py", 1)
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # over ~15 s: the default suite stays under 10 minutes
def test_sigterm_in_a_sweeps_test_stage_stops_the_sweep_and_the_pasted_resume_works(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *ARGS, SEND_SIGNAL, "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = run_cli("train", args, cwd=tmp_path, env=_env(tmp_path, "SIGTERM:test:0"))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Received SIGTERM" not in proc.stderr
    [line] = _error_lines(proc.stderr, "interrupted: stopped")
    job = next(sweep.glob("0_*"))
    assert "=" in job.name and "," in job.name  # the dir name Hydra's grammar would split
    assert line.startswith("interrupted: stopped by SIGTERM in the test stage:") and "resume with: " in line, line
    record = runs.read_run_record(job)
    assert record["status"] == "interrupted"
    assert not list(sweep.glob("1_*"))  # the sweep stopped: the second job never started
    assert "| interrupted |" in (sweep / "summary.md").read_text()

    proc = _paste(line.split("resume with: ", 1)[1], tmp_path, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = runs.read_run_record(job)
    assert record["status"] == "ok" and 0.5 < record["metrics"]["test/acc"] <= 1.0
    assert "val/acc_best" in record["metrics"]  # kept from the interrupted part


def test_sigterm_between_two_sweep_jobs_stops_the_sweep_with_its_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *ARGS,
        "test=false",
        "seed=1,2,3",
        f"hydra.sweep.dir={sweep}",
        "+hydra.callbacks.signal_after_first_job._target_=fault_callbacks.SignalAfterFirstJob",
    ]
    proc = run_cli("train", args, cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = _error_lines(proc.stderr, "interrupted:")
    assert line.startswith(
        "interrupted: the sweep was stopped by SIGTERM between two jobs; the summary of the jobs so far "
        f"is in {sweep / 'summary.md'}"
    ), line
    assert [p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()] == ["0"]  # no later job started
    assert runs.read_run_record(next(sweep.glob("0_*")))["status"] == "ok"
    assert "1 jobs, 1 ok, 0 failed" in (sweep / "summary.md").read_text()


def test_ctrl_c_twice_stops_at_once_with_a_record_and_a_resume_hint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*ARGS, "trainer.max_epochs=2", SEND_SIGNAL, f"hydra.run.dir={run_dir}", "steps_per_call=1"]
    proc = run_cli("train", args, cwd=tmp_path, env=_env(tmp_path, "SIGINT+SIGINT:1:3"))
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Received SIGTERM" not in proc.stderr
    [line] = _error_lines(proc.stderr, "interrupted:")
    assert line.startswith("interrupted: stopped by SIGINT in epoch 1:") and "holds epoch 0" in line, line
    # the run repeats its own _target_ override, which resume= applies only when repeated
    assert line.endswith(resume_command(run_dir, [SEND_SIGNAL])) and line.endswith(SEND_SIGNAL), line
    record = runs.read_run_record(run_dir)
    assert record["status"] == "interrupted" and "resume with" in record["error"]
    assert load_ckpt(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0


# -- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MB tmpfs (a real filesystem that fills up); skipped where this user cannot mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(small_disk: Path, tmp_path: Path) -> None:
    run_dir = small_disk / "run"
    args = [
        *ARGS,
        "trainer.max_epochs=3",
        f"hydra.run.dir={run_dir}",
        "+callbacks.fill._target_=fault_callbacks.FillDisk",
    ]
    proc = run_cli("train", args, cwd=tmp_path, env={**_env(tmp_path), "MLPLAB_TEST_FILL_AT_EPOCH": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr)
    assert line.startswith(f"error: the disk holding {run_dir / 'checkpoints'} is full ("), line
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".partial")]  # the partial file is gone
    assert load_ckpt(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0  # earlier checkpoints intact
    assert load_ckpt(run_dir / "checkpoints" / "epoch_000.ckpt")["epoch"] == 0
    record = runs.read_run_record(run_dir)
    assert record["status"] == "failed" and record["error"] == line.removeprefix("error: ")


def test_threads_sets_torchs_threads_for_the_run_and_restores_them(tmp_path: Path, monkeypatch) -> None:
    import torch

    import mlplab.engines.run as engines_run
    from mlplab.errors import ConfigError

    seen = []
    original = engines_run.validate_train_config  # the run's first step, inside its settings
    monkeypatch.setattr(
        engines_run, "validate_train_config", lambda cfg: seen.append(torch.get_num_threads()) or original(cfg)
    )
    before = torch.get_num_threads()
    train(compose_cfg([*ARGS, "test=false", "threads=1"], tmp_path / "one"))
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match=r"^threads=0 is invalid; allowed: a positive integer$"):
        train(compose_cfg([*ARGS, "threads=0"], tmp_path / "zero"))
    assert torch.get_num_threads() == before


def test_between_sweep_jobs_the_handler_stays_only_in_the_entry_process(tmp_path: Path) -> None:
    """A test (or notebook) that runs a sweep's job through run_job gets its signal handlers back."""
    import signal

    from hydra.types import RunMode

    from mlplab.cli import run_job
    from mlplab.signals import JOB

    cfg = compose_cfg([*ARGS, "test=false"], tmp_path / "job")
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    hydra_cfg = HydraConfig.instance().cfg
    OmegaConf.set_readonly(hydra_cfg, False)
    OmegaConf.set_readonly(hydra_cfg.hydra, False)
    with open_dict(hydra_cfg):
        hydra_cfg.hydra.mode = RunMode.MULTIRUN  # as a sweep's job: the mode and its sweep dir
        hydra_cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    before = signal.getsignal(signal.SIGTERM)
    run_job(cfg, lambda cfg: {"val/acc_best": 0.5})
    assert signal.getsignal(signal.SIGTERM) is before and not JOB.installed

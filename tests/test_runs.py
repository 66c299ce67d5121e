"""The run record (run.json) and the job rules of ``mlplab.cli.run_job``.

- every job ends with ``<output_dir>/run.json`` (status, error, metrics, epochs, wall time, overrides);
- a single run that fails before training leaves nothing behind; after training started it
  keeps its dir, marked failed;
- in a multirun a failing job is recorded and the sweep goes on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from mlplab import rundir, runs
from mlplab.cli import EXIT_USER_ERROR, run_job
from mlplab.errors import ConfigError, StorageError

CLI_QUICK = [
    "trainer=cpu",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=1",
]


def _job_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A fake run dir as Hydra leaves it before the task runs: ``.hydra/`` and ``train.log``."""
    log_dir = tmp_path / "logs"
    out = log_dir / "runs" / "2026-01-01" / "00-00-00_abcdef"
    log_dir.mkdir()
    rundir.note_birth(out)  # what CheckOutputDir records before Hydra makes the dir
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (out / "train.log").write_text("")
    return log_dir, out


def _cfg(log_dir: Path, out: Path, **extra) -> OmegaConf:
    return OmegaConf.create(
        {
            "paths": {"log_dir": str(log_dir), "output_dir": str(out)},
            "task_name": "train",
            "optimized_metric": "val/acc_best",
            **extra,
        }
    )


def test_success_writes_the_record_and_returns_the_optimized_metric(tmp_path):
    log_dir, out = _job_dir(tmp_path)
    value = run_job(_cfg(log_dir, out), lambda cfg: {"val/acc_best": 0.75, "test/acc": 0.5, "epochs": 3.0})
    assert value == 0.75
    rec = runs.read_run_record(out)
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["metrics"] == {"val/acc_best": 0.75, "test/acc": 0.5}
    assert rec["epochs"] == 3 and rec["task_name"] == "train" and rec["output_dir"] == str(out)
    assert rec["wall_s"] >= 0 and rec["started"] <= rec["finished"] and rec["overrides"] == []


def test_user_error_before_training_leaves_nothing(tmp_path, capsys):
    log_dir, out = _job_dir(tmp_path)

    def bad(cfg):
        raise ConfigError("optimizer.lr=-1 is invalid; allowed: a finite number > 0")

    with pytest.raises(SystemExit) as exit_info:
        run_job(_cfg(log_dir, out), bad)
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: optimizer.lr=-1 is invalid; allowed: a finite number > 0\n"
    # The run dir and the date dir it leaves empty are gone; logs/ itself stays.
    assert log_dir.is_dir() and list(log_dir.rglob("*")) == []


def test_user_error_after_training_started_keeps_the_dir_marked_failed(tmp_path):
    log_dir, out = _job_dir(tmp_path)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"weights")

    def diverges(cfg):
        runs.mark_training_started()
        raise ConfigError("the loss is not finite at step 7")

    with pytest.raises(SystemExit):
        run_job(_cfg(log_dir, out), diverges)
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    rec = runs.read_run_record(out)
    assert rec["status"] == "failed" and rec["error"] == "the loss is not finite at step 7"


def test_a_bug_is_recorded_and_keeps_its_traceback(tmp_path):
    log_dir, out = _job_dir(tmp_path)

    def bug(cfg):
        raise KeyError("oops")

    with pytest.raises(KeyError):
        run_job(_cfg(log_dir, out), bug)
    rec = runs.read_run_record(out)
    assert rec["status"] == "failed" and rec["error"] == "KeyError: 'oops'"


def test_cli_bad_value_leaves_no_run_dir(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        [*CLI_QUICK, "optimizer.lr=-1", f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
        env={"MLPLAB_ROOT": str(tmp_path), "MLPLAB_DATA_DIR": str(tmp_path / "data")},
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.strip().splitlines()[-1] == "error: optimizer.lr=-1 is invalid; allowed: a finite number > 0"
    assert "Traceback" not in proc.stderr
    assert not log_dir.exists() or list(log_dir.rglob("*")) == []


def test_cli_multirun_records_a_failing_job_and_goes_on(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        ["-m", "optimizer.lr=-1,0.05", *CLI_QUICK, f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
        env={"MLPLAB_ROOT": str(tmp_path), "MLPLAB_DATA_DIR": str(tmp_path / "data")},
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: optimizer.lr=-1 is invalid" in proc.stderr
    records = {r["overrides"][0]: r for r in map(runs.read_run_record, log_dir.glob("multiruns/*/*/*")) if r}
    assert set(records) == {"optimizer.lr=-1", "optimizer.lr=0.05"}, records
    failed, ok = records["optimizer.lr=-1"], records["optimizer.lr=0.05"]
    assert f"paths.log_dir={log_dir}" in ok["overrides"] and "trainer.max_epochs=1" in ok["overrides"]
    assert failed["status"] == "failed" and failed["error"].startswith("optimizer.lr=-1 is invalid")
    assert failed["metrics"] == {} and failed["epochs"] is None
    assert ok["status"] == "ok" and ok["error"] is None and ok["epochs"] == 1
    assert 0.3 < ok["metrics"]["test/acc"] <= 1.0 and ok["metrics"]["val/acc_best"] == ok["metrics"]["val/acc"]
    assert (Path(ok["output_dir"]) / "checkpoints" / "last.ckpt").is_file()


def test_the_record_never_follows_a_planted_symlink(tmp_path):
    from test_atomic import assert_sentinel_untouched, plant_symlinks

    out = tmp_path / "run"
    sentinel = plant_symlinks(out, runs.RUN_FILE, tmp_path / "outside")
    (out / runs.RUN_FILE).symlink_to(sentinel)
    runs.write_run_record(out, {"status": "ok"})
    assert not (out / runs.RUN_FILE).is_symlink()
    assert runs.read_run_record(out) == {"status": "ok"}
    assert_sentinel_untouched(sentinel)


def test_a_full_disk_while_writing_the_record_is_one_line_and_keeps_the_old_record(tmp_path, monkeypatch):
    from test_atomic import disk_full_after

    out = tmp_path / "run"
    runs.write_run_record(out, {"status": "interrupted"})
    disk_full_after(monkeypatch, out, nbytes=10)
    with pytest.raises(StorageError) as info:
        runs.write_run_record(out, {"status": "ok", "metrics": {"val/acc_best": 0.5}})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"the disk holding {out} is full (") and "run.json" in msg, msg
    assert runs.read_run_record(out) == {"status": "interrupted"}
    assert sorted(p.name for p in out.iterdir()) == [runs.RUN_FILE]

"""The joblib preset (``hydra/launcher=joblib``, :mod:`mlplab.launchers`) when a job's process dies.

A worker killed by a signal costs only its own job: the other jobs finish, the dead one is
recorded ``failed`` with a one-line reason, the summary is written and the sweep exits 1.
A signal to the sweep's own process stops its job processes too (none is left running).
The faults come from the test-only callbacks in ``sweep_faults.py``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, REPO, run_cli
from mlplab import runs
from mlplab.sweeps import EXIT_JOBS_FAILED

DEAD_JOB = "the worker process running this job died (killed by signal 9 / SIGKILL)"


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "MLPLAB_ROOT": str(tmp_path),
        "MLPLAB_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def _only_sweep_dir(log_dir: Path) -> Path:
    sweeps = sorted(p for p in (log_dir / "multiruns").glob("*/*") if p.is_dir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def _job_dirs(sweep: Path) -> dict[int, Path]:
    return {int(p.name.split("_", 1)[0]): p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # over ~15 s: the default suite stays under 10 minutes
def test_a_killed_job_process_fails_only_its_own_job(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "model=simple_net,sigmoid_net,relu_mlp",
            *QUICK,
            "logger=none",
            f"paths.log_dir={log_dir}",
            "+callbacks.killer._target_=sweep_faults.KillJob",
            "+callbacks.killer.job=1",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        timeout=300,
    )
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == EXIT_JOBS_FAILED, out
    assert "TerminatedWorkerError" not in proc.stderr, out
    assert "error: job 1 (model=sigmoid_net " in proc.stderr and f"): {DEAD_JOB}\n" in proc.stderr, out
    assert "1 of 3 jobs failed (see the table above)" in proc.stderr, out

    sweep = _only_sweep_dir(log_dir)
    jobs = _job_dirs(sweep)
    assert sorted(jobs) == [0, 1, 2], out
    records = {num: runs.read_run_record(path) for num, path in jobs.items()}
    for num, model in ((0, "simple_net"), (2, "relu_mlp")):
        assert f"model={model}" in jobs[num].name
        assert records[num]["status"] == "ok" and records[num]["error"] is None, records[num]
        assert 0.3 < records[num]["metrics"]["test/acc"] <= 1 and records[num]["epochs"] == 1
        assert (jobs[num] / "checkpoints" / "last.ckpt").is_file()
    dead = records[1]
    assert "model=sigmoid_net" in jobs[1].name
    assert dead["status"] == "failed" and dead["error"] == DEAD_JOB, dead
    assert dead["output_dir"] == str(jobs[1]) and "model=sigmoid_net" in dead["overrides"]

    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["error"] == DEAD_JOB and rows[1]["job"] == jobs[1].name
    md = (sweep / "summary.md").read_text()
    assert "3 jobs, 2 ok, 1 failed" in md and DEAD_JOB in md


@pytest.mark.slow  # a sweep of ~20 s each
@pytest.mark.parametrize(
    ("sig", "code", "job_sig"),
    [
        ("SIGTERM", 143, "SIGTERM"),
        ("SIGINT", 130, "SIGINT"),
        ("SIGKILL", -9, "SIGTERM"),  # the sweep's process is gone: each job stops itself as on SIGTERM
    ],
)
def test_a_signal_to_the_sweep_stops_its_job_processes(tmp_path: Path, sig: str, code: int, job_sig: str) -> None:
    log_dir, pid_dir = tmp_path / "logs", tmp_path / "pids"
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model=simple_net,relu_mlp",
        *QUICK,
        "trainer.max_epochs=50",
        "logger=none",
        f"paths.log_dir={log_dir}",
        "+callbacks.stall._target_=sweep_faults.Stall",
        f"+callbacks.stall.pid_dir={pid_dir}",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "src" / "train.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **_env(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(pid_dir.glob("*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.name) for p in pid_dir.glob("*")]
        assert len(pids) == 2 and proc.poll() is None, "both jobs should be training"
        assert os.getpid() not in pids and proc.pid not in pids, "each job runs in a process of its own"
        proc.send_signal(signal.Signals[sig])
        stdout, stderr = proc.communicate(timeout=90)
        deadline = time.monotonic() + 30  # orphaned jobs notice within a second, then stop at a batch end
        while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = f"exit {proc.returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    assert proc.returncode == code, out
    assert not [pid for pid in pids if _alive(pid)], "no job process is left running"
    # Each job stopped as a single run does on that signal: last.ckpt saved, recorded interrupted.
    for num, job in _job_dirs(_only_sweep_dir(log_dir)).items():
        record = runs.read_run_record(job)
        assert record["status"] == "interrupted", (num, record, out)
        assert record["error"].startswith(f"stopped by {job_sig} in epoch "), record
        assert (job / "checkpoints" / "last.ckpt").is_file()

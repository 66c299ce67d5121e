"""Sweeps that compare themselves: summary, failure tolerance, Optuna, launchers.

The summary itself is tested on sweep dirs the tests write (fast); the CLI tests run real
sweeps on digits: a joblib sweep with a failing job (parallel processes, one sweep dir,
the summary, the exit code), ``fail_fast``, an Optuna search and submitit's local executor.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from matplotlib.image import imread
from omegaconf import OmegaConf

from conftest import CONF, run_cli
from mlplab import runs
from mlplab.sweeps import EXIT_JOBS_FAILED, NO_RECORD, SweepSummary, collect, job_dirname, main, write_summary

CLI_QUICK = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"MLPLAB_ROOT": str(tmp_path), "MLPLAB_DATA_DIR": str(tmp_path / "data")}


def _check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def _only_sweep_dir(log_dir: Path) -> Path:
    """The one sweep dir under ``log_dir`` (fails if the jobs were spread over several)."""
    sweeps = sorted(p for p in (log_dir / "multiruns").glob("*/*") if p.is_dir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def _csv_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


# -- job dir names ----------------------------------------------------------------------------
def test_job_dirname_is_readable_unique_and_filesystem_safe() -> None:
    assert job_dirname(0, "model=simple_net,optimizer.lr=0.1") == "0_model=simple_net,optimizer.lr=0.1"
    assert job_dirname(7, "") == "7"
    # Optuna's long floats are cut to 4 significant digits; a path or spaces cannot make subdirs.
    assert job_dirname(2, "model.hidden_sizes=[256,128],optimizer.lr=0.01683454924600351") == (
        "2_model.hidden_sizes=[256,128],optimizer.lr=0.01683"
    )
    name = job_dirname(3, "data.root=/tmp/x y:z,tag='a b'")
    assert name == "3_data.root=_tmp_x_y_z,tag=_a_b"
    assert "/" not in job_dirname(4, "a=" + "/x" * 300) and len(job_dirname(4, "a=" + "x" * 300)) == 2 + 200


# -- the summary of a sweep dir ---------------------------------------------------------------
def _job(sweep: Path, name: str, overrides: list[str], record: dict | None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if record is not None:
        runs.write_run_record(job, {"overrides": overrides, "output_dir": str(job), **record})
    return job


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    """A sweep of 4 jobs as launchers leave it: 2 ok, 1 failed, 1 killed (no run.json)."""
    sweep = tmp_path / "multiruns" / "2026-01-01" / "00-00-00_abcdef"
    _job(
        sweep,
        "0_lr=0.1",
        ["trainer=cpu", "lr=0.1"],
        {
            "status": "ok",
            "error": None,
            "epochs": 3,
            "wall_s": 4.25,
            "metrics": {"val/acc_best": 0.91, "test/acc": 0.9, "test/loss": 0.3},
        },
    )
    _job(
        sweep,
        "1_lr=-1",
        ["trainer=cpu", "lr=-1"],
        {"status": "failed", "error": "lr=-1 is invalid; allowed: > 0", "epochs": None, "wall_s": 0.01, "metrics": {}},
    )
    _job(sweep, "2_lr=0.5", ["trainer=cpu", "lr=0.5"], None)
    # Job 10 sorts after job 2 (numeric order, not by name).
    _job(
        sweep,
        "10_lr=0.2",
        ["trainer=cpu", "lr=0.2"],
        {
            "status": "ok",
            "error": None,
            "epochs": 3,
            "wall_s": 5.0,
            "metrics": {"val/acc_best": 0.95, "test/acc": 0.93, "test/loss": 0.2},
        },
    )
    (sweep / ".submitit" / "123").mkdir(parents=True)  # launcher files are not jobs
    (sweep / "multirun.yaml").write_text("{}\n")
    return sweep


def test_summary_has_one_row_per_job_and_names_the_best(sweep_dir: Path) -> None:
    summary = write_summary(sweep_dir, metric="val/acc_best")
    assert [r.job for r in summary.rows] == ["0_lr=0.1", "1_lr=-1", "2_lr=0.5", "10_lr=0.2"]
    assert summary.common == ["trainer=cpu"] and [r.label for r in summary.rows] == [
        "lr=0.1",
        "lr=-1",
        "lr=0.5",
        "lr=0.2",
    ]
    assert summary.best().job == "10_lr=0.2" and [r.job for r in summary.failed] == ["1_lr=-1", "2_lr=0.5"]

    rows = _csv_rows(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0_lr=0.1", "ok"),
        ("1_lr=-1", "failed"),
        ("2_lr=0.5", "unknown"),
        ("10_lr=0.2", "ok"),
    ]
    assert list(rows[0]) == [
        "job",
        "status",
        "error",
        "val/acc_best",
        "test/acc",
        "epochs",
        "wall_s",
        "overrides",
        "output_dir",
    ]
    assert rows[0]["val/acc_best"] == "0.910000" and rows[0]["test/acc"] == "0.900000" and rows[0]["epochs"] == "3"
    assert rows[0]["wall_s"] == "4.250" and rows[0]["overrides"] == "trainer=cpu lr=0.1"
    assert rows[0]["output_dir"] == str(sweep_dir / "0_lr=0.1")
    assert rows[1]["error"] == "lr=-1 is invalid; allowed: > 0" and rows[1]["val/acc_best"] == ""
    # A killed job (no run.json) is a row too, with the overrides Hydra saved.
    assert rows[2]["error"] == NO_RECORD and rows[2]["overrides"] == "trainer=cpu lr=0.5"

    md = (sweep_dir / "summary.md").read_text()
    assert "4 jobs, 2 ok, 2 failed; metric: `val/acc_best`." in md and "Every job: `trainer=cpu`." in md
    assert "| 10 | `lr=0.2` | **ok** (best) | 0.9500 | 0.9300 | 3 | 5.0 |  | 10_lr=0.2 |" in md
    assert "| 1 | `lr=-1` | failed |  |  |  | 0.0 | lr=-1 is invalid; allowed: > 0 | 1_lr=-1 |" in md
    assert f"| 2 | `lr=0.5` | unknown |  |  |  |  | {NO_RECORD} | 2_lr=0.5 |" in md
    assert "Best by `val/acc_best`: `lr=0.2`, val/acc_best=0.9500 (dir `10_lr=0.2`)." in md

    image = imread(sweep_dir / "summary.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 400

    # Another metric: a loss is minimised and gets its own column.
    loss = collect(sweep_dir, metric="test/loss")
    assert loss.metrics == ["val/acc_best", "test/acc", "test/loss"] and loss.best().job == "10_lr=0.2"


def test_callback_prints_the_table_and_exits_1_if_a_job_failed(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    with pytest.raises(SystemExit) as exit_info:
        SweepSummary(metric="test/acc").on_multirun_end(config=config)
    assert exit_info.value.code == EXIT_JOBS_FAILED
    out, err = capsys.readouterr()
    assert "| 10 | `lr=0.2` | **ok** (best) | 0.9500 | 0.9300 | 3 | 5.0 |" in out and "metric: `test/acc`" in out
    assert err == "2 of 4 jobs failed (see the table above)\n"
    assert {p.name for p in sweep_dir.glob("summary.*")} == {"summary.csv", "summary.md", "summary.png"}

    # `python -m mlplab.sweeps DIR` rewrites it; once every job is ok, exit 0.
    for name in ("1_lr=-1", "2_lr=0.5"):
        runs.write_run_record(sweep_dir / name, {"status": "ok", "metrics": {"val/acc_best": 0.5}, "overrides": [name]})
    assert main([str(sweep_dir)]) == 0
    assert [r["status"] for r in _csv_rows(sweep_dir)] == ["ok"] * 4
    SweepSummary().on_multirun_end(config=config)  # no SystemExit
    assert main([str(sweep_dir / "missing")]) == 2


def test_jobs_that_differ_only_in_seed_are_reported_over_seeds(tmp_path: Path) -> None:
    """n, mean ± std and the 95 % interval (Student's t) per setting, in summary.md, summary_seeds.csv
    and as error bars in summary.png; a failed seed is counted apart, never averaged in."""
    sweep = tmp_path / "sweep"
    acc = {"relu": [0.96, 0.97, 0.95], "sigmoid": [0.90, 0.94, 0.92]}
    num = 0
    for act, values in acc.items():
        for seed, value in enumerate(values, 1):
            overrides = ["data=moons", f"model.activation={act}", f"seed={seed}"]
            metrics = {"val/acc_best": value, "test/acc": value - 0.01}
            _job(sweep, f"{num}_{act}_{seed}", overrides, {"status": "ok", "metrics": metrics, "epochs": 3})
            num += 1
    _job(sweep, f"{num}_sigmoid_4", ["data=moons", "model.activation=sigmoid", "seed=4"], {"status": "failed"})

    summary = write_summary(sweep)
    settings = summary.settings()
    assert [(s.label, len(s.rows), s.failed) for s in settings] == [
        ("model.activation=relu", 3, 0),
        ("model.activation=sigmoid", 4, 1),
    ]
    relu = settings[0].stats["val/acc_best"]
    t_975_2 = 4.302652729911275  # Student's t, 2 degrees of freedom, 97.5 % quantile
    assert relu.n == 3 and relu.mean == pytest.approx(0.96) and relu.std == pytest.approx(0.01)
    assert relu.ci95 == pytest.approx((0.96 - t_975_2 * 0.01 / math.sqrt(3), 0.96 + t_975_2 * 0.01 / math.sqrt(3)))
    sigmoid = settings[1].stats["test/acc"]
    assert sigmoid.n == 3 and sigmoid.mean == pytest.approx(0.91) and sigmoid.std == pytest.approx(0.02)

    md = (sweep / "summary.md").read_text()
    assert "## Over seeds" in md
    assert "| `model.activation=relu` | 3 | 0.9600 ± 0.0100 | [0.9352, 0.9848] | 0.9500 ± 0.0100 |" in md
    assert "| `model.activation=sigmoid` | 3 (1 failed) | 0.9200 ± 0.0200 | [0.8703, 0.9697] |" in md

    with (sweep / "summary_seeds.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["jobs"], r["failed"], r["val/acc_best n"]) for r in rows] == [
        ("model.activation=relu", "3", "0", "3"),
        ("model.activation=sigmoid", "4", "1", "3"),
    ]
    assert rows[0]["val/acc_best mean"] == "0.960000" and rows[0]["val/acc_best ci95_low"] == "0.935159"
    assert rows[1]["job_dirs"] == "3_sigmoid_1 4_sigmoid_2 5_sigmoid_3 6_sigmoid_4"
    image = imread(sweep / "summary.png")
    assert image.ndim == 3 and image.shape[1] > 400

    # A record whose overrides are not a list of strings (a tampered file) falls back to
    # Hydra's saved overrides instead of being read character by character.
    record = json.loads((sweep / "0_relu_1" / "run.json").read_text())
    runs.write_run_record(sweep / "0_relu_1", {**record, "overrides": "seed=1"})
    assert collect(sweep).rows[0].overrides == ["data=moons", "model.activation=relu", "seed=1"]

    # A sweep without repeated seeds has no table over seeds and no seeds file.
    plain = tmp_path / "plain"
    for i, lr in enumerate((0.1, 0.2)):
        _job(plain, f"{i}_lr", [f"lr={lr}", "seed=1"], {"status": "ok", "metrics": {"val/acc_best": 0.9}})
    assert write_summary(plain).settings() == [] and not (plain / "summary_seeds.csv").exists()
    assert "Over seeds" not in (plain / "summary.md").read_text()


# -- launchers: configs -----------------------------------------------------------------------
def test_launcher_and_search_configs_compose(tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        slurm = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.timeout_min=30",
            ],
            return_hydra_config=True,
        )
        joblib = compose(
            "train", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"], return_hydra_config=True
        )
        optuna = compose("train", overrides=["hparams_search=digits_optuna"], return_hydra_config=True)
        other = compose("train", overrides=["hydra.callbacks.sweep_summary.metric=test/loss"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 30)
    assert launcher.tasks_per_node == 1 and launcher.nodes == 1
    assert launcher.submitit_folder == f"{slurm.hydra.sweep.dir}/.submitit/%j"
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher") and joblib.hydra.launcher.n_jobs == 3
    sweeper = optuna.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.momentum", "model.hidden_sizes", "data.batch_size"}
    assert optuna.optimized_metric == "val/acc_best" and optuna.model._target_ == "mlplab.models.MLP"
    # The summary callback is on for every run and compares the optimized metric.
    assert optuna.hydra.callbacks.sweep_summary._target_ == "mlplab.sweeps.SweepSummary"
    assert optuna.hydra.callbacks.sweep_summary.metric == "val/acc_best"
    assert other.hydra.callbacks.sweep_summary.metric == "test/loss"
    GlobalHydra.instance().clear()


# -- CLI: real sweeps -------------------------------------------------------------------------
@pytest.mark.slow  # two worker processes (~30 s); slow keeps the default suite near 10 min; CI runs it
def test_joblib_sweep_runs_jobs_in_parallel_into_one_sweep_dir_and_survives_a_failure(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "optimizer.lr=0.05,-1",
            *CLI_QUICK,
            f"paths.log_dir={log_dir}",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    # A failed job: the sweep goes on, is summarised, and exits 1.
    _check(proc, EXIT_JOBS_FAILED)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: optimizer.lr=-1 is invalid; allowed: a finite number > 0" in proc.stderr
    assert proc.stderr.rstrip().endswith("1 of 2 jobs failed (see the table above)")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout

    # One sweep dir for all jobs, although each ran in a worker process of its own.
    sweep = _only_sweep_dir(log_dir)
    records = {}
    for row in _csv_rows(sweep):
        record = runs.read_run_record(sweep / row["job"])
        assert row["output_dir"] == record["output_dir"] == str(sweep / row["job"])
        records[row["job"].split("_")[0]] = (row, record)
    assert sorted(records) == ["0", "1"]
    (ok, record), (bad, bad_record) = records["0"], records["1"]
    assert "optimizer.lr=0.05" in ok["job"] and "optimizer.lr=-1" in bad["job"]
    assert (ok["status"], bad["status"]) == ("ok", "failed") == (record["status"], bad_record["status"])
    assert bad["error"] == "optimizer.lr=-1 is invalid; allowed: a finite number > 0"
    assert (sweep / bad["job"] / ".hydra" / "config.yaml").is_file(), "the failed job's dir is kept"
    assert float(ok["val/acc_best"]) == pytest.approx(record["metrics"]["val/acc_best"], abs=1e-6)
    assert float(ok["test/acc"]) == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)
    assert 0.3 < record["metrics"]["test/acc"] <= 1 and ok["epochs"] == "1"
    assert (sweep / ok["job"] / "checkpoints" / "last.ckpt").is_file()
    assert f"(dir `{ok['job']}`)" in (sweep / "summary.md").read_text()


@pytest.mark.slow  # a CLI sweep (~20-40 s): slow keeps the default suite near 10 min; CI runs it
def test_fail_fast_stops_the_sweep_at_the_first_failure(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        ["-m", "fail_fast=true", "optimizer.lr=-1,0.05", *CLI_QUICK, f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    _check(proc, 2)
    assert proc.stderr.strip().splitlines()[-1] == "error: optimizer.lr=-1 is invalid; allowed: a finite number > 0"
    sweep = _only_sweep_dir(log_dir)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    # Job 1 never ran; fail_fast is not part of the name.
    assert len(jobs) == 1 and jobs[0].startswith("0_callbacks.progress_bar.refresh_rate=0,optimizer.lr=-1,trainer.")
    assert "fail_fast" not in jobs[0]
    assert runs.read_run_record(sweep / jobs[0])["status"] == "failed"
    assert not (sweep / "summary.csv").exists()  # the sweep stopped; the summary can be written after:
    assert main([str(sweep)]) == EXIT_JOBS_FAILED
    assert [r["status"] for r in _csv_rows(sweep)] == ["failed"]


@pytest.mark.slow  # a CLI sweep (~20-40 s): slow keeps the default suite near 10 min; CI runs it
def test_optuna_search_on_digits(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        ["hparams_search=digits_optuna", "hydra.sweeper.n_trials=3", *CLI_QUICK, f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    _check(proc)  # hydra.mode=MULTIRUN in the preset: no -m needed
    sweep = _only_sweep_dir(log_dir)
    rows = _csv_rows(sweep)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    values = [float(r["val/acc_best"]) for r in rows]
    assert results.best_value == pytest.approx(max(values), abs=1e-6)
    for row in rows:
        # Each trial trained with the sampled values, inside the search space.
        cfg = OmegaConf.load(sweep / row["job"] / ".hydra" / "config.yaml")
        assert 0.003 <= cfg.optimizer.lr <= 0.3 and 0.0 <= cfg.optimizer.momentum <= 0.95
        assert cfg.data.batch_size in (16, 32, 64, 128)
        hidden = list(cfg.model.hidden_sizes)
        assert hidden in ([64], [128], [256, 128], [512, 256], [256, 256, 128])
        state = torch.load(sweep / row["job"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        shapes = [tuple(v.shape) for k, v in state["state_dict"].items() if k.endswith("weight")]
        assert [s[0] for s in shapes] == [*hidden, 10]
        assert f"optimizer.lr={cfg.optimizer.lr}" in row["overrides"]
    best_row = max(rows, key=lambda r: float(r["val/acc_best"]))
    best_cfg = OmegaConf.load(sweep / best_row["job"] / ".hydra" / "config.yaml")
    assert results.best_params["optimizer.lr"] == pytest.approx(best_cfg.optimizer.lr)
    assert results.best_params["data.batch_size"] == best_cfg.data.batch_size


@pytest.mark.slow
def test_submitit_local_executor_runs_the_sweep(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        ["-m", "hydra/launcher=submitit_local", "model=simple_net,relu_mlp", *CLI_QUICK, f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    _check(proc)
    sweep = _only_sweep_dir(log_dir)
    rows = _csv_rows(sweep)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert ["model=simple_net" in rows[0]["job"], "model=relu_mlp" in rows[1]["job"]] == [True, True]
    assert list((sweep / ".submitit").iterdir()), "submitit's own job folders"
    for row in rows:
        assert (
            math.isfinite(float(row["val/acc_best"])) and (sweep / row["job"] / "checkpoints" / "last.ckpt").is_file()
        )

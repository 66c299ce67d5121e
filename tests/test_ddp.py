"""DDP: child ranks of a Hydra job, sweeps of DDP jobs, synced metrics, torchrun multi-node.

The CLI tests are the expensive ones (several processes on 2 cores): a 2-job sweep of
2-rank jobs, and 2 "nodes" x 1 process started by torchrun on 127.0.0.1. Each checks the
output tree (one dir per job, one TensorBoard run, only rank 0 writes) and that a job's
test accuracy equals a 1-process evaluation of its checkpoint on a test set (449 digits)
that divides by neither the ranks nor the eval batch size. A 2-trial Optuna search of
2-rank jobs (slow) checks that a preset setting ``hydra.mode: MULTIRUN`` leaves each
trial one job with one output dir.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from test_cli import CLI_QUICK, _accumulator, _check_ok, _env, _run_dirs, _scalars, _summaries

from conftest import CONF, REPO, compose_cfg, run_cli
from mlplab import distributed
from mlplab.data import DigitsDataModule
from mlplab.distributed import LAUNCH_ENV, child_command, ddp_job, external_rank_argv
from mlplab.engines import evaluate
from mlplab.engines.build import build_datamodule, build_net
from mlplab.errors import ConfigError
from mlplab.runs import RUN_FILE, read_run_record

EVAL_BATCH = 100  # 449 test digits -> batches 100,100,100,100,49: padding would count one twice
RUN_LOCK = ".mlplab.lock"  # rank 0's hold on its run dir (mlplab.rundir), left in place


def _job_files(job_dir: Path) -> list[str]:
    """The names in a job dir, its lock file aside (TensorBoard's event files as one pattern)."""
    names = {
        "events.out.tfevents.*" if p.name.startswith("events.out.tfevents.") else p.name for p in job_dir.iterdir()
    }
    return sorted(names - {RUN_LOCK})


# -- child ranks of one job -------------------------------------------------------------------
def test_child_command_reruns_this_job_only(tmp_path, monkeypatch):
    """A child rank gets the job's own overrides, no -m, and the job's dir as its run dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["trainer=ddp_cpu", "model=simple_net", "optimizer.lr=0.1"], return_hydra_config=True
        )
    job_dir = tmp_path / "sweep dir" / "3"
    with open_dict(cfg):
        cfg.hydra.overrides.hydra = [
            "hydra.mode=MULTIRUN",
            "hydra.sweep.dir=/x/sweep",
            "hydra.job_logging.root.level=INFO",
            "hydra.run.dir=/not/the/job/dir",
        ]
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setenv("MLPLAB_ENTRY", "/repo/src/train.py")
    command, cwd = child_command(global_rank=1)
    assert command[:2] == [sys.executable, "/repo/src/train.py"] and cwd == str(tmp_path)
    assert "-m" not in command and "--multirun" not in command
    parsed = OverridesParser.create().parse_overrides(command[2:])
    assert {o.key_or_group: o.value() for o in parsed} == {
        "trainer": "ddp_cpu",
        "model": "simple_net",
        "optimizer.lr": 0.1,
        "hydra.sweep.dir": "/x/sweep",
        "hydra.job_logging.root.level": "INFO",
        "hydra.mode": "RUN",
        "hydra.run.dir": str(job_dir),  # quoted: the space survives
        "hydra.output_subdir": None,
        "hydra.job.name": "train_rank1",
    }


def test_child_rank_of_a_preset_search_is_a_single_run(tmp_path, monkeypatch):
    """A trial of ``hparams_search=digits_optuna`` (the preset sets ``hydra.mode: MULTIRUN``):
    Hydra's own choice of mode for the child's command line is a run, not a new search."""
    trial = ["optimizer.lr=0.05", "model.hidden_sizes=[64]", "hparams_search=digits_optuna", "trainer=ddp_cpu"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=trial, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.hydra = ["hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'search'}"]
            cfg.hydra.runtime.output_dir = str(tmp_path / "search" / "0")
            cfg.hydra.runtime.cwd = str(tmp_path)
            cfg.hydra.job.name = "train"
        HydraConfig.instance().set_config(cfg)
        monkeypatch.setenv("MLPLAB_ENTRY", "/repo/src/train.py")
        command, _ = child_command(global_rank=1)
        assert command[2:6] == trial  # the trial's sampled values, as they were
        hydra = GlobalHydra.instance().hydra
        assert hydra.get_mode(config_name="train", overrides=trial) == RunMode.MULTIRUN  # the preset's
        assert hydra.get_mode(config_name="train", overrides=command[2:]) == RunMode.RUN
        child = compose("train", overrides=command[2:], return_hydra_config=True)
    assert child.optimizer.lr == 0.05 and list(child.model.hidden_sizes) == [64]
    assert child.hydra.run.dir == str(tmp_path / "search" / "0") and child.hydra.output_subdir is None


def test_ddp_job_leaves_no_distributed_state_behind(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # the user's own value survives
    threads = torch.get_num_threads()
    with ddp_job():
        # what Lightning's launcher leaves in the launching process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", NODE_RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        done = subprocess.Popen([sys.executable, "-c", "pass"])
        distributed._job.procs.append(done)
    assert not dist.is_initialized()
    assert {k: os.environ.get(k) for k in LAUNCH_ENV} == {
        k: ("10.1.2.3" if k == "MASTER_ADDR" else None) for k in LAUNCH_ENV
    }
    assert torch.get_num_threads() == threads
    assert done.returncode == 0  # waited for

    # A failed job does not wait for its child ranks (they may be stuck in a collective).
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        with ddp_job():
            stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            distributed._job.procs.append(stuck)
            raise RuntimeError("boom")
    assert stuck.returncode is not None and time.monotonic() - start < 30


@pytest.mark.parametrize("rank0_fails_in_time", [True, False])
def test_a_failed_child_rank_stops_the_job(monkeypatch, rank0_fails_in_time):
    """A child rank exits non-zero: the other children are stopped at once; rank 0 is killed
    only if its job has not ended within the grace period (else the sweep goes on)."""
    monkeypatch.setattr(distributed, "CHILD_FAILURE_GRACE_S", 2.0)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    job = distributed._JobRanks()
    job.procs = [subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]), subprocess.Popen(sleeper)]
    rank0 = subprocess.Popen(sleeper)  # stands in for this process (os.kill target)
    observer = distributed._ChildObserver(job, rank0.pid)
    observer.start()
    job.procs[1].wait(timeout=20)  # the healthy child was stopped
    assert job.procs[0].returncode == 3 and job.procs[1].returncode != 0
    if rank0_fails_in_time:
        job.over.set()  # rank 0's job ended (failed) on its own
    observer.join(timeout=20)
    assert not observer.is_alive()
    if rank0_fails_in_time:
        assert rank0.poll() is None
        rank0.kill()
    assert rank0.wait(timeout=20) == -9  # SIGKILL: by the observer, or by the test's cleanup


TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE")


def test_torchrun_and_srun_ranks_share_the_job_dir(monkeypatch):
    slurm = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_JOB_NAME")
    for key in (*TORCHRUN_ENV, *slurm):
        monkeypatch.delenv(key, raising=False)
    argv = ["/repo/src/train.py", "trainer=ddp", "hydra.run.dir=/shared/run"]
    assert external_rank_argv(argv) == argv  # a plain run: untouched

    monkeypatch.setenv("SLURM_NTASKS", "4")  # srun, 2 nodes x 2 tasks
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert external_rank_argv(argv) == argv  # rank 0 writes .hydra/ and train.log
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert external_rank_argv(argv) == [*argv, "hydra.output_subdir=null", "hydra.job.name=train_rank2"]
    with pytest.raises(
        ConfigError, match=r"hydra.run.dir is unset but torchrun/srun starts 4 ranks; allowed: hydra.run.dir=PATH"
    ):
        external_rank_argv(["/repo/src/train.py", "trainer=ddp"])
    with pytest.raises(ConfigError, match=r"-m \(multirun\) is invalid when torchrun/srun starts 4 ranks"):
        external_rank_argv(["/repo/src/eval.py", "-m", "hydra.run.dir=/x", "seed=1,2"])
    for key in slurm:
        monkeypatch.delenv(key)

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun, 2 nodes x 1 process
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    eval_argv = ["/repo/src/eval.py", "ckpt_path=x.ckpt", "hydra.run.dir=/shared/eval"]
    assert external_rank_argv(eval_argv) == [*eval_argv, "hydra.output_subdir=null", "hydra.job.name=eval_rank1"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to share
    assert external_rank_argv(["/repo/src/train.py"]) == ["/repo/src/train.py"]


# -- helpers for the CLI runs -----------------------------------------------------------------
def _one_rank_test(ckpt: Path, tmp_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Test metrics of ``ckpt`` from eval.py's evaluate() on 1 process, and computed by hand."""
    cfg = compose_cfg(
        [f'ckpt_path="{ckpt}"', "trainer=cpu", "logger=none", "trainer.enable_model_summary=false"], tmp_path, "eval"
    )
    evaluated = evaluate(cfg)
    stored = OmegaConf.create(torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"])
    dm = build_datamodule(stored.data)
    dm.setup()
    net = build_net(stored.model, dm)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    x, y = dm.data_test.tensors
    with torch.no_grad():
        logits = net.eval()(x)
    correct = logits.argmax(1) == y
    assert len(y) == 449
    # The setup can see the padding bug: the first eval batch counted twice gives another value.
    padded = torch.cat([correct, correct[:EVAL_BATCH]]).float().mean().item()
    assert padded != pytest.approx(correct.float().mean().item(), abs=1e-6)
    return evaluated, {
        "test/acc": correct.float().mean().item(),
        "test/loss": torch.nn.functional.cross_entropy(
            logits,
            y,
            label_smoothing=float(stored.loss.get("label_smoothing", 0.0)),  # the recipe's, on digits
        ).item(),
    }


def _check_job_dir(job_dir: Path, printed_acc: float, tmp_path: Path, rank_logs: list[str]) -> None:
    """One 2-rank job's dir: rank 0's files only, one TensorBoard run, synced metrics."""
    assert _job_files(job_dir) == sorted(
        [
            ".hydra",
            "checkpoints",
            "config_tree.log",
            "events.out.tfevents.*",
            "hparams.yaml",
            "train.log",
            RUN_FILE,
            *rank_logs,
        ]
    )
    assert len(list((job_dir / "checkpoints").glob("*.ckpt"))) == 2  # best + last
    ea = _accumulator(job_dir)
    scalars = _scalars(ea)
    assert len(scalars["test/acc"]) == 1 and len(scalars["val/acc"]) == 1
    tb_acc, tb_loss = scalars["test/acc"][0][1], scalars["test/loss"][0][1]
    assert f"{tb_acc:.4f}" == f"{printed_acc:.4f}"
    record = read_run_record(job_dir)  # rank 0's record of the job
    assert record["status"] == "ok" and record["epochs"] == 1
    assert record["metrics"]["test/acc"] == pytest.approx(tb_acc, abs=1e-7)
    # data.batch_size is per rank: 2 ranks take ceil(ceil(1213 / 2) / 32) = 19 steps per epoch.
    dm = DigitsDataModule()
    dm.setup()
    assert [s for s, _ in scalars["val/acc"]] == [math.ceil(math.ceil(len(dm.data_train) / 2) / dm.batch_size) - 1]
    # Synced test metrics over every test sample exactly once = a 1-process evaluation
    # = the per-sample values computed by hand (the loss: up to float summation order).
    [best] = list((job_dir / "checkpoints").glob("epoch_*.ckpt"))
    evaluated, by_hand = _one_rank_test(best, tmp_path / f"eval-{job_dir.name}")
    for tag, tb_value, tol in (("test/acc", tb_acc, 1e-7), ("test/loss", tb_loss, 1e-5)):
        assert tb_value == pytest.approx(evaluated[tag], rel=tol), tag
        assert evaluated[tag] == pytest.approx(by_hand[tag], rel=tol), tag


# -- a sweep of DDP jobs ----------------------------------------------------------------------
@pytest.mark.slow  # over ~15 s: the default suite stays under 10 minutes
def test_multirun_of_ddp_jobs(tmp_path):
    """``-m trainer=ddp_cpu model=a,b``: two jobs, two ranks each, one dir and one TB run per job."""
    log_dir = tmp_path / "logs"
    models = {"simple_net": "mlplab.models.SimpleNet", "relu_mlp": "mlplab.models.MLP"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / "train.py"),
            "-m",
            "trainer=ddp_cpu",
            f"model={','.join(models)}",
            "trainer.max_epochs=1",
            f"data.eval_batch_size={EVAL_BATCH}",
            *CLI_QUICK[1:],
            f"paths.log_dir={log_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **_env(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    _check_ok(proc)
    # One sweep, launched once (a child rank re-running the sweep would print this again).
    assert proc.stdout.count("Launching 2 jobs locally") == 1
    [sweep] = list((log_dir / "multiruns").glob("*/*"))
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: p.name)
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]  # <job number>_<its overrides>
    assert "model=simple_net" in jobs[0].name and "model=relu_mlp" in jobs[1].name
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == [
        "multirun.yaml",
        "summary.csv",
        "summary.md",
        "summary.png",
    ]
    # The only job dirs anywhere are the two jobs' (no logs/runs/, no nested sweep).
    assert _run_dirs(tmp_path) == jobs
    assert not (log_dir / "runs").exists() and [p.name for p in log_dir.iterdir()] == ["multiruns"]
    summaries = _summaries(proc.stdout)
    assert [d for _, d in summaries] == jobs  # rank 0 of each job reports
    # The sweep summary has both DDP jobs, ok, with the test/acc rank 0 printed.
    assert "2 jobs, 2 ok, 0 failed" in proc.stdout
    rows = {
        line.rsplit("|", 2)[-2].strip(): line
        for line in (sweep / "summary.md").read_text().splitlines()
        if line.startswith("| ")
    }
    for (printed_acc, _), job in zip(summaries, jobs):
        assert f" | {printed_acc:.4f} | 1 | " in rows[job.name]  # test/acc, epochs
    for (printed_acc, job_dir), (model, target) in zip(summaries, models.items()):
        assert f"model={model}" in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        stored = torch.load(job_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert stored["hyper_parameters"]["config"]["model"]["_target_"] == target
        _check_job_dir(job_dir, printed_acc, tmp_path, ["train_rank1.log"])


@pytest.mark.slow  # an Optuna search of two 2-rank trials on 2 cores (~30-60 s)
def test_optuna_search_of_ddp_jobs(tmp_path):
    """``hparams_search=digits_optuna trainer=ddp_cpu``: the preset sets ``hydra.mode: MULTIRUN``;
    a trial's child rank is still one more rank of that trial, not a sweep of its own."""
    log_dir = tmp_path / "logs"
    sweep = log_dir / "search"
    args = [
        "hparams_search=digits_optuna",
        "trainer=ddp_cpu",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=1",
        *CLI_QUICK[1:],
        f"paths.log_dir={log_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli("train", args, cwd=tmp_path, env=_env(tmp_path), timeout=240)
    _check_ok(proc)
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: p.name)
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    # The only job dirs and the only sweep anywhere are the search's own.
    assert _run_dirs(tmp_path) == jobs
    assert [p.name for p in log_dir.iterdir()] == ["search"]
    assert "optimization_results.yaml" in {p.name for p in sweep.iterdir()}
    for job in jobs:
        assert read_run_record(job)["status"] == "ok"
        # rank 1 of the trial wrote only its log, into the trial's dir
        expected = [
            ".hydra",
            "checkpoints",
            "config_tree.log",
            "events.out.tfevents.*",
            "hparams.yaml",
            "train.log",
            RUN_FILE,
        ]
        expected.append("train_rank1.log")
        assert _job_files(job) == sorted(expected)
    assert [d for _, d in _summaries(proc.stdout)] == jobs  # rank 0 of each trial reports
    summary = (sweep / "summary.md").read_text()
    assert "2 jobs, 2 ok, 0 failed" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert sorted(line.rsplit("|", 2)[-2].strip() for line in rows) == [j.name for j in jobs]
    assert all(" | ok | " in line or " | **ok** (best) | " in line for line in rows)


# -- multi-node: 2 nodes x 1 process with torchrun on this machine -----------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over ~15 s: the default suite stays under 10 minutes
def test_torchrun_two_nodes_one_process_each(tmp_path):
    log_dir, run_dir = tmp_path / "logs", tmp_path / "logs" / "runs" / "two-nodes"
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **_env(tmp_path)}
    env.pop("LOCAL_RANK", None)
    procs = []
    for node_rank in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node_rank}",
            "--master-addr=127.0.0.1", f"--master-port={port}",
            str(REPO / "src" / "train.py"),
            "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=1",
            f"data.eval_batch_size={EVAL_BATCH}", *CLI_QUICK[1:],
            f"paths.log_dir={log_dir}", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        out, err = (tmp_path / f"out{node_rank}.txt").open("w"), (tmp_path / f"err{node_rank}.txt").open("w")
        procs.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err), out, err))
    for node_rank, (proc, out, err) in enumerate(procs):
        rc = proc.wait(timeout=600)
        out.close(), err.close()
        stderr = (tmp_path / f"err{node_rank}.txt").read_text()
        assert rc == 0, f"node {node_rank} exit {rc}\n{stderr[-3000:]}"
    stdouts = [(tmp_path / f"out{i}.txt").read_text() for i in range(2)]
    assert "Starting with 2 processes" in (tmp_path / "err0.txt").read_text()
    # One set of logs: rank 0 writes the job dir; rank 1 only its log file, in the same dir.
    assert _run_dirs(tmp_path) == [run_dir]
    assert sorted(p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*") if p.is_dir()) == [
        "runs", "runs/two-nodes", "runs/two-nodes/.hydra", "runs/two-nodes/checkpoints",
    ]  # fmt: skip
    [(printed_acc, printed_dir)] = _summaries(stdouts[0])
    assert printed_dir == run_dir and _summaries(stdouts[1]) == []
    _check_job_dir(run_dir, printed_acc, tmp_path, ["train_rank1.log"])

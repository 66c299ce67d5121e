"""Nothing lost, nothing silently wrong: interrupt and resume, determinism, divergence.

The resume tests interrupt a run -- SIGTERM and SIGINT mid-epoch (default suite), ``kill -9``
between epochs (slow) -- resume it with ``resume=<run dir>`` and compare the end result
with an uninterrupted run: weights, optimizer state, best checkpoint and every
TensorBoard scalar must be bit-identical (CPU, fixed seed, dropout on so that the RNG
state matters too). The signals come from the test-only callback in ``send_signal.py``.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK, REPO, assert_same_nested, compose_cfg, load_ckpt, run_cli
from mlplab import runs
from mlplab.cli import EXIT_USER_ERROR, CheckOutputDir, expand_resume, run_job
from mlplab.data import BatchSliceSampler, DigitsDataModule, split_indices
from mlplab.engines import fit, train
from mlplab.errors import CheckpointError, ConfigError, DivergenceError, RunInterrupted
from mlplab.models import Classifier

EPOCHS = 2
# Dropout makes the result depend on the global RNG state as well as on the data order.
TRAIN_ARGS = [
    "trainer=cpu",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar.refresh_rate=0",
    "model.dropout=0.2",
    # fused steps, 4 a call: the signals below land in epoch 1 before step 50, where the
    # gradient norms are logged (an interrupted epoch's logged points stay in TensorBoard)
    "steps_per_call=4",
]


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    # In the order written: a run's test stage writes a second event file (Lightning reopens
    # its writer), and EventAccumulator reads files by name, where uid 10 sorts before 9.
    return {
        tag: [(e.step, e.value) for e in sorted(ea.Scalars(tag), key=lambda e: e.wall_time)]
        for tag in ea.Tags()["scalars"]
    }


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _reference(tmp_path: Path) -> Path:
    ref_dir = tmp_path / "reference"
    train(compose_cfg([*TRAIN_ARGS], ref_dir))
    return ref_dir


def _assert_same_as_reference(run_dir: Path, ref_dir: Path) -> None:
    """Weights, optimizer and schedule state, best checkpoint and every scalar, bit for bit."""
    got, want = load_ckpt(run_dir / "checkpoints" / "last.ckpt"), load_ckpt(ref_dir / "checkpoints" / "last.ckpt")
    assert want["epoch"] == EPOCHS - 1 and got["global_step"] == want["global_step"]
    assert_same_nested(got["state_dict"], want["state_dict"], "state_dict")
    assert_same_nested(got["optimizer_states"], want["optimizer_states"], "optimizer_states")
    assert_same_nested(got["lr_schedulers"], want["lr_schedulers"], "lr_schedulers")
    # val/acc_best is part of the state, so the resumed run kept its best value.
    assert "val_acc_best.max_value" in got["state_dict"]
    [best] = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    [ref_best] = (ref_dir / "checkpoints").glob("epoch_*.ckpt")
    assert best.name == ref_best.name
    assert_same_nested(load_ckpt(best)["state_dict"], load_ckpt(ref_best)["state_dict"], "best")
    # One TensorBoard run, continued: every scalar at every step equals the reference.
    scalars, ref_scalars = _scalars(run_dir), _scalars(ref_dir)
    assert {"train/loss", "val/acc", "val/acc_best", "test/acc"} <= set(ref_scalars)
    for tag, values in ref_scalars.items():
        assert scalars[tag] == values, tag
    assert len(scalars["val/acc"]) == EPOCHS
    # The Custom Scalars layout was written when the run started, not again by the resumed one.
    ea = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    ea.Reload()
    assert len(ea.Tensors("custom_scalars__config__")) == 1
    assert not list(run_dir.rglob("*.partial"))


def _cli_env(tmp_path: Path, signal_at: str | None) -> dict[str, str]:
    env = {
        "MLPLAB_ROOT": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    return {**env, "MLPLAB_TEST_SIGNAL": signal_at} if signal_at else env


def _start_cli_run(tmp_path: Path, signal_at: str):
    """``train.py`` with the SendSignal test callback; returns (log_dir, run_dir)."""
    log_dir = tmp_path / "logs"
    run_dir = log_dir / "runs" / "interrupted"
    args = [*TRAIN_ARGS, f"paths.log_dir={log_dir}", f"hydra.run.dir={run_dir}", SEND_SIGNAL]
    proc = run_cli("train", args, cwd=tmp_path, env=_cli_env(tmp_path, signal_at), timeout=300)
    return log_dir, run_dir, proc


SEND_SIGNAL = "+callbacks.send_signal._target_=send_signal.SendSignal"


def _last_epoch(run_dir: Path) -> int:
    return load_ckpt(run_dir / "checkpoints" / "last.ckpt")["epoch"]


def test_sigterm_then_sigint_then_resume_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    """CLI run stopped by SIGTERM in epoch 1; resumed (in-process), stopped by Ctrl+C in epoch 1 again; resumed to the end."""
    # 1. SIGTERM in the middle of epoch 1: exit 143, one line, last.ckpt holds epoch 0.
    log_dir, run_dir, proc = _start_cli_run(tmp_path, "SIGTERM:1:1")
    assert proc.returncode == 143, proc.stderr[-3000:]
    line = _last_line(proc.stderr)
    assert line.startswith("interrupted: stopped by SIGTERM in epoch 1"), line
    assert f"{run_dir / 'checkpoints' / 'last.ckpt'} holds epoch 0" in line and f"resume={run_dir}" in line
    assert "Traceback" not in proc.stderr
    assert _last_epoch(run_dir) == 0
    record = runs.read_run_record(run_dir)
    assert record["status"] == "interrupted" and "stopped by SIGTERM" in record["error"]

    # What `python src/train.py resume=<run_dir>` composes (its own test covers the argv).
    stored = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    resume_cfg = lambda: compose_cfg([*stored, f"resume={run_dir}"], run_dir)  # noqa: E731

    # 2. Resumed, then Ctrl+C (SIGINT) later in the redone epoch 1.
    monkeypatch.setenv("MLPLAB_TEST_SIGNAL", "SIGINT:1:2")
    with pytest.raises(RunInterrupted) as info:
        train(resume_cfg())
    assert info.value.signal_name == "SIGINT" and "stopped by SIGINT in epoch 1" in str(info.value)
    assert "holds epoch 0" in str(info.value)
    assert _last_epoch(run_dir) == 0

    # 3. Resumed to the end, in the same dir and TensorBoard run.
    monkeypatch.delenv("MLPLAB_TEST_SIGNAL")
    train(resume_cfg())
    assert sorted(p.parent for p in log_dir.rglob(".hydra")) == [run_dir]
    _assert_same_as_reference(run_dir, _reference(tmp_path))


def test_interrupted_message_survives_an_unreadable_last_ckpt(tmp_path: Path) -> None:
    """The one-line interruption message reads last.ckpt's epoch; a damaged file is named, not a traceback."""
    from types import SimpleNamespace

    from mlplab.engines.lightning import _interrupted

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    trainer = SimpleNamespace(current_epoch=3)
    torch.save({"epoch": 2, "state_dict": {}}, ckpts / "last.ckpt")
    err = _interrupted(cfg, trainer, "SIGTERM")
    assert str(err).startswith("stopped by SIGTERM in epoch 3: ") and "holds epoch 2, the last completed one" in str(
        err
    )
    (ckpts / "last.ckpt").write_bytes(b"half a checkpoint")
    err = _interrupted(cfg, trainer, "SIGINT")
    assert err.signal_name == "SIGINT"
    assert f"{ckpts / 'last.ckpt'} cannot be read as a checkpoint (kept as it is)" in str(err)
    assert (ckpts / "last.ckpt").read_bytes() == b"half a checkpoint"
    (ckpts / "last.ckpt").unlink()
    assert "no epoch had completed (no last.ckpt)" in str(_interrupted(cfg, trainer, "SIGTERM"))


@pytest.mark.slow
def test_cli_kill_9_between_epochs_then_cli_resume_is_bit_identical(tmp_path: Path) -> None:
    log_dir, run_dir, proc = _start_cli_run(tmp_path, "SIGKILL:1:-1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _last_epoch(run_dir) == 0
    overrides_before = (run_dir / ".hydra" / "overrides.yaml").read_text()

    # The test callback is a _target_ override: resume= applies it only when repeated (mlplab.trust).
    proc = run_cli("train", [f"resume={run_dir}", SEND_SIGNAL], cwd=tmp_path, env=_cli_env(tmp_path, None), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].endswith(f"(output: {run_dir})")
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in proc.stderr
    # The same run dir: no other run dir, .hydra/ untouched.
    assert sorted(p.parent for p in log_dir.rglob(".hydra")) == [run_dir]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides_before
    _assert_same_as_reference(run_dir, _reference(tmp_path))


def test_resume_argv_is_the_runs_overrides_in_its_dir(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(["data=mnist", "ckpt_path=/x.ckpt", "optimizer.lr=0.1"]), run_dir / ".hydra" / "overrides.yaml"
    )
    argv = expand_resume(["train.py", f"resume={run_dir}", "trainer.max_epochs=20"])
    assert argv == [
        "train.py",
        "data=mnist",
        "optimizer.lr=0.1",
        "trainer.max_epochs=20",
        f"resume={run_dir}",
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=null",
    ]
    assert expand_resume(["train.py", "seed=1"]) == ["train.py", "seed=1"]

    for args, part in (
        ([f"resume={tmp_path / 'nope'}"], "is not a run dir"),
        (["-m", f"resume={run_dir}"], "--multirun"),
    ):
        with pytest.raises(SystemExit) as info:
            expand_resume(["train.py", *args])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: resume=") and part in err and "\n" not in err


def test_resume_without_last_checkpoint_starts_over_in_the_same_dir(tmp_path: Path) -> None:
    """Stopped before the first epoch ended: resuming is a fresh start, as good as uninterrupted."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("{}")
    args = [*QUICK, "logger=none", "test=false"]
    resumed = train(compose_cfg([*args, f"resume={run_dir}"], run_dir))
    fresh = train(compose_cfg(args, tmp_path / "fresh"))
    assert resumed == fresh
    assert_same_nested(
        load_ckpt(run_dir / "checkpoints" / "last.ckpt")["state_dict"],
        load_ckpt(tmp_path / "fresh" / "checkpoints" / "last.ckpt")["state_dict"],
        "state_dict",
    )
    # resume= names the run dir it runs in; anything else is refused before training.
    with pytest.raises(ConfigError, match="resume=.* but this run writes to"):
        train(compose_cfg([*args, f"resume={run_dir}"], tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="is not a run dir"):
        train(compose_cfg([*args, f"resume={tmp_path}"], tmp_path))


# -- divergence ---------------------------------------------------------------------------------


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A non-finite loss in epoch 1 stops the run before validation; epoch 0's checkpoints stay."""
    dm = DigitsDataModule()
    dm.setup()
    steps_per_epoch = math.ceil(len(dm.data_train) / dm.batch_size)
    bad_batch = 3
    real_step = Classifier.training_step

    def poisoned(self, batch, batch_idx):
        # Minibatch bad_batch of epoch 1 gets infinite pixels (a non-finite loss), wherever
        # it is: a training batch holds steps_per_call minibatches of dm.batch_size.
        if self.current_epoch == 1:
            first = batch_idx * self.steps_per_call * dm.batch_size  # the batch's first position in the epoch
            rows = torch.arange(first, first + len(batch[0])) // dm.batch_size == bad_batch
            rows = rows.view(-1, *[1] * (batch[0].dim() - 1))
            batch = (torch.where(rows, batch[0] * float("inf"), batch[0]), batch[1])
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", poisoned)
    out = tmp_path / "run"
    args = [o for o in QUICK if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=3", "logger=none"]
    with pytest.raises(DivergenceError) as info:
        train(compose_cfg(args, out))
    msg = str(info.value)
    assert f"non-finite loss at step {steps_per_epoch + bad_batch} (epoch 1, lr 0.0375 " in msg, (
        msg
    )  # cosine over 3 epochs
    assert "\n" not in msg
    last = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    for ckpt in (last, load_ckpt(out / "checkpoints" / "epoch_000.ckpt")):
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_huge_learning_rate_fails_the_run_and_the_record_says_so(tmp_path: Path, capsys) -> None:
    """optimizer.lr=1e6 through the entry point's run_job: exit 2, one line, dir kept, run.json failed."""
    out = tmp_path / "logs" / "runs" / "diverged"
    cfg = compose_cfg(QUICK + ["optimizer.lr=1e6"], out)
    cfg.paths.log_dir = str(tmp_path / "logs")
    with pytest.raises(SystemExit) as info:
        run_job(cfg, fit)
    assert info.value.code == EXIT_USER_ERROR
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert re.match(r"error: training diverged: non-finite loss at step \d+ \(epoch 0, lr 1e\+06 ", line), line
    record = runs.read_run_record(out)
    assert record["status"] == "failed" and record["error"] == line.removeprefix("error: ")
    assert not list(out.rglob("*.ckpt"))  # nothing good to keep: it diverged in the first epoch
    assert list(out.glob("events.out.tfevents.*"))  # the run's logs stay, for a look at what happened


# -- never overwrite ---------------------------------------------------------------------------


def test_a_dir_holding_an_earlier_run_is_refused_before_hydra_writes(tmp_path: Path, capsys) -> None:
    earlier = tmp_path / "run"
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / ".hydra" / "config.yaml").write_text("seed: 1\n")
    check = CheckOutputDir()
    for key, hook in (("hydra.run.dir", check.on_run_start), ("hydra.sweep.dir", check.on_multirun_start)):
        cfg = OmegaConf.create(
            {"hydra": {"run": {"dir": str(earlier)}, "sweep": {"dir": str(earlier)}, "output_subdir": ".hydra"}}
        )
        with pytest.raises(SystemExit) as info:
            hook(cfg)
        assert info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}={earlier} already holds an earlier") and "allowed: a new dir" in err, err
    assert (earlier / ".hydra" / "config.yaml").read_text() == "seed: 1\n"
    # resume= and DDP's extra ranks write no .hydra/ (output_subdir null): they may use the dir.
    check.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(earlier)}, "output_subdir": None}}))
    # A new dir is made (and found writable).
    check.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "new")}, "output_subdir": ".hydra"}}))
    assert (tmp_path / "new").is_dir() and not any((tmp_path / "new").iterdir())


# Recorded once (x86_64, torch 2.14): a golden reference, so that another process or machine
# that drew a different split or order fails here.
GOLDEN = {
    "test": [879, 1100, 1133, 553, 798, 1, 1714, 91],
    "val": [150, 302, 731, 105, 195, 1117, 527, 693],
    "epoch1_order": [9, 673, 1045, 120, 1019, 1207, 1003, 412],
}


def test_the_data_split_and_order_are_the_same_in_every_process_and_machine() -> None:
    """torch's CPU generator (mt19937) is platform-independent: these indices are the same everywhere."""
    dm = DigitsDataModule()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (1213, 135, 449)
    test_idx, pool_idx = split_indices(1797, (449, 1348), seed=42)
    train_idx, val_idx = split_indices(1348, (1213, 135), seed=42)
    assert test_idx[:8].tolist() == GOLDEN["test"] and val_idx[:8].tolist() == GOLDEN["val"]
    # ... and these are the DataModule's own rows.
    assert dm.data_test.tensors[1][:8].tolist() == load_digits().target[GOLDEN["test"]].tolist()
    sampler = BatchSliceSampler(dm.data_train, 32, shuffle=True, seed=42)
    sampler.set_epoch(1)
    next(iter(sampler))
    assert dm.data_train.order[:8].tolist() == GOLDEN["epoch1_order"]


# -- a checkpoint of another model or data -----------------------------------------------------


def test_checkpoint_of_another_model_or_data_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    train(compose_cfg(QUICK + ["logger=none", "test=false", "model.hidden_sizes=[32]"], src))
    ckpt = src / "checkpoints" / "last.ckpt"
    for overrides, part in (
        (["model.hidden_sizes=[16]"], "net.layers.1.weight is [32, 64] there, [16, 64] here"),
        (["model=simple_net"], "(the checkpoint has model mlplab.models.MLP on mlplab.data.DigitsDataModule)"),
    ):
        out = tmp_path / overrides[0]
        with pytest.raises(CheckpointError) as info:
            train(compose_cfg(QUICK + ["logger=none", f"ckpt_path={ckpt}", *overrides], out))
        msg = str(info.value)
        assert msg.startswith(f"ckpt_path={ckpt} does not fit this model and data") and part in msg, msg
        assert not (out / "checkpoints").exists()

"""Bad input gets one clear error (naming the key and the value) before any training step."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import QUICK, compose_cfg, run_cli
from mlplab.cli import EXIT_USER_ERROR, CheckOutputDir, run_job
from mlplab.engines import evaluate, fit, train
from mlplab.errors import CheckpointError, ConfigError, DataError, MlplabError
from mlplab.models import Classifier


@pytest.fixture
def no_training(monkeypatch):
    """Any training step taken is a test failure: errors must come before training."""

    def refuse(self, batch, batch_idx):
        raise AssertionError("a training step ran before the error was raised")

    monkeypatch.setattr(Classifier, "training_step", refuse)


def _train_error(overrides: list[str], out: Path) -> MlplabError:
    cfg = compose_cfg(QUICK + ["logger=none", *overrides], out)
    with pytest.raises(MlplabError) as info:
        train(cfg)
    assert not (out / "checkpoints").exists()
    return info.value


def _ckpts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.ckpt"))


# -- through the Python API --------------------------------------------------------------------


DIGITS_POOL = str(1797 - round(0.25 * 1797))  # digits left for train+val by the default test_size 0.25

BAD_VALUES = [
    # split sizes larger than the data
    (["data.val_size=2000"], ["data.val_size=2000", DIGITS_POOL]),
    (["data.train_size=1000", "data.val_size=500"], ["data.train_size=1000", "data.val_size=500", DIGITS_POOL]),
    (["data.test_size=1797"], ["data.test_size=1797"]),
    (["data=mnist", "data.val_size=70000"], ["data.val_size=70000", "60000"]),
    (
        ["data=fashion_mnist", "data.train_size=58000", "data.val_size=5000"],
        ["data.train_size=58000", "data.val_size=5000", "60000"],
    ),
    # fractions outside (0, 1)
    (["data.val_size=1.5"], ["data.val_size=1.5", "(0, 1)"]),
    (["data.val_size=0.0"], ["data.val_size=0.0", "(0, 1)"]),
    (["data.val_size=-0.1"], ["data.val_size=-0.1", "(0, 1)"]),
    (["data.train_size=1.0"], ["data.train_size=1.0", "(0, 1)"]),
    # non-positive batch size / epochs / lr
    (["data.batch_size=0"], ["data.batch_size=0", "positive integer"]),
    (["data.batch_size=-8"], ["data.batch_size=-8", "positive integer"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "positive integer"]),
    (["optimizer.lr=0"], ["optimizer.lr=0", "> 0"]),
    (["optimizer.lr=-1"], ["optimizer.lr=-1", "> 0"]),
    # a string where a number belongs
    (["optimizer.lr=abc"], ["optimizer.lr='abc'", "> 0"]),
    (["trainer.max_epochs=ten"], ["trainer.max_epochs='ten'", "positive integer"]),
    (["data.batch_size=big"], ["data.batch_size='big'", "positive integer"]),
    # optimizer consistency and ranges
    (["optimizer.nesterov=true", "optimizer.momentum=0"], ["optimizer.nesterov=true", "optimizer.momentum"]),
    (["optimizer.momentum=1.5"], ["optimizer.momentum=1.5", "[0, 1.0)"]),
    # model sizes
    (["model.hidden_sizes=[]"], ["model.hidden_sizes=[]", "non-empty"]),
    (["model.hidden_sizes=[64,0]"], ["model.hidden_sizes[1]=0", "positive integer"]),
    (["model=simple_net", "model.hidden_size=-3"], ["model.hidden_size=-3", "positive integer"]),
    (["model.activation=swish"], ["model.activation='swish'", "relu"]),
    # trainer / misc
    (["trainer.devices=0"], ["trainer.devices=0"]),
    (["trainer=ddp_cpu", "trainer.use_distributed_sampler=true"], ["trainer.use_distributed_sampler=true", "false"]),
    (["trainer=ddp_cpu", "trainer.num_nodes=0"], ["trainer.num_nodes=0", "positive integer"]),
    (["optimized_metric=val/accuracy"], ["optimized_metric='val/accuracy'", "val/acc_best"]),
    (["engine=keras"], ["engine='keras'", "lightning", "ignite"]),
    # more ranges and types
    (["model.dropout=1.0"], ["model.dropout=1.0", "[0, 1.0)"]),
    (["model.dropout=-0.2"], ["model.dropout=-0.2", "[0, 1.0)"]),
    (["data.train_size=0.8", "data.val_size=0.5"], ["data.train_size=0.8", "data.val_size=0.5", "train + val <="]),
    (["optimizer.weight_decay=-1"], ["optimizer.weight_decay=-1", ">= 0"]),
    (["optimizer.lr=inf"], ["optimizer.lr=inf", "finite number > 0"]),
    (["trainer.max_epochs=2.5"], ["trainer.max_epochs=2.5", "positive integer"]),
    (["seed=abc"], ["seed='abc'", "an integer"]),
    (["data.split_seed=1.5"], ["data.split_seed=1.5", "an integer"]),
    (["data.eval_batch_size=0"], ["data.eval_batch_size=0", "positive integer"]),
    (["model.hidden_sizes=[64,abc]"], ["model.hidden_sizes[1]='abc'", "positive integer"]),
    (["model.hidden_sizes=64"], ["model.hidden_sizes=64", "non-empty list"]),
    # a key the net or the data does not have (an unknown init, a loss option ...)
    (
        ["model=simple_net", "+model.init=xavier"],
        ["model.init='xavier'", "mlplab.models.SimpleNet has no such option", "allowed keys: hidden_size"],
    ),
    (["+optimizer.betas=[0.9,0.99]"], ["optimizer.betas=", "torch.optim.SGD has no such option", "momentum"]),
    (["+data.loss=focal"], ["data.loss='focal'", "allowed keys: batch_size"]),
    (["loss.label_smoothing=1.0"], ["loss.label_smoothing=1.0 is invalid", "[0, 1)"]),
    (["steps_per_call=0"], ["steps_per_call=0 is invalid", "positive integer"]),
    (["loss.label_smoothing=-0.1"], ["loss.label_smoothing=-0.1 is invalid", "[0, 1)"]),
    # hardware this machine does not have
    (["trainer.accelerator=tpu9"], ["trainer.accelerator='tpu9'", "cpu", "gpu"]),
    (
        [f"trainer.devices={os.cpu_count() + 1}"],
        [f"trainer.devices={os.cpu_count() + 1} but this machine has {os.cpu_count()} CPU cores"],
    ),
    *(
        [(["trainer=gpu"], ["trainer.accelerator=gpu but this machine has no usable GPU", "trainer=cpu"])]
        if not torch.cuda.is_available()
        else [(["trainer=gpu", "trainer.devices=[0,99]"], ["names GPU 99"])]
    ),
    *(
        [(["trainer=mps"], ["trainer.accelerator=mps but this machine has no usable Apple GPU (MPS)", "trainer=cpu"])]
        if not torch.backends.mps.is_available()
        else []
    ),
    # diagnostics callbacks
    (["callbacks.misclassified.max_images=0"], ["callbacks.misclassified.max_images=0", "positive integer"]),
    (
        ["callbacks.gradient_norms.every_n_steps=often"],
        ["callbacks.gradient_norms.every_n_steps='often'", "positive integer"],
    ),
]


def _run_job_error(tmp_path: Path, monkeypatch, capsys, overrides: list[str]) -> str:
    """Through the entry point's run_job: one line, exit 2, and the run dir Hydra made is gone."""
    monkeypatch.setenv("MLPLAB_DATA_DIR", str(tmp_path / "no-data"))
    log_dir = tmp_path / "logs"
    out = log_dir / "runs" / "2026-01-01" / "00-00-00_abcdef"
    # What the CLI does before the task runs: its Hydra callback, then Hydra's own files.
    CheckOutputDir().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(out)}, "output_subdir": ".hydra"}}))
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    (out / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (out / "train.log").write_text("")
    cfg = compose_cfg(QUICK + ["logger=none", *overrides], out)
    cfg.paths.log_dir = str(log_dir)
    with pytest.raises(SystemExit) as info:
        run_job(cfg, fit)
    assert info.value.code == EXIT_USER_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert list(log_dir.rglob("*")) == []  # nothing written to logs/
    return lines[0]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_config_values(tmp_path, no_training, monkeypatch, capsys, overrides, expected):
    msg = _run_job_error(tmp_path, monkeypatch, capsys, overrides)
    for part in expected:
        assert part in msg, (part, msg)
    assert "allowed" in msg


def test_mlflow_logger_without_mlflow_is_one_line(tmp_path, no_training, monkeypatch, capsys):
    """logger=mlflow where the optional package is not installed: one line naming the extra,
    exit 2, nothing in logs/ (before, a traceback from the logger's constructor)."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an absent package looks like to an import
    msg = _run_job_error(tmp_path, monkeypatch, capsys, ["logger=mlflow"])
    assert msg.startswith(
        'error: logger=mlflow needs the mlflow package; install it with pip install -e ".[mlflow]"; '
    ), msg
    assert "allowed without it: logger=csv|many_loggers|none|tensorboard" in msg


# What third-party constructors reached through ``_target_`` refuse (Trainer, callbacks,
# torch optimizers and schedules, nets), unknown keys, the seed's range: each used to be a
# traceback or Hydra's multi-line wrapper, or (``+foo=1``) was silently ignored.
TARGET_MISTAKES = [
    (["seed=-1"], ["seed=-1", "0..4294967295"]),
    (["seed=99999999999999"], ["seed=99999999999999", "0..4294967295"]),
    (
        ["scheduler.T_max=0"],
        ["scheduler=cosine", "CosineAnnealingLR rejected", "scheduler.T_max=0", "ZeroDivisionError"],
    ),
    (
        ["scheduler=onecycle", "scheduler.pct_start=1.5"],
        [
            "scheduler=onecycle",
            "OneCycleLR rejected",
            "scheduler.pct_start=1.5",
            "between 0 and 1",
            "default pct_start=0.3",
        ],
    ),
    (["trainer.check_val_every_n_epoch=0"], ["trainer.check_val_every_n_epoch=0", "an integer >= 1"]),
    (
        ["optimizer=adam", "+optimizer.betas=abc"],
        ["optimizer=adam", "torch.optim.Adam rejected", "optimizer.betas='abc'"],
    ),
    (
        ["+trainer.max_epoch=3"],
        [
            "trainer.max_epoch=3 is invalid: lightning.pytorch.Trainer has no such option",
            "max_steps",
            "(did you mean max_epochs?)",
        ],
    ),
    (["+trainer.precision=bogus"], ["trainer.precision='bogus'", "Trainer rejected", "'16-mixed'"]),
    (["callbacks.model_checkpoint.save_top_k=-5"], ["callbacks.model_checkpoint.save_top_k=-5", "Must be >= -1"]),
    # digits: 64 inputs -> 1e11 -> 10 classes, float32
    (
        ["model.hidden_sizes=[100000000000]"],
        ["model.hidden_sizes=[100000000000] is too large", "7,500,000,000,010 parameters (30.0 TB)"],
    ),
    (["+foo=1"], ["foo=1 is invalid", "allowed keys: callbacks, ckpt_path, compile, data, engine"]),
    (["+optimizer_name=adam"], ["optimizer_name='adam' is invalid", "(did you mean optimizer?)"]),
]


@pytest.mark.parametrize(("overrides", "expected"), TARGET_MISTAKES, ids=[" ".join(o) for o, _ in TARGET_MISTAKES])
def test_what_a_target_refuses_is_one_line(tmp_path, no_training, monkeypatch, capsys, overrides, expected):
    """Checked before anything is built or written (keys), or built once before the Trainer
    exists (the optimizer and its schedule on the net's parameters, the Trainer, callbacks)."""
    msg = _run_job_error(tmp_path, monkeypatch, capsys, overrides)
    for part in expected:
        assert part in msg, (part, msg)
    assert "allowed" in msg


@pytest.mark.parametrize(("data", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_missing_dataset_files_offline(tmp_path, no_training, data, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _train_error([f"data={data}", f"data.data_dir={empty}", "data.download=false"], tmp_path / "run")
    assert isinstance(err, DataError)
    msg = str(err)
    assert str(empty / folder / "raw") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg


def test_existing_checkpoints_in_output_dir_are_not_overwritten(tmp_path, no_training):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"earlier run")
    cfg = compose_cfg(QUICK + ["logger=none"], out)
    with pytest.raises(ConfigError, match="paths.output_dir=.*already holds checkpoints"):
        train(cfg)
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == b"earlier run"


def test_train_resume_from_missing_checkpoint(tmp_path, no_training):
    missing = tmp_path / "nope.ckpt"
    err = _train_error([f"ckpt_path={missing}"], tmp_path / "run")
    assert isinstance(err, CheckpointError) and f"ckpt_path={missing}" in str(err)


def _eval_error(ckpt: Path, out: Path) -> CheckpointError:
    cfg = compose_cfg([f"ckpt_path={ckpt}", "logger=none", "trainer.accelerator=cpu"], out, config_name="eval")
    with pytest.raises(CheckpointError) as info:
        evaluate(cfg)
    return info.value


def test_eval_nonexistent_checkpoint(tmp_path):
    missing = tmp_path / "does" / "not" / "exist.ckpt"
    msg = str(_eval_error(missing, tmp_path / "out"))
    assert f"ckpt_path={missing}" in msg and "does not exist" in msg


def test_eval_checkpoint_is_a_directory(tmp_path):
    msg = str(_eval_error(tmp_path, tmp_path / "out"))
    assert f"ckpt_path={tmp_path}" in msg


def test_eval_random_bytes_are_not_a_checkpoint(tmp_path):
    bad = tmp_path / "random.ckpt"
    bad.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    )
    msg = str(_eval_error(bad, tmp_path / "out"))
    assert f"ckpt_path={bad}" in msg and "cannot be loaded" in msg


def test_eval_torch_file_without_run_config(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    msg = str(_eval_error(foreign, tmp_path / "out"))
    assert f"ckpt_path={foreign}" in msg and "not an mlplab checkpoint" in msg


def test_eval_without_ckpt_path(tmp_path):
    cfg = compose_cfg(["ckpt_path=null", "logger=none"], tmp_path, config_name="eval")
    with pytest.raises(CheckpointError, match="ckpt_path is not set"):
        evaluate(cfg)


# -- through the CLI (a handful: each subprocess pays the imports) ------------------------------


def _cli(script: str, args: list[str], tmp_path: Path):
    data = tmp_path / "cli-data"
    data.mkdir(exist_ok=True)
    proc = run_cli(
        script,
        [*args, f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "logger=none"],
        cwd=tmp_path,
        env={"MLPLAB_DATA_DIR": str(data)},
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert _ckpts(tmp_path / "run") == []
    return proc


def _assert_user_error(proc, *parts: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:"), last
    for part in parts:
        assert part in last, (part, last)
    return last


def test_cli_unknown_group_option_lists_the_choices(tmp_path):
    proc = _cli("train", ["model=resnet"], tmp_path)
    assert proc.returncode == 2  # one line of mlplab's (mlplab.commandline), no longer Hydra's report
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: model=resnet is not an option; allowed: ")
    for choice in ("relu_mlp", "sigmoid_net", "simple_net"):
        assert choice in line


def test_cli_bad_batch_size(tmp_path):
    _assert_user_error(_cli("train", ["data.batch_size=0"], tmp_path), "data.batch_size=0", "positive integer")


def test_cli_string_for_lr(tmp_path):
    _assert_user_error(_cli("train", ["optimizer.lr=abc"], tmp_path), "optimizer.lr='abc'")


def test_cli_missing_dataset_offline(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli("train", ["data=mnist", f"data.data_dir={empty}", "data.download=false"], tmp_path)
    _assert_user_error(proc, str(empty / "MNIST" / "raw"), "train-images-idx3-ubyte.gz")


def test_cli_eval_bad_checkpoint(tmp_path):
    bad = tmp_path / "junk.ckpt"
    bad.write_bytes(b"\x00not a checkpoint\xff" * 64)
    proc = _cli("eval", [f"ckpt_path={bad}"], tmp_path)
    _assert_user_error(proc, f"ckpt_path={bad}")
    assert _ckpts(tmp_path) == [bad]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["+foo=1"], ["error: foo=1 is invalid: train.yaml and its config groups define no such top-level key"]),
        (["scheduler=onecycle", "scheduler.pct_start=1.5"], ["error: scheduler=onecycle:", "scheduler.pct_start=1.5"]),
    ],
    ids=["unknown top-level key", "schedule refused"],
)
def test_cli_target_mistake_is_one_line_and_leaves_no_run_dir(tmp_path, args, expected):
    """As a user runs it (Hydra's own run dir under paths.log_dir, the default logger):
    one line, exit 2, nothing left in the log dir."""
    data = tmp_path / "cli-data"
    data.mkdir()
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train", [*args, "trainer=cpu", f"paths.log_dir={log_dir}"], cwd=tmp_path, env={"MLPLAB_DATA_DIR": str(data)}
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert list(log_dir.rglob("*")) == []


def test_cli_unwritable_log_dir(tmp_path):
    """Hydra makes the run dir itself: one that cannot be made is one line too, not Hydra's traceback.

    (``trainer=gpu`` without a GPU and the other hardware cases go through the same
    ``run_job`` path in ``test_bad_config_values``.)
    """
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli(
        "train", ["trainer=cpu", f"paths.log_dir={blocker / 'logs'}"], cwd=tmp_path, env={"MLPLAB_ROOT": str(tmp_path)}
    )
    _assert_user_error(
        proc, f"hydra.run.dir={blocker / 'logs' / 'runs'}", "cannot be written", "allowed: a writable folder"
    )
    assert "Traceback" not in proc.stderr and blocker.read_text() == "not a folder"


# -- property-based: any numeric override either trains or is one clean error ------------------

from hydra.errors import ConfigCompositionException, OverrideParseException  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlplab.errors import MlplabError as _MlplabError  # noqa: E402


def _num(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy[str]:
    """Hydra override values: mostly valid ones (so that runs do train), else anything at all --
    out of range, nan/inf, strings where numbers belong."""
    special = st.sampled_from(["nan", "inf", "-inf", "abc", "null", "''", "[1]"])
    fmt = lambda v: repr(v) if isinstance(v, float) else str(v)  # noqa: E731
    bad = st.one_of(anything.map(fmt), special)
    return st.sampled_from([True, True, False]).flatmap(lambda ok: valid.map(fmt) if ok else bad)


NUMERIC_OVERRIDES = {
    "optimizer.lr": _num(st.floats(1e-4, 1.0), st.one_of(st.integers(-2, 3), st.floats(-1.0, 1e6))),
    "optimizer.momentum": _num(st.floats(0.0, 0.99), st.one_of(st.integers(-1, 2), st.floats(-0.5, 1.5))),
    "data.batch_size": _num(st.integers(1, 512), st.one_of(st.integers(-4, 4096), st.floats(-1.0, 64.0))),
    "data.val_size": _num(
        st.one_of(st.integers(1, 500), st.floats(0.01, 0.9)), st.one_of(st.integers(-5, 3000), st.floats(-0.5, 1.5))
    ),
    "trainer.max_epochs": _num(st.integers(1, 2), st.one_of(st.integers(-2, 0), st.floats(-1.0, 2.0))),
    "model.dropout": _num(st.floats(0.0, 0.9), st.one_of(st.integers(-1, 2), st.floats(-0.5, 1.5))),
    "model.hidden_sizes": _num(
        st.lists(st.integers(1, 48), min_size=1, max_size=3), st.lists(st.integers(-3, 48), max_size=3)
    ).map(lambda v: v.replace(" ", "")),
}


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional=NUMERIC_OVERRIDES))
def test_any_numeric_override_trains_or_is_one_clean_error(tmp_path, values):
    overrides = [f"{key}={value}" for key, value in values.items()]
    # Tiny when it does train: 2 batches, 1 validation batch, no test, nothing written but checkpoints.
    tiny = [
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0",
        "test=false",
    ]
    out = tmp_path / "hyp" / uuid.uuid4().hex  # a fresh dir per example
    try:
        cfg = compose_cfg(QUICK + ["logger=none", *tiny, *overrides], out)
    except (OverrideParseException, ConfigCompositionException) as err:  # Hydra's own message (exit 1)
        assert any(key in str(err) for key in values) or "override" in str(err).lower(), repr(err)
        event("Hydra's parse error")
        return
    try:
        result = train(cfg)
    except _MlplabError as err:
        msg = str(err)
        assert "\n" not in msg and "allowed" in msg and "=" in msg, msg
        event(type(err).__name__)
        return
    assert result is None or 0.0 <= result <= 1.0
    event("trained")

"""Bad input gets one clear error (naming the key and the value) before any training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import QUICK, compose_cfg, run_cli
from mlplab.errors import CheckpointError, ConfigError, DataError, MlplabError
from mlplab.models import Classifier
from mlplab.training import evaluate, train


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
    (["data=fashion_mnist", "data.train_size=58000", "data.val_size=5000"], ["data.train_size=58000", "data.val_size=5000", "60000"]),
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
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_config_values(tmp_path, no_training, monkeypatch, overrides, expected):
    monkeypatch.setenv("MLPLAB_DATA_DIR", str(tmp_path / "no-data"))
    err = _train_error(overrides, tmp_path / "run")
    assert isinstance(err, ConfigError)
    msg = str(err)
    for part in expected:
        assert part in msg, (part, msg)
    assert "allowed" in msg
    assert "\n" not in msg  # one line on stderr


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
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
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
    assert proc.returncode != 0
    assert "model/resnet" in proc.stderr
    for choice in ("relu_mlp", "sigmoid_net", "simple_net"):
        assert choice in proc.stderr


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

"""Files mlplab did not just write are untrusted: a shared checkpoint never runs code.

A checkpoint's stored config is only ever built when every ``_target_`` in it is one of
mlplab's shipped config-group classes (``mlplab.trust``); anything else is one line and
exit 2, before anything is imported, built or written. The tampered checkpoints below
would each have a side effect (a sentinel file created or truncated) if they were built.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from conftest import QUICK, compose_cfg, run_cli
from mlplab.engines import evaluate, fit
from mlplab.errors import CheckpointError, ConfigError
from mlplab.trust import allowed_targets, check_stored_overrides


class _Touch:
    """Pickled, it creates ``path`` when unpickled (what a weights_only=False load would run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trusted-run")
    fit(compose_cfg([*QUICK, "logger=none"], out))
    return out / "checkpoints" / "last.ckpt"


def _tampered(trained: Path, tmp_path: Path, edit) -> Path:
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "shared.ckpt"
    torch.save(ckpt, path)
    return path


def _eval_cfg(ckpt: Path, tmp_path: Path):
    return compose_cfg([f"ckpt_path={ckpt}", "trainer=cpu", "logger=none", "callbacks=none"], tmp_path / "eval", "eval")


def _sentinel(tmp_path: Path) -> Path:
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("a user's file")
    return sentinel


def _config(ckpt: dict) -> dict:
    return ckpt["hyper_parameters"]["config"]


HOSTILE = {
    # torch.load of a pickle with weights_only=False: the pickle runs
    "torch.load chain": lambda c, s: _config(c).__setitem__(
        "data", {"_target_": "torch.load", "_args_": [str(s.with_suffix(".pkl"))], "weights_only": False}
    ),
    # builtins.open(path, "w") truncates a user's file
    "builtins.open": lambda c, s: _config(c).__setitem__(
        "data", {"_target_": "builtins.open", "_args_": [str(s), "w"]}
    ),
    "os.system": lambda c, s: _config(c).__setitem__("model", {"_target_": "os.system", "command": f"echo > {s}"}),
    # an allowed class with a hostile object nested in it
    "nested target": lambda c, s: _config(c)["data"].__setitem__(
        "augment", {"_target_": "builtins.open", "file": str(s), "mode": "w"}
    ),
    # an allowed class called with positional arguments it never gets from mlplab's configs
    "_args_ on an allowed class": lambda c, s: _config(c)["model"].__setitem__("_args_", [str(s)]),
    "_partial_ on data": lambda c, s: _config(c)["data"].__setitem__("_partial_", True),
    "mlplab function that writes": lambda c, s: _config(c).__setitem__(
        "loss", {"_target_": "mlplab.atomic.atomic_write_text", "target": str(s), "text": "owned"}
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_tampered_checkpoint_config_is_refused_before_anything_runs(trained, tmp_path, case):
    sentinel = _sentinel(tmp_path)
    payload = sentinel.with_suffix(".pkl")
    created = tmp_path / "created-by-pickle"
    payload.write_bytes(pickle.dumps(_Touch(created)))
    ckpt = _tampered(trained, tmp_path, lambda c: HOSTILE[case](c, sentinel))
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*shared\.ckpt holds") as err:
        evaluate(_eval_cfg(ckpt, tmp_path))
    assert "\n" not in str(err.value)
    assert sentinel.read_text() == "a user's file"
    assert not created.exists()
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def test_the_allowlist_is_the_shipped_config_groups_classes():
    allowed = allowed_targets()
    assert {
        "mlplab.data.DigitsDataModule",
        "mlplab.models.MLP",
        "mlplab.models.CrossEntropy",
        "torch.optim.SGD",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "kornia.augmentation.RandomAffine",
    } <= allowed
    assert not {"torch.load", "builtins.open", "os.system", "lightning.pytorch.Trainer"} & allowed


def test_a_checkpoint_whose_config_does_not_fit_its_weights_is_one_line(trained, tmp_path):
    ckpt = _tampered(trained, tmp_path, lambda c: _config(c)["model"].__setitem__("hidden_sizes", [7]))
    with pytest.raises(
        CheckpointError, match=r"does not fit this model and data: net\..* is \[\d+, \d+\] there, \[7, 64\] here"
    ):
        evaluate(_eval_cfg(ckpt, tmp_path))


def test_a_checkpoint_with_non_finite_weights_is_refused(trained, tmp_path):
    def poison(c):
        name = next(k for k in c["state_dict"] if k.startswith("net.") and k.endswith("weight"))
        c["state_dict"][name][0, 0] = float("nan")

    ckpt = _tampered(trained, tmp_path, poison)
    with pytest.raises(CheckpointError, match=r"holds non-finite weights \(net\..*weight has NaN or inf\)"):
        evaluate(_eval_cfg(ckpt, tmp_path))


def test_the_untampered_checkpoint_still_evaluates(trained, tmp_path):
    metrics = evaluate(_eval_cfg(trained, tmp_path))
    assert 0.5 < metrics["test/acc"] <= 1.0


def test_eval_cli_refuses_a_hostile_checkpoint_with_one_line_and_leaves_nothing(trained, tmp_path):
    sentinel = _sentinel(tmp_path)
    created = tmp_path / "created-by-pickle"
    sentinel.with_suffix(".pkl").write_bytes(pickle.dumps(_Touch(created)))
    ckpt = _tampered(trained, tmp_path, lambda c: HOSTILE["torch.load chain"](c, sentinel))
    logs = tmp_path / "logs"
    proc = run_cli("eval", [f"ckpt_path={ckpt}", f"paths.log_dir={logs}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ckpt_path=") and "'torch.load'" in lines[0], proc.stderr
    assert not created.exists() and sentinel.read_text() == "a user's file"
    assert not logs.exists() or not any(logs.rglob("*")), sorted(logs.rglob("*"))


@pytest.mark.parametrize(
    "override",
    [
        "hydra.callbacks.x._target_=os.system",
        "+model._args_=[1]",
        "model={_target_:builtins.open,file:/tmp/x,mode:w}",
        "callbacks.model_checkpoint.dirpath=/etc",
        "+callbacks.timer.out_file=/tmp/owned",
        "hydra/launcher=joblib",
        "seed=1,2",
        "model=../../../../tmp/shared-run/evil",
        "model=/tmp/shared-run/evil",
    ],
)
def test_stored_overrides_that_build_or_write_elsewhere_are_refused(override):
    with pytest.raises(ConfigError, match=r"overrides.yaml holds the override .* which resume= does not apply"):
        check_stored_overrides(["model=simple_net", override], "run/.hydra/overrides.yaml")


def test_plain_stored_overrides_pass():
    check_stored_overrides(
        [
            "model=simple_net",
            "optimizer.lr=0.1",
            "trainer.max_epochs=3",
            "model.hidden_sizes=[8,4]",
            "paths.log_dir=/tmp/logs",
            "data.data_dir=/data",
            "+trainer.limit_train_batches=2",
        ],
        "run/.hydra/overrides.yaml",
    )


def test_checkpoint_paths_stored_in_a_checkpoint_stay_inside_the_runs_checkpoints(tmp_path):
    """Top-k bookkeeping deletes files: a tampered (or moved) checkpoint's paths are names in this dirpath."""
    from mlplab.callbacks import ModelCheckpoint

    victim = tmp_path / "victim.ckpt"
    callback = ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", save_top_k=1, monitor="val/acc", mode="max")
    callback.load_state_dict(
        {
            "dirpath": str(tmp_path / "moved-from"),
            "monitor": "val/acc",
            "best_model_score": torch.tensor(0.5),
            "best_model_path": str(tmp_path / "moved-from" / "epoch_003.ckpt"),
            "kth_best_model_path": str(victim),
            "kth_value": torch.tensor(0.5),
            "last_model_path": "/etc/passwd",
            "best_k_models": {str(victim): torch.tensor(0.5), "..": torch.tensor(0.4)},
        }
    )
    inside = tmp_path / "run" / "checkpoints"
    assert callback.best_model_path == str(inside / "epoch_003.ckpt")  # a moved run dir resumes where it is
    assert callback.kth_best_model_path == str(inside / "victim.ckpt")
    assert list(callback.best_k_models) == [str(inside / "victim.ckpt")]
    assert callback.last_model_path == ""


MALFORMED = {
    "random bytes": (
        None,
        r"cannot be loaded as a checkpoint \(not a PyTorch checkpoint of tensors and plain values; "
        r"pickled objects are never loaded\)",
    ),
    "hyper_parameters is text": (lambda c: c.__setitem__("hyper_parameters", "x"), "is not an mlplab checkpoint"),
    "config is a list": (lambda c: c["hyper_parameters"].__setitem__("config", [1, 2]), "is not an mlplab checkpoint"),
    "a weight is text": (
        lambda c: c["state_dict"].__setitem__(next(k for k in c["state_dict"] if k.startswith("net.")), "w"),
        r"does not fit this model and data: net\.\S+ is not a tensor there",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_checkpoint_is_one_line(trained, tmp_path, case):
    edit, message = MALFORMED[case]
    if edit is None:
        ckpt = tmp_path / "shared.ckpt"
        ckpt.write_bytes(bytes(range(256)) * 16)
    else:
        ckpt = _tampered(trained, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        evaluate(_eval_cfg(ckpt, tmp_path))
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)

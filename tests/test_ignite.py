"""engine=ignite: the same configs, the same scalar names, the same accuracy as Lightning."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK, compose_cfg
from mlplab.errors import ConfigError
from mlplab.training import train

SCALARS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"}


def _scalars(out_dir) -> dict[str, list[float]]:
    ea = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_ignite_matches_lightning_on_digits(tmp_path):
    common = [*QUICK, "trainer.max_epochs=5"]
    lightning_metric = train(compose_cfg([*common, "engine=lightning", "optimized_metric=test/acc"], tmp_path / "lightning"))
    ignite_metric = train(compose_cfg([*common, "engine=ignite", "optimized_metric=test/acc"], tmp_path / "ignite"))
    assert lightning_metric > 0.9 and ignite_metric > 0.9
    assert abs(lightning_metric - ignite_metric) <= 0.005  # within half a point

    lightning, ignite = _scalars(tmp_path / "lightning"), _scalars(tmp_path / "ignite")
    assert SCALARS <= set(ignite)
    assert len(ignite["val/acc"]) == len(lightning["val/acc"]) == 5
    assert ignite["val/acc_best"][-1] == pytest.approx(max(ignite["val/acc"]))
    assert ignite["test/acc"][-1] == pytest.approx(ignite_metric)
    # same data order, same init, same optimizer: the per-epoch validation curves agree closely
    assert max(abs(a - b) for a, b in zip(ignite["val/acc"], lightning["val/acc"])) <= 0.01
    ckpts = sorted(p.name for p in (tmp_path / "ignite" / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[0].startswith("best_") and ckpts[1].startswith("last_")


def test_ignite_refuses_multi_device(tmp_path):
    with pytest.raises(ConfigError, match="engine=ignite runs on one device"):
        train(compose_cfg([*QUICK, "engine=ignite", "trainer=ddp_cpu"], tmp_path))


def test_unknown_engine(tmp_path):
    with pytest.raises(ConfigError, match="engine='keras' is invalid; allowed: lightning, ignite"):
        train(compose_cfg([*QUICK, "engine=keras"], tmp_path))


@pytest.mark.slow
def test_compiled_run_checkpoints_load_uncompiled(tmp_path):
    """compile=true: torch.compile'd training; the best checkpoint evaluates in an uncompiled net."""
    from mlplab.training import evaluate

    acc = train(compose_cfg([*QUICK, "trainer.max_epochs=2", "compile=true", "optimized_metric=test/acc"], tmp_path / "run"))
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_cfg([f"ckpt_path={best}", "trainer=cpu"], tmp_path / "eval", config_name="eval")
    assert evaluate(eval_cfg)["test/acc"] == pytest.approx(acc, abs=1e-6)


def test_ignite_onecycle_steps_per_batch(tmp_path):
    """The same scheduler configs work in both engines (one-cycle: total_steps from the run)."""
    acc = train(compose_cfg([*QUICK, "engine=ignite", "scheduler=onecycle", "trainer.max_epochs=2",
                             "optimized_metric=test/acc"], tmp_path))
    assert acc > 0.8

"""engine=ignite: the same configs, the same scalar names, the same accuracy as Lightning."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK, compose_cfg
from mlplab.engines import train
from mlplab.errors import ConfigError

SCALARS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"}


def _scalars(out_dir) -> dict[str, list[float]]:
    ea = EventAccumulator(str(out_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_ignite_matches_lightning_on_digits(tmp_path):
    common = [*QUICK, "trainer.max_epochs=5"]
    lightning_metric = train(
        compose_cfg([*common, "engine=lightning", "optimized_metric=test/acc"], tmp_path / "lightning")
    )
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
    from mlplab.engines import evaluate

    acc = train(
        compose_cfg([*QUICK, "trainer.max_epochs=2", "compile=true", "optimized_metric=test/acc"], tmp_path / "run")
    )
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_cfg([f"ckpt_path={best}", "trainer=cpu"], tmp_path / "eval", config_name="eval")
    assert evaluate(eval_cfg)["test/acc"] == pytest.approx(acc, abs=1e-6)


def test_ignite_onecycle_steps_per_batch(tmp_path):
    """The same scheduler configs work in both engines (one-cycle: total_steps from the run)."""
    acc = train(
        compose_cfg(
            [*QUICK, "engine=ignite", "scheduler=onecycle", "trainer.max_epochs=2", "optimized_metric=test/acc"],
            tmp_path,
        )
    )
    assert acc > 0.8


def test_ignite_divergence_stops_before_that_epochs_checkpoints(tmp_path, monkeypatch):
    """A non-finite loss in epoch 1: DivergenceError naming the step, epoch 0's checkpoints kept, finite."""
    import re

    import torch

    import mlplab.engines.ignite as ie
    from mlplab.engines.build import build_datamodule
    from mlplab.errors import DivergenceError

    cfg = compose_cfg([*QUICK, "engine=ignite", "trainer.max_epochs=3", "logger=none"], tmp_path / "run")
    dm = build_datamodule(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataloader())
    bad_step = steps_per_epoch + 3  # 0-based: the 4th minibatch of epoch 1
    real_prepare, calls = ie._prepare_batch, [0]

    def poisoned(dm):
        prepare = real_prepare(dm)

        def prepare_batch(batch, device, non_blocking):
            x, y = prepare(batch, device, non_blocking)
            calls[0] += 1
            return (x * float("inf") if calls[0] - 1 == bad_step else x), y

        return prepare_batch

    monkeypatch.setattr(ie, "_prepare_batch", poisoned)
    with pytest.raises(DivergenceError) as info:
        train(cfg)
    msg = str(info.value)
    assert re.match(
        rf"training diverged: non-finite loss at step {bad_step} \(epoch 1, lr \S+ at the epoch's start\); ", msg
    ), msg
    assert "\n" not in msg
    assert calls[0] == 2 * steps_per_epoch  # epoch 1 ran to its end, no further
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    # both from epoch 0 (its last step in the name), with finite weights only
    assert ckpts[0].name.startswith(f"best_model_{steps_per_epoch}_val_acc="), ckpts[0].name
    assert ckpts[1].name == f"last_checkpoint_{steps_per_epoch}.pt", ckpts[1].name
    for p in ckpts:
        state = torch.load(p, map_location="cpu", weights_only=True)
        model = state.get("model", state)
        assert model and all(torch.isfinite(v).all() for v in model.values())


def test_ignite_huge_learning_rate_fails_the_run_in_one_line(tmp_path, capsys):
    """optimizer.lr=1e6 with engine=ignite through the entry point's run_job: exit 2, one line, no checkpoint."""
    import re

    from mlplab import runs
    from mlplab.cli import EXIT_USER_ERROR, run_job
    from mlplab.engines import fit

    out = tmp_path / "logs" / "runs" / "diverged"
    cfg = compose_cfg([*QUICK, "engine=ignite", "optimizer.lr=1e6"], out)
    cfg.paths.log_dir = str(tmp_path / "logs")
    with pytest.raises(SystemExit) as info:
        run_job(cfg, fit)
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert re.match(r"error: training diverged: non-finite loss at step \d+ \(epoch 0, lr 1e\+06 ", line), line
    assert "Engine run is terminating" not in err and "Traceback" not in err
    assert runs.read_run_record(out)["status"] == "failed"
    assert not list(out.rglob("*.pt"))  # nothing good to keep: it diverged in the first epoch


@pytest.mark.parametrize(
    "override, shown",
    [
        ("+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0"),
        ("+trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4"),
        ("+trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed"),
        ("+trainer.max_steps=10", "trainer.max_steps=10"),
        ("debug=overfit", "trainer.overfit_batches=3"),
    ],
)
def test_ignite_refuses_lightning_only_trainer_settings(tmp_path, override, shown):
    """A trainer setting the ignite loop would ignore is a one-line ConfigError before training, not ignored."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        train(compose_cfg([*QUICK, "engine=ignite", override], out))
    msg = str(info.value)
    assert msg.startswith(f"engine=ignite does not implement {shown}; allowed: engine=lightning, or "), msg
    assert not (out / "checkpoints").exists() and not list(out.glob("events.out.tfevents.*"))

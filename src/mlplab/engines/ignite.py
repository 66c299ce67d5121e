"""The pytorch-ignite engine (``engine=ignite``): Lesson D's training loop on the project's configs.

Same DataModule, net, optimizer, scheduler, seed and output layout as the Lightning
engine; ignite's ``create_supervised_trainer`` / ``create_supervised_evaluator`` run the
loop, ignite's ``TensorboardLogger`` writes the same scalar names (``train/loss``,
``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/loss``, ``test/acc``)
against the global step, and ignite's ``Checkpoint`` keeps the best (by ``val/acc``) and
last weights. The best weights are tested at the end, as with Lightning. A run that
diverges (a non-finite training loss or weight) stops with :class:`DivergenceError` at
the end of that epoch, before its validation and checkpoints, as with Lightning.
``trainer.fast_dev_run`` (``debug=fdr``) is honoured as Lightning does: ``n`` batches (true:
1) of training, validation and test in one epoch, no checkpoint, no TensorBoard; so is
``trainer.detect_anomaly`` (``debug=default``): torch's anomaly detection around the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from ignite.engine import (
    Engine,
    Events,
    create_supervised_evaluator,
    create_supervised_trainer,
)
from ignite.handlers import Checkpoint, DiskSaver, global_step_from_engine
from ignite.handlers.tensorboard_logger import TensorboardLogger
from ignite.metrics import Accuracy, Loss
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mlplab.engines.build import build_loss, build_optimizer
from mlplab.engines.limits import check_trainer, fast_dev_batches
from mlplab.errors import ConfigError, DivergenceError
from mlplab.hparams import HPARAM_METRICS, flat_hparams, write_hparams_summary
from mlplab.models.classifier import build_scheduler
from mlplab.runs import mark_training_started


def _device(cfg: DictConfig) -> torch.device:
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if devices not in (1, "1", "auto") or OmegaConf.select(cfg, "trainer.strategy", default=None) not in (None, "auto"):
        raise ConfigError(
            f"engine=ignite runs on one device (trainer.devices={devices}); allowed: trainer=default|cpu|gpu|mps"
        )
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator=mps but no Apple GPU (MPS) is visible; allowed: cpu, auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but no GPU is visible; allowed: cpu, auto")
    return torch.device("cuda")


def _prepare_batch(dm) -> Callable:
    """ignite's batch preparation plus the DataModule's training augmentation (if any)."""

    def prepare(batch, device, non_blocking):
        x, y = (t.to(device, non_blocking=non_blocking) for t in batch)
        return (dm.augment(x) if dm.augment is not None else x), y

    return prepare


def _no_exception_echo(record: logging.LogRecord) -> bool:
    """Drop ignite's "Engine run is terminating due to exception" log line: the exception
    propagates, and the entry point reports it once (a user error as its one line)."""
    return not record.getMessage().startswith("Engine run is terminating due to exception")


def _check_finite(net: nn.Module, losses: list[torch.Tensor], engine: Engine, lr: float) -> None:
    """Raise :class:`DivergenceError` if a loss of this epoch or a weight is not finite
    (one host sync an epoch). The Lightning engine's message, the step 0-based."""
    bad = torch.stack(losses).isfinite().logical_not() if losses else None
    if bad is not None and bool(bad.any()):
        where = f"loss at step {engine.state.iteration - len(losses) + int(bad.nonzero()[0])}"
    elif not all(bool(p.detach().isfinite().all()) for p in net.parameters()):
        where = f"weights by step {engine.state.iteration}"
    else:
        return
    raise DivergenceError.training(where, engine.state.epoch - 1, lr, allowed="a smaller optimizer.lr")


def fit(
    cfg: DictConfig, dm, net: nn.Module, ckpt_path: Path | None = None, epoch_seconds: list[float] | None = None
) -> dict[str, float]:
    """Train ``net`` on ``dm`` with ignite; returns the final metrics (val/acc_best, test/acc, ...).

    ``epoch_seconds``, if given, receives each epoch's wall time (training + validation).
    """
    anomaly = OmegaConf.select(cfg, "trainer.detect_anomaly", default=None)
    if anomaly not in (None, True, False):
        raise ConfigError(f"trainer.detect_anomaly={anomaly!r} is invalid; allowed: true, false")
    with torch.autograd.set_detect_anomaly(bool(anomaly)):  # as Lightning's Trainer(detect_anomaly=...)
        return _fit(cfg, dm, net, ckpt_path, epoch_seconds)


def _fit(
    cfg: DictConfig, dm, net: nn.Module, ckpt_path: Path | None, epoch_seconds: list[float] | None
) -> dict[str, float]:
    if ckpt_path is not None or cfg.get("resume"):
        raise ConfigError("engine=ignite cannot resume (resume=, ckpt_path=); allowed: engine=lightning")
    device = _device(cfg)
    check_trainer(cfg, engine="engine=ignite")
    fast_dev_run = fast_dev_batches(cfg)  # 0, or: n batches of each stage, one epoch, nothing kept
    optimizer_factory, scheduler_factory = build_optimizer(cfg, net)  # tried on the net: a refused value is one line
    mark_training_started()
    out_dir = Path(cfg.paths.output_dir)
    max_epochs = 1 if fast_dev_run else int(cfg.trainer.max_epochs)
    dm.prepare_data()
    dm.setup("fit")

    def epoch_length(loader) -> int:
        return min(fast_dev_run, len(loader)) if fast_dev_run else len(loader)

    train_length = epoch_length(dm.train_dataloader())
    net = net.to(device)
    optimizer = optimizer_factory(params=net.parameters())
    scheduler, interval = None, "epoch"
    if scheduler_factory is not None:
        steps = max_epochs * train_length
        scheduler, interval = build_scheduler(scheduler_factory, optimizer, total_steps=lambda: steps)
    criterion = build_loss(cfg)

    def metrics() -> dict:  # accuracy on class scores, the loss on the net's raw outputs
        return {"acc": Accuracy(output_transform=lambda o: (criterion.scores(o[0]), o[1])), "loss": Loss(criterion)}

    # The epoch's losses, kept on the device for the divergence check (no sync per step).
    losses: list[torch.Tensor] = []

    def output(x, y, y_pred, loss):
        losses.append(loss.detach())
        return y_pred.detach(), y

    trainer = create_supervised_trainer(
        net,
        optimizer,
        criterion,
        device=device,
        output_transform=output,
        prepare_batch=_prepare_batch(dm),
    )
    for name, metric in metrics().items():
        metric.attach(trainer, name)
    evaluator = create_supervised_evaluator(net, metrics=metrics(), device=device)
    for engine in (trainer, evaluator):
        engine.logger.setLevel(logging.WARNING)  # no "Engine run starting" per evaluation
        engine.logger.addFilter(_no_exception_echo)
    best = {"val/acc_best": float("-inf")}

    step = global_step_from_engine(trainer, Events.ITERATION_COMPLETED)
    tb: TensorboardLogger | None = None
    best_ckpt: Checkpoint | None = None
    last_ckpt: Checkpoint | None = None
    if not fast_dev_run:
        tb = TensorboardLogger(log_dir=str(out_dir))  # the run dir names the TensorBoard run
        write_hparams_summary(tb.writer, flat_hparams(cfg), HPARAM_METRICS)
        tb.attach_output_handler(
            trainer, Events.EPOCH_COMPLETED, tag="train", metric_names=["loss", "acc"], global_step_transform=step
        )
        tb.attach_output_handler(
            evaluator, Events.COMPLETED, tag="val", metric_names=["loss", "acc"], global_step_transform=step
        )

        checkpoints = DiskSaver(str(out_dir / "checkpoints"), require_empty=True)
        to_save = {"model": net, "optimizer": optimizer, "trainer": trainer}
        best_ckpt = Checkpoint(
            {"model": net},
            checkpoints,
            filename_prefix="best",
            n_saved=1,
            score_function=lambda e: e.state.metrics["acc"],
            score_name="val_acc",
            global_step_transform=step,
        )
        last_ckpt = Checkpoint(to_save, checkpoints, filename_prefix="last", n_saved=1, global_step_transform=step)

    if scheduler is not None and interval == "step":
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: scheduler.step())
    epoch_start = [0.0]
    epoch_lr = [float("nan")]

    @trainer.on(Events.EPOCH_STARTED)
    def start_clock(engine: Engine) -> None:
        epoch_start[0] = time.perf_counter()
        epoch_lr[0] = optimizer.param_groups[0]["lr"]
        losses.clear()

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        _check_finite(net, losses, engine, epoch_lr[0])
        val_loader = dm.val_dataloader()
        evaluator.run(val_loader, epoch_length=epoch_length(val_loader))
        best["val/acc_best"] = max(best["val/acc_best"], evaluator.state.metrics["acc"])
        if tb is not None:
            tb.writer.add_scalar("val/acc_best", best["val/acc_best"], engine.state.iteration)
        if best_ckpt is not None and last_ckpt is not None:
            best_ckpt(evaluator)
            last_ckpt(engine)
        if scheduler is not None and interval == "epoch":
            scheduler.step()
        if epoch_seconds is not None:
            epoch_seconds.append(time.perf_counter() - epoch_start[0])

    try:
        trainer.run(dm.train_dataloader(), max_epochs=max_epochs, epoch_length=train_length)
    except DivergenceError:
        if tb is not None:
            tb.close()
        raise
    result = {f"train/{k}": float(v) for k, v in trainer.state.metrics.items()}
    result.update({f"val/{k}": float(v) for k, v in evaluator.state.metrics.items()})
    result["val/acc_best"] = best["val/acc_best"]
    result["epochs"] = float(trainer.state.epoch)

    if cfg.get("test", True):
        if best_ckpt is not None:  # fast_dev_run kept none: the last weights, as Lightning
            Checkpoint.load_objects(
                {"model": net}, torch.load(best_ckpt.last_checkpoint, map_location=device, weights_only=True)
            )
        dm.setup("test")
        tester = create_supervised_evaluator(net, metrics=metrics(), device=device)
        tester.logger.setLevel(logging.WARNING)
        test_loader = dm.test_dataloader()
        tester.run(test_loader, epoch_length=epoch_length(test_loader))
        for k, v in tester.state.metrics.items():
            result[f"test/{k}"] = float(v)
            if tb is not None:
                tb.writer.add_scalar(f"test/{k}", float(v), trainer.state.iteration)
    if tb is not None:
        tb.close()
    return result

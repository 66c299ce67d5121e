"""The Lightning engine (``engine=lightning``, the default): one run, top to bottom.

:func:`fit` takes what :func:`mlplab.engines.run.fit` built (the DataModule with its data
loaded, the net) and does the rest: optimizer and schedule (tried on the net first), the
:class:`~mlplab.models.Classifier`, a checkpoint to start from (checked to fit), callbacks,
loggers and the Trainer, then ``trainer.fit`` and ``trainer.test`` on the best
checkpoint. A signal stops it cleanly (:mod:`mlplab.signals`) with a one-line
:class:`~mlplab.errors.RunInterrupted` that says how to resume.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mlplab import lightning_ext
from mlplab.callbacks import AtomicCheckpointIO, RNGState, StopOnSignal
from mlplab.data import TensorDataModule
from mlplab.engines.build import (
    _instantiate_group,
    build_classifier,
    build_trainer,
)
from mlplab.engines.checkpoints import (
    check_checkpoint_fits,
    check_schedule_plan,
    load_checkpoint,
)
from mlplab.errors import RunInterrupted
from mlplab.hparams import flat_hparams, log_hparams
from mlplab.rundir import checkpoint_progress, newest_last_checkpoint, resume_command
from mlplab.runs import mark_training_started
from mlplab.validation import positive_int

log = logging.getLogger(__name__)

#: Lightning warnings that do not apply to mlplab's runs, silenced while a Trainer runs.
_NOT_APPLICABLE = (
    # The data path is tensor indexing in the main process by design: workers would only add copies.
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Classifier.transfer_batch_to_device passes batches already on the device straight through.
    r".*overridden `transfer_batch_to_device` in `LightningModule`.*",
)


#: Lightning's console lines that tell a user nothing about their run: the accelerators it did
#: not use, advertising tips, and the expected end of fitting.
_NOISE = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "\U0001f4a1 Tip:",
    "`Trainer.fit` stopped: `max_epochs=",
    # logger=mlflow's first run: the store and the experiment are made, as expected.
    "Experiment with name",
    "Creating initial MLflow database tables",
    "Updating database tables",
)
#: The loggers those lines come from.
_NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.loggers.mlflow", "mlflow.store.db.utils")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


@contextlib.contextmanager
def lightning_warnings_filtered() -> Iterator[None]:
    """Lightning's hints that do not apply here and its console noise, silenced for the run only
    (no process-wide filter): the console says what mlplab does, in its own lines."""
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for pattern in _NOT_APPLICABLE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def fit(cfg: DictConfig, dm: TensorDataModule, net: torch.nn.Module, ckpt_path: Path | None) -> dict[str, float]:
    """Train ``net`` on ``dm``, test the best checkpoint; every final metric and ``epochs``."""
    with lightning_warnings_filtered():
        return _fit(cfg, dm, net, ckpt_path)


def _fit(cfg: DictConfig, dm: TensorDataModule, net: torch.nn.Module, ckpt_path: Path | None) -> dict[str, float]:
    model = build_classifier(cfg, net, dm.num_classes)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint_fits(ckpt_path, model, ckpt)
        check_schedule_plan(ckpt_path, ckpt, cfg)
        del ckpt
    stop = StopOnSignal()
    # RNG state and signal handling make a run resumable; always on, whatever cfg.callbacks says.
    callbacks: list[Callback] = [*_instantiate_group(cfg.get("callbacks"), "callbacks"), RNGState(), stop]
    loggers: list[Logger] = _instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = build_trainer(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    steps_per_call = _steps_per_call(cfg, trainer)
    model.fuse_steps(steps_per_call, dm.batch_size)
    dm.steps_per_call = steps_per_call
    log.debug("steps_per_call=%d, profiler %s", steps_per_call, type(trainer.profiler).__name__)
    if not cfg.get("resume"):  # a resumed run already has its HPARAMS entry
        log_hparams(loggers, flat_hparams(cfg))

    # torch.compile on the LightningModule: Lightning unwraps it for checkpoints, so they
    # load into an uncompiled net (eval.py) as usual.
    fit_model = torch.compile(model) if cfg.get("compile", False) else model
    mark_training_started()
    testing, metrics = False, {}
    try:
        trainer.fit(fit_model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        metrics = as_floats(trainer.callback_metrics)
        metrics["epochs"] = float(trainer.current_epoch)
        if stop.received:  # after the fit loop's last batch: stop before the test
            raise RunInterrupted(f"stopped by {stop.received}", stop.received)

        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not best:
                log.warning("no best checkpoint (checkpointing off?): testing the last weights")
            testing = True
            trainer.test(fit_model, datamodule=dm, ckpt_path=best or None, verbose=False)
            metrics.update(as_floats(trainer.callback_metrics))
    except (SIGTERMException, RunInterrupted) as err:  # a signal (mlplab.signals): at a batch boundary, or at once
        interrupted = _interrupted(cfg, trainer, stop.received or getattr(err, "signal_name", "SIGTERM"), testing)
        # What was measured before the stop goes into run.json (a resumed run keeps it).
        interrupted.metrics = metrics if testing else as_floats(trainer.callback_metrics)
        raise interrupted from None
    name_profiler_reports(trainer)
    return metrics


@rank_zero_only
def name_profiler_reports(trainer: L.Trainer) -> None:
    """One line naming the report files of a profiler that writes them (``debug=profiler``)."""
    profiler = trainer.profiler
    dirpath, filename = getattr(profiler, "dirpath", None), getattr(profiler, "filename", None)
    if isinstance(profiler, PassThroughProfiler) or not dirpath or not filename:
        return
    reports = sorted(Path(dirpath).glob(f"*{filename}*.txt"))
    if reports:
        log.info("profiler reports: %s", ", ".join(str(p) for p in reports))


def _steps_per_call(cfg: DictConfig, trainer: L.Trainer) -> int:
    """``cfg.steps_per_call``, or 1 where fused steps would change what the run does.

    Fused steps need one process (DDP synchronises gradients once per forward of its
    wrapped module), no gradient clipping or accumulation (Lightning's, automatic
    optimization only), and whole epochs counted in minibatches (limit_train_batches,
    val_check_interval count loop iterations).
    """
    steps = positive_int("steps_per_call", cfg.get("steps_per_call", 1))
    if steps == 1:
        return 1
    reasons = {
        f"lightning {L.__version__} (not one mlplab.lightning_ext was verified against)": not lightning_ext.supported(),
        "more than one process (DDP)": trainer.num_devices * trainer.num_nodes > 1,
        "trainer.gradient_clip_val": bool(trainer.gradient_clip_val),
        "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches != 1,
        # (an int counts batches: limit_train_batches=1 is one batch, 1.0 all of them)
        "trainer.limit_train_batches": not _all_batches(trainer.limit_train_batches),
        "trainer.val_check_interval": not _all_batches(trainer.val_check_interval),
        "trainer.overfit_batches": bool(trainer.overfit_batches),
    }
    blocking = [name for name, applies in reasons.items() if applies]
    if blocking:
        log.info(
            "steps_per_call=%d -> 1 (one optimizer step per training_step) because of %s", steps, ", ".join(blocking)
        )
        return 1
    return steps


def _all_batches(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value == 1.0)


def _interrupted(cfg: DictConfig, trainer: L.Trainer, signal_name: str, testing: bool = False) -> RunInterrupted:
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    last = Path(out) / "checkpoints" / "last.ckpt" if out else None
    newest = newest_last_checkpoint(last.parent) if last is not None else None
    if newest is not None:
        progress = checkpoint_progress(newest)
        saved = f"{newest} holds epoch {progress[0]}, the last completed one"
    elif last is not None and last.exists():
        # An unreadable last.ckpt is named, not loaded: this one line must not become a traceback.
        saved = f"{last} cannot be read as a checkpoint (kept as it is)"
    else:
        saved = "no epoch had completed (no last.ckpt)"
    where = "in the test stage" if testing else f"in epoch {trainer.current_epoch}"
    return RunInterrupted(
        f"stopped by {signal_name} {where}: {saved}; resume with: {resume_command(out, _task_overrides())}",
        signal_name,
    )


def _task_overrides() -> list[str]:
    """The job's own command-line overrides (none outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []

"""What ``src/train.py`` and ``src/eval.py`` run: config in, metrics out.

Data flows one way: config -> DataModule (knows ``input_dim``, ``num_classes``,
``class_names``) -> net sized from it -> :class:`~mlplab.models.Classifier` -> Trainer
-> logs and checkpoints.
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
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mlplab.build import (  # noqa: F401 (the build_* helpers and _instantiate_group: importable from here too)
    _instantiate_group,
    check_targets,
    build_datamodule,
    build_loss,
    build_net,
    build_optimizer,
    build_trainer,
)
from mlplab.callbacks import AtomicCheckpointIO, RNGState, StopOnSignal
from mlplab.config import (
    validate_ckpt_path,
    validate_hardware,
    validate_train_config,
    validate_trainer,
)
from mlplab.data import TensorDataModule
from mlplab.errors import CheckpointError, ConfigError, RunInterrupted
from mlplab.hparams import flat_hparams, log_hparams
from mlplab.lean import NullProfiler, denormals_flushed, reuse_freed_memory, trim_dispatch
from mlplab.models import Classifier
from mlplab.numpy_net import NumpyMLP
from mlplab.rundir import checkpoint_progress, newest_last_checkpoint, resume_checkpoint, resume_command
from mlplab.runs import mark_training_started
from mlplab.trust import check_stored_config
from mlplab.validation import positive_int

log = logging.getLogger(__name__)

# The data path is tensor indexing in the main process by design: workers would only add
# inter-process copies. Lightning's hint to add workers does not apply.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# Classifier.transfer_batch_to_device passes batches already on the device straight through.
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device` in `LightningModule`.*")


def _summary(metrics: dict[str, float], output_dir: str | None) -> str:
    shown = [f"{k}={metrics[k]:.4f}" for k in ("test/acc", "val/acc_best", "test/loss") if k in metrics]
    return "  ".join(shown) + (f"  (output: {output_dir})" if output_dir else "")


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def train(cfg: DictConfig) -> float | None:
    """Train, test the best checkpoint, and return ``cfg.optimized_metric`` (for sweepers)."""
    metrics = fit(cfg)
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


@contextlib.contextmanager
def denormals(cfg: DictConfig) -> Iterator[None]:
    """``flush_denormal=true`` (the default): denormal floats flushed to zero on the CPU for
    the run (:func:`mlplab.lean.denormals_flushed`), from before its first torch computation."""
    flush = cfg.get("flush_denormal", True)
    if not isinstance(flush, bool):
        raise ConfigError(f"flush_denormal={flush!r} is invalid; allowed: true, false")
    with denormals_flushed(flush) as everywhere:
        if everywhere is False:
            log.info(
                "flush_denormal: only the main thread flushes denormal floats; torch's worker threads were started "
                "before this run (by an earlier computation in this process) and keep them, which can slow CPU "
                "training (README, 'Speed'); call mlplab.lean.flush_denormals() before any torch computation to "
                "cover them"
            )
        yield


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train, test the best checkpoint; returns every final metric and ``epochs`` (epochs completed)."""
    with denormals(cfg):
        return _fit(cfg)


def _fit(cfg: DictConfig) -> dict[str, float]:
    validate_train_config(cfg)
    validate_hardware(cfg)
    ckpt_path = resume_checkpoint(cfg)
    reuse_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = build_datamodule(cfg.data)
    dm.check_available()
    net = build_net(cfg.model, dm)
    _load_data(dm)
    engine = cfg.get("engine", "lightning")
    if isinstance(net, NumpyMLP):  # model=numpy_mlp: the lessons' NumPy network and loop
        from mlplab.numpy_engine import fit_numpy

        metrics = fit_numpy(cfg, dm, net)
        _report(metrics, cfg)
        return metrics
    if engine == "ignite":
        from mlplab.ignite_engine import fit_ignite

        if ckpt_path is not None or cfg.get("resume"):
            raise ConfigError("engine=ignite cannot resume (resume=, ckpt_path=); allowed: engine=lightning")
        mark_training_started()
        metrics = fit_ignite(cfg, dm, net)
        _report(metrics, cfg)
        return metrics
    if engine != "lightning":
        raise ConfigError(f"engine={engine!r} is invalid; allowed: lightning, ignite")
    optimizer, scheduler = build_optimizer(cfg, net)  # tried on the net now: a refused value fails before the Trainer
    model = Classifier(
        net=net,
        num_classes=dm.num_classes,
        optimizer=optimizer,
        scheduler=scheduler,
        config=OmegaConf.to_container(cfg, resolve=True),
        loss=build_loss(cfg),
    )
    if ckpt_path is not None:
        ckpt = _load_checkpoint(ckpt_path)
        check_checkpoint_fits(ckpt_path, model, ckpt)
        check_schedule_plan(ckpt_path, ckpt, cfg)
        del ckpt
    stop = StopOnSignal()
    # RNG state and signal handling make a run resumable; always on, whatever cfg.callbacks says.
    callbacks: list[Callback] = [*_instantiate_group(cfg.get("callbacks"), "callbacks"), RNGState(), stop]
    loggers: list[Logger] = _instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = build_trainer(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **_profiler(cfg)
    )
    trim_dispatch(trainer, model)
    steps_per_call = _steps_per_call(cfg, trainer)
    model.fuse_steps(steps_per_call, dm.batch_size)
    dm.steps_per_call = steps_per_call
    if not cfg.get("resume"):  # a resumed run already has its HPARAMS entry
        log_hparams(loggers, flat_hparams(cfg))

    # torch.compile on the LightningModule: Lightning unwraps it for checkpoints, so they
    # load into an uncompiled net (eval.py) as usual.
    fit_model = torch.compile(model) if cfg.get("compile", False) else model
    mark_training_started()
    testing, metrics = False, {}
    try:
        trainer.fit(fit_model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        metrics = _as_floats(trainer.callback_metrics)
        metrics["epochs"] = float(trainer.current_epoch)
        if stop.received:  # after the fit loop's last batch: stop before the test
            raise RunInterrupted(f"stopped by {stop.received}", stop.received)

        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not best:
                log.warning("no best checkpoint (checkpointing off?): testing the last weights")
            testing = True
            trainer.test(fit_model, datamodule=dm, ckpt_path=best or None, verbose=False)
            metrics.update(_as_floats(trainer.callback_metrics))
    except (SIGTERMException, RunInterrupted) as err:  # a signal (mlplab.signals): at a batch boundary, or at once
        interrupted = _interrupted(cfg, trainer, stop.received or getattr(err, "signal_name", "SIGTERM"), testing)
        # What was measured before the stop goes into run.json (a resumed run keeps it).
        interrupted.metrics = metrics if testing else _as_floats(trainer.callback_metrics)
        raise interrupted from None

    _report(metrics, cfg)
    return metrics


def _load_data(dm: TensorDataModule) -> None:
    """Read, check and split the data before any logger or output exists: bad data leaves nothing.

    (The Trainer's own ``setup`` call then only moves the tensors to its device.)
    """
    dm.prepare_data()
    dm.setup("fit")


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
        log.info("steps_per_call=%d -> 1 (one optimizer step per training_step) because of %s", steps, ", ".join(blocking))
        return 1
    return steps


def _all_batches(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value == 1.0)


def _profiler(cfg: DictConfig) -> dict[str, Any]:
    """No ``trainer.profiler`` configured: the free :class:`~mlplab.lean.NullProfiler`."""
    return {} if cfg.trainer.get("profiler") else {"profiler": NullProfiler()}


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
        f"stopped by {signal_name} {where}: {saved}; "
        f"resume with: {resume_command(out, _task_overrides())}",
        signal_name,
    )


def _task_overrides() -> list[str]:
    """The job's own command-line overrides (none outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _torch_load(ckpt_path: Path) -> Any:
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in first.lower():  # torch's text goes on to suggest weights_only=False
            first = "not a PyTorch checkpoint of tensors and plain values; pickled objects are never loaded"
        raise CheckpointError(f"ckpt_path={ckpt_path} cannot be loaded as a checkpoint ({first})") from None


def stored_config(ckpt: Any) -> dict | None:
    """The run config a checkpoint stores (``hyper_parameters.config``), or None; never raises."""
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    config = hparams.get("config") if isinstance(hparams, dict) else None
    return config if isinstance(config, dict) else None


def _load_checkpoint(ckpt_path: Path) -> dict:
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"ckpt_path={ckpt_path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def check_checkpoint_fits(ckpt_path: Path, model: torch.nn.Module, ckpt: dict | None = None) -> None:
    """Refuse a checkpoint whose net has other parameter names or shapes than ``model``'s, or non-finite weights."""
    ckpt = ckpt if ckpt is not None else _load_checkpoint(ckpt_path)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    theirs = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("net.")}
    if theirs != ours:
        diff = next((k for k in ours if theirs.get(k) != ours[k]), None) or next(k for k in theirs if k not in ours)
        config = stored_config(ckpt) or {}
        trained = f"model {_stored_target(config, 'model')} on {_stored_target(config, 'data')}"
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not fit this model and data: {diff} is "
            f"{list(theirs[diff]) if theirs.get(diff) is not None else 'not a tensor' if diff in theirs else 'absent'} there, "
            f"{list(ours[diff]) if diff in ours else 'absent'} here (the checkpoint has {trained}); "
            "allowed: a checkpoint of the same model and data"
        )
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if bad is not None:
        raise CheckpointError(
            f"ckpt_path={ckpt_path} holds non-finite weights ({bad} has NaN or inf), so its results would be "
            "meaningless; allowed: a checkpoint of a run that did not diverge"
        )


def _stored_target(config: dict, section: str) -> str:
    node = config.get(section)
    return str(node.get("_target_", "?")) if isinstance(node, dict) else "?"


def check_schedule_plan(ckpt_path: Path, ckpt: dict, cfg: DictConfig) -> None:
    """A one-cycle schedule spans the run it was planned for: continuing it for another length is refused.

    (A cosine schedule is re-planned instead: :meth:`mlplab.models.Classifier._replan_schedule`.)
    """
    target = str(OmegaConf.select(cfg, "scheduler._target_", default="") or "")
    if not target.endswith("OneCycleLR"):
        return
    stored = stored_config(ckpt)
    planned = OmegaConf.select(OmegaConf.create(stored), "trainer.max_epochs", default=None) if isinstance(stored, dict) else None
    wanted = cfg.trainer.max_epochs
    if isinstance(planned, int) and planned != wanted:
        raise ConfigError(
            f"trainer.max_epochs={wanted} but ckpt_path={ckpt_path} holds a one-cycle schedule (scheduler=onecycle) "
            f"planned for {planned} epochs, which cannot be stretched mid-cycle; allowed: trainer.max_epochs={planned} "
            "to continue it, or a new run (a cosine schedule, scheduler=cosine, is re-planned when resumed for longer)"
        )


@rank_zero_only
def _report(metrics: dict[str, float], cfg: DictConfig) -> None:
    print(_summary(metrics, OmegaConf.select(cfg, "paths.output_dir", default=None)), flush=True)


def load_checkpoint_config(ckpt_path: Path, ckpt: dict | None = None) -> dict:
    """The training config stored in an mlplab checkpoint, checked before anything is built from it
    (:func:`mlplab.trust.check_stored_config`: only mlplab's own config-group classes)."""
    ckpt = ckpt if ckpt is not None else _torch_load(ckpt_path)
    config = stored_config(ckpt)
    if not isinstance(config, dict) or "data" not in config or "model" not in config:
        raise CheckpointError(f"ckpt_path={ckpt_path} is not an mlplab checkpoint (no stored run config)")
    check_stored_config(config, f"ckpt_path={ckpt_path}")
    return config


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on the test set of the data it was trained on."""
    with denormals(cfg):
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = validate_ckpt_path("ckpt_path", cfg.get("ckpt_path"))
    validate_trainer(cfg)
    check_targets(cfg)
    validate_hardware(cfg)
    ckpt = _load_checkpoint(ckpt_path)
    stored = OmegaConf.create(load_checkpoint_config(ckpt_path, ckpt))
    data_cfg = stored.data
    # Machine-specific data settings (data_dir, batch sizes) come from this command line.
    for key, value in (cfg.get("data") or {}).items():
        if key in data_cfg:
            data_cfg[key] = value
    dm = build_datamodule(data_cfg)
    dm.check_available()
    net = build_net(stored.model, dm)
    _load_data(dm)
    loss = build_loss(stored)
    check_checkpoint_fits(ckpt_path, Classifier(net=net, num_classes=dm.num_classes, loss=loss), ckpt)
    del ckpt
    model = Classifier.load_from_checkpoint(ckpt_path, map_location="cpu", net=net, loss=loss, weights_only=True)

    loggers = _instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = build_trainer(
        cfg.trainer, logger=loggers or False, callbacks=_instantiate_group(cfg.get("callbacks"), "callbacks"), **_profiler(cfg)
    )
    trim_dispatch(trainer, model)
    log_hparams(loggers, flat_hparams(stored), metrics=("test/acc", "test/loss"))
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = _as_floats(trainer.callback_metrics)
    _report(metrics, cfg)
    return metrics


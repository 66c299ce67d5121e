"""What ``src/train.py`` and ``src/eval.py`` run: config in, metrics out.

Data flows one way: config -> DataModule (knows ``input_dim``, ``num_classes``,
``class_names``) -> net sized from it -> :class:`~mlplab.models.Classifier` -> Trainer
-> logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mlplab.callbacks import AtomicCheckpointIO, RNGState, StopOnSignal
from mlplab.config import (
    resume_checkpoint,
    validate_ckpt_path,
    validate_hardware,
    validate_train_config,
    validate_trainer,
)
from mlplab.data import TensorDataModule
from mlplab.errors import CheckpointError, ConfigError, MlplabError, RunInterrupted
from mlplab.hparams import flat_hparams, log_hparams
from mlplab.lean import NullProfiler, denormals_flushed, reuse_freed_memory, trim_dispatch
from mlplab.models import ClassificationLoss, Classifier, CrossEntropy
from mlplab.numpy_net import NumpyMLP
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


def _instantiate_group(group: DictConfig | None, name: str = "") -> list[Any]:
    """Every ``_target_`` entry of a dict-of-objects group (callbacks, logger)."""
    if not group:
        return []
    return [_instantiate_checked(node, f"{name}.{key}" if name else str(key)) for key, node in group.items()
            if isinstance(node, DictConfig) and "_target_" in node]


def _instantiate_checked(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``instantiate``, but a constructor's own user error comes through as itself.

    Hydra wraps any exception raised by a ``_target_`` in an ``InstantiationException``;
    unwrapped, our ConfigError reaches the entry point (one line on stderr, exit code 2).
    A key the constructor does not take (``+model.init=xavier``) is a ConfigError too.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, MlplabError):
            raise cause from None
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(cause)) if isinstance(cause, TypeError) else None
        if unexpected:
            key = unexpected.group(1)
            params = inspect.signature(hydra.utils.get_class(node._target_)).parameters
            allowed = ", ".join(p for p in params if p not in kwargs and p != "self")
            raise ConfigError(
                f"{group}.{key}={node.get(key)!r} is invalid: {node._target_} has no such option; allowed keys: {allowed}"
            ) from None
        raise


def build_datamodule(data_cfg: DictConfig) -> TensorDataModule:
    dm = _instantiate_checked(data_cfg, "data")
    if not isinstance(dm, TensorDataModule):
        raise ConfigError(f"data._target_={data_cfg.get('_target_')} is not an mlplab DataModule")
    return dm


def build_net(model_cfg: DictConfig, dm: TensorDataModule) -> torch.nn.Module:
    return _instantiate_checked(model_cfg, "model", input_dim=dm.input_dim, num_classes=dm.num_classes)


def build_loss(cfg: DictConfig) -> ClassificationLoss:
    """The ``loss`` group's object (cross-entropy when the config has none, e.g. older checkpoints)."""
    node = cfg.get("loss")
    loss = _instantiate_checked(node, "loss") if node else CrossEntropy()
    if not isinstance(loss, ClassificationLoss):
        raise ConfigError(f"loss._target_={node.get('_target_')} is not an mlplab loss; allowed: loss=cross_entropy|mse")
    return loss


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
    model = Classifier(
        net=net,
        num_classes=dm.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        config=OmegaConf.to_container(cfg, resolve=True),
        loss=build_loss(cfg),
    )
    if ckpt_path is not None:
        check_checkpoint_fits(ckpt_path, model)
    stop = StopOnSignal()
    # RNG state and signal handling make a run resumable; always on, whatever cfg.callbacks says.
    callbacks: list[Callback] = [*_instantiate_group(cfg.get("callbacks"), "callbacks"), RNGState(), stop]
    loggers: list[Logger] = _instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(
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
    try:
        trainer.fit(fit_model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        metrics = _as_floats(trainer.callback_metrics)
        metrics["epochs"] = float(trainer.current_epoch)

        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not best:
                log.warning("no best checkpoint (checkpointing off?): testing the last weights")
            trainer.test(fit_model, datamodule=dm, ckpt_path=best or None, verbose=False)
            metrics.update(_as_floats(trainer.callback_metrics))
    except SIGTERMException:  # SIGTERM, or SIGINT through StopOnSignal
        raise _interrupted(cfg, trainer, stop.received or "SIGTERM") from None

    _report(metrics, cfg)
    return metrics


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


def _interrupted(cfg: DictConfig, trainer: L.Trainer, signal_name: str) -> RunInterrupted:
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    last = Path(out) / "checkpoints" / "last.ckpt" if out else None
    if last is not None and last.is_file():
        # Read like any checkpoint: an unreadable file must not turn this one line into a traceback.
        try:
            ckpt = _torch_load(last)
        except CheckpointError:
            ckpt = None
        if isinstance(ckpt, dict) and "epoch" in ckpt:
            saved = f"{last} holds epoch {ckpt['epoch']}, the last completed one"
        else:
            saved = f"{last} cannot be read as a checkpoint (kept as it is)"
    else:
        saved = "no epoch had completed (no last.ckpt)"
    return RunInterrupted(
        f"stopped by {signal_name} in epoch {trainer.current_epoch}: {saved}; "
        f"resume with: python src/train.py resume={out}",
        signal_name,
    )


def _torch_load(ckpt_path: Path) -> Any:
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"ckpt_path={ckpt_path} cannot be loaded as a checkpoint ({first})") from None


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
        config = ckpt.get("hyper_parameters", {}).get("config") or {}
        config = config if isinstance(config, dict) else {}
        trained = f"model {_stored_target(config, 'model')} on {_stored_target(config, 'data')}"
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not fit this model and data: {diff} is "
            f"{list(theirs[diff]) if theirs.get(diff) is not None else 'absent'} there, "
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


@rank_zero_only
def _report(metrics: dict[str, float], cfg: DictConfig) -> None:
    print(_summary(metrics, OmegaConf.select(cfg, "paths.output_dir", default=None)), flush=True)


def load_checkpoint_config(ckpt_path: Path, ckpt: dict | None = None) -> dict:
    """The training config stored in an mlplab checkpoint, checked before anything is built from it
    (:func:`mlplab.trust.check_stored_config`: only mlplab's own config-group classes)."""
    ckpt = ckpt if ckpt is not None else _torch_load(ckpt_path)
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
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
    loss = build_loss(stored)
    check_checkpoint_fits(ckpt_path, Classifier(net=net, num_classes=dm.num_classes, loss=loss), ckpt)
    del ckpt
    model = Classifier.load_from_checkpoint(ckpt_path, map_location="cpu", net=net, loss=loss, weights_only=True)

    loggers = _instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=_instantiate_group(cfg.get("callbacks"), "callbacks"), **_profiler(cfg)
    )
    trim_dispatch(trainer, model)
    log_hparams(loggers, flat_hparams(stored), metrics=("test/acc", "test/loss"))
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = _as_floats(trainer.callback_metrics)
    _report(metrics, cfg)
    return metrics


"""What ``src/train.py`` and ``src/eval.py`` run: config in, metrics out.

Data flows one way: config -> DataModule (knows ``input_dim``, ``num_classes``,
``class_names``) -> net sized from it -> :class:`~mlplab.models.Classifier` -> Trainer
-> logs and checkpoints.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mlplab.config import validate_ckpt_path, validate_train_config, validate_trainer
from mlplab.data import TensorDataModule
from mlplab.errors import CheckpointError, ConfigError, MlplabError
from mlplab.hparams import flat_hparams, log_hparams
from mlplab.models import ClassificationLoss, Classifier, CrossEntropy
from mlplab.numpy_net import NumpyMLP
from mlplab.runs import mark_training_started

log = logging.getLogger(__name__)

# The data path is tensor indexing in the main process by design: workers would only add
# inter-process copies. Lightning's hint to add workers does not apply.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a dict-of-objects group (callbacks, logger)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _instantiate_checked(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, but a constructor's own user error comes through as itself.

    Hydra wraps any exception raised by a ``_target_`` in an ``InstantiationException``;
    unwrapped, our ConfigError reaches the entry point (one line on stderr, exit code 2).
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, MlplabError):
            raise cause from None
        raise


def build_datamodule(data_cfg: DictConfig) -> TensorDataModule:
    dm = _instantiate_checked(data_cfg)
    if not isinstance(dm, TensorDataModule):
        raise ConfigError(f"data._target_={data_cfg.get('_target_')} is not an mlplab DataModule")
    return dm


def build_net(model_cfg: DictConfig, dm: TensorDataModule) -> torch.nn.Module:
    return _instantiate_checked(model_cfg, input_dim=dm.input_dim, num_classes=dm.num_classes)


def build_loss(cfg: DictConfig) -> ClassificationLoss:
    """The ``loss`` group's object (cross-entropy when the config has none, e.g. older checkpoints)."""
    node = cfg.get("loss")
    loss = _instantiate_checked(node) if node else CrossEntropy()
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


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train, test the best checkpoint; returns every final metric and ``epochs`` (epochs completed)."""
    validate_train_config(cfg)
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
    callbacks: list[Callback] = _instantiate_group(cfg.get("callbacks"))
    loggers: list[Logger] = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hparams(loggers, flat_hparams(cfg))

    # torch.compile on the LightningModule: Lightning unwraps it for checkpoints, so they
    # load into an uncompiled net (eval.py) as usual.
    fit_model = torch.compile(model) if cfg.get("compile", False) else model
    mark_training_started()
    trainer.fit(fit_model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    metrics = _as_floats(trainer.callback_metrics)
    metrics["epochs"] = float(trainer.current_epoch)

    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint (checkpointing off?): testing the last weights")
        trainer.test(fit_model, datamodule=dm, ckpt_path=best or None, verbose=False)
        metrics.update(_as_floats(trainer.callback_metrics))

    _report(metrics, cfg)
    return metrics


@rank_zero_only
def _report(metrics: dict[str, float], cfg: DictConfig) -> None:
    print(_summary(metrics, OmegaConf.select(cfg, "paths.output_dir", default=None)), flush=True)


def load_checkpoint_config(ckpt_path: Path) -> dict:
    """The training config stored in an mlplab checkpoint."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"ckpt_path={ckpt_path} cannot be loaded as a checkpoint ({first})") from None
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or "data" not in config or "model" not in config:
        raise CheckpointError(f"ckpt_path={ckpt_path} is not an mlplab checkpoint (no stored run config)")
    return config


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on the test set of the data it was trained on."""
    ckpt_path = validate_ckpt_path("ckpt_path", cfg.get("ckpt_path"))
    validate_trainer(cfg)
    stored = OmegaConf.create(load_checkpoint_config(ckpt_path))
    data_cfg = stored.data
    # Machine-specific data settings (data_dir, batch sizes) come from this command line.
    for key, value in (cfg.get("data") or {}).items():
        if key in data_cfg:
            data_cfg[key] = value
    dm = build_datamodule(data_cfg)
    dm.check_available()
    net = build_net(stored.model, dm)
    model = Classifier.load_from_checkpoint(ckpt_path, map_location="cpu", net=net, loss=build_loss(stored), weights_only=True)

    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=_instantiate_group(cfg.get("callbacks")))
    log_hparams(loggers, flat_hparams(stored), metrics=("test/acc", "test/loss"))
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = _as_floats(trainer.callback_metrics)
    _report(metrics, cfg)
    return metrics


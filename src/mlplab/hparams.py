"""TensorBoard's HPARAMS tab with real metrics.

Lightning's ``TensorBoardLogger.log_hyperparams(params, metrics)`` logs the metric
*values* once, at step 0, which either shows a placeholder (``hp_metric=-1``) or, given
final values, writes a point at step 0 that TensorBoard treats as a restart and uses to
purge the real curve. The hparams plugin only needs the metric *names* in the experiment
summary; it reads their values from the run's own scalars with the same tags. So we
write the three hparams summaries ourselves, naming ``val/acc_best`` and ``test/acc``,
and the values the plugin shows are the real, last logged ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

HPARAM_METRICS = ("val/acc_best", "val/acc", "test/acc", "test/loss")
#: Config sections shown as hyper-parameters (paths and Hydra plumbing are left out).
HPARAM_SECTIONS = ("model", "data", "loss", "optimizer", "scheduler")
HPARAM_KEYS = ("seed", "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.strategy")
_SKIP = {"data_dir", "download", "_partial_"}


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """A flat ``{"model.hidden_sizes": "[256, 128]", "optimizer.lr": 0.05, ...}`` view of a run."""
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k not in _SKIP:
                    visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:  # None, lists
            out[prefix] = str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    for section in HPARAM_SECTIONS:
        if container.get(section) is not None:
            visit(section, container[section])
    for key in HPARAM_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            visit(key, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)
    return out


def write_hparams_summary(writer: Any, params: dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS) -> None:
    """Write the hparams plugin's summaries, naming ``metrics``, with a ``SummaryWriter``.

    A job of a multirun writes its session (hparams and status) but not the experiment
    summary: with none, TensorBoard builds the experiment from all the sweep's sessions
    (the union of their hparams, every scalar as a metric), so ``tensorboard --logdir
    <sweep dir>`` compares all jobs. With one per job it would pick one job's arbitrarily
    and drop the hparams the others do not share (a sweep over models).
    """
    file_writer = writer._get_file_writer()
    experiment, session_start, session_end = hparams(params, {m: float("nan") for m in metrics})
    for summary in (session_start, session_end) if _in_multirun() else (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    file_writer.flush()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@rank_zero_only
def log_hparams(loggers: Iterable[Logger], params: dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS) -> None:
    for logger in loggers:
        logger.log_hyperparams(params)  # hparams.yaml / CSV; no placeholder metric (default_hp_metric=False)
        if isinstance(logger, TensorBoardLogger):
            write_hparams_summary(logger.experiment, params, metrics)

"""TensorBoard's HPARAMS tab with real metrics.

Lightning's ``TensorBoardLogger.log_hyperparams(params, metrics)`` logs the metric
*values* once, at step 0, which either shows a placeholder (``hp_metric=-1``) or, given
final values, writes a point at step 0 that TensorBoard treats as a restart and uses to
purge the real curve. The hparams plugin only needs the metric *names* in the experiment
summary; it reads their values from the run's own scalars with the same tags. So we
write the three hparams summaries ourselves, naming ``val/acc_best`` and ``test/acc``,
and the values the plugin shows are the real, last logged ones.

The tab's columns: TensorBoard orders hparams by name (those whose values differ across
the runs shown first) and shows the first five. So the ones that tell runs apart get
short names numbered in the order wanted (``01 model``, ``02 data``, ``03 optimizer``,
``04 lr``, ``05 batch_size``, then seed, epochs, hidden sizes, activation, dropout; a
run's own experiment summary labels them ``model``, ``data``, ...), and every other
config value follows under its dotted config path (``data.augment``, ...). The run's
``hparams.yaml`` keeps the plain dotted view (:func:`flat_hparams`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams

from mlplab.tensorboard_view import write_layout

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


def _class_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def _hidden_sizes(params: dict[str, Any]) -> Any:
    if "model.hidden_sizes" in params:
        return params["model.hidden_sizes"]
    return f"[{params['model.hidden_size']}]" if "model.hidden_size" in params else None


#: ``(short name, the flat keys it stands for, its value from the flat hparams)``, in column order.
KEY_HPARAMS: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    ("model", ("model._target_",), lambda p: _class_name(p["model._target_"]) if "model._target_" in p else None),
    (
        "data",
        ("data._target_",),
        lambda p: _class_name(p["data._target_"]).removesuffix("DataModule") if "data._target_" in p else None,
    ),
    (
        "optimizer",
        ("optimizer._target_",),
        lambda p: _class_name(p["optimizer._target_"]) if "optimizer._target_" in p else None,
    ),
    ("lr", ("optimizer.lr",), lambda p: p.get("optimizer.lr")),
    ("batch_size", ("data.batch_size",), lambda p: p.get("data.batch_size")),
    ("seed", ("seed",), lambda p: p.get("seed")),
    ("epochs", ("trainer.max_epochs",), lambda p: p.get("trainer.max_epochs")),
    ("hidden_sizes", ("model.hidden_sizes", "model.hidden_size"), _hidden_sizes),
    ("activation", ("model.activation",), lambda p: p.get("model.activation")),
    ("dropout", ("model.dropout",), lambda p: p.get("model.dropout")),
)


def board_hparams(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The hparams as TensorBoard's HPARAMS tab gets them, from :func:`flat_hparams`' view:
    ``({"01 model": "MLP", ..., "data.augment": "None", ...}, {"01 model": "model", ...})``,
    the second the display names of the numbered ones."""
    out: dict[str, Any] = {}
    display: dict[str, str] = {}
    consumed: set[str] = set()
    for rank, (short, keys, value) in enumerate(KEY_HPARAMS, start=1):
        consumed.update(keys)
        v = value(params)
        if v is not None:
            name = f"{rank:02d} {short}"
            out[name], display[name] = v, short
    out.update((k, v) for k, v in sorted(params.items()) if k not in consumed)
    return out, display


def write_hparams_summary(
    writer: Any, params: dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS, layout: bool = True
) -> None:
    """Write the hparams plugin's summaries, naming ``metrics``, with a ``SummaryWriter``;
    with ``layout``, the custom-scalars layout too (:mod:`mlplab.tensorboard_view`).

    ``params`` is :func:`flat_hparams`' view; TensorBoard gets :func:`board_hparams`'.

    A job of a multirun writes its session (hparams and status) but not the experiment
    summary: with none, TensorBoard builds the experiment from all the sweep's sessions
    (the union of their hparams, every scalar as a metric), so ``tensorboard --logdir
    <sweep dir>`` compares all jobs. With one per job it would pick one job's arbitrarily
    and drop the hparams the others do not share (a sweep over models).
    """
    file_writer = writer._get_file_writer()
    names, display = board_hparams(params)
    experiment, session_start, session_end = hparams(names, {m: float("nan") for m in metrics})
    _label(experiment, display)
    for summary in (session_start, session_end) if _in_multirun() else (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    if layout:
        write_layout(writer)
    file_writer.flush()


def _label(experiment: Any, display: dict[str, str]) -> None:
    """Set the experiment summary's display names (TensorBoard still orders columns by name)."""
    value = experiment.value[0]
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        if info.name in display:
            info.display_name = display[info.name]
    value.metadata.plugin_data.content = data.SerializeToString()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@rank_zero_only
def log_hparams(
    loggers: Iterable[Logger], params: dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS, layout: bool = True
) -> None:
    for logger in loggers:
        logger.log_hyperparams(params)  # hparams.yaml / CSV; no placeholder metric (default_hp_metric=False)
        if isinstance(logger, TensorBoardLogger):
            write_hparams_summary(logger.experiment, params, metrics, layout)

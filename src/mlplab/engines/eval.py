"""``src/eval.py``'s run: test a checkpoint on the test set of the data it was trained on.

The checkpoint is untrusted (:mod:`mlplab.engines.checkpoints`, :mod:`mlplab.trust`): its
stored config is built only after its targets were checked, and its weights must fit the
net and be finite. Machine-specific data settings (``data_dir``, batch sizes) come from the
command line.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from mlplab.config import validate_ckpt_path, validate_hardware, validate_trainer
from mlplab.engines.build import (
    _instantiate_group,
    build_datamodule,
    build_loss,
    build_net,
    build_trainer,
    check_targets,
)
from mlplab.engines.checkpoints import (
    best_checkpoint_of,
    check_checkpoint_fits,
    load_checkpoint,
    load_checkpoint_config,
)
from mlplab.engines.lightning import (
    as_floats,
    lightning_warnings_filtered,
)
from mlplab.engines.run import announce, denormals, describe_data, describe_net, load_data, report, threads
from mlplab.errors import CheckpointError
from mlplab.hparams import flat_hparams, log_hparams
from mlplab.models import Classifier


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on the test set of the data it was trained on."""
    with threads(cfg), denormals(cfg), lightning_warnings_filtered():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, float]:
    given = cfg.get("ckpt_path")
    run_dir = Path(str(given)).expanduser() if given is not None else None
    best = best_checkpoint_of(run_dir) if run_dir is not None and run_dir.is_dir() else None
    if run_dir is not None and run_dir.is_dir() and best is None:
        raise CheckpointError(
            f"ckpt_path={given} is a folder without checkpoints/*.ckpt; allowed: a run dir or the path of a .ckpt file"
        )
    ckpt_path = validate_ckpt_path("ckpt_path", best if best is not None else given)
    validate_trainer(cfg)
    check_targets(cfg)
    validate_hardware(cfg)
    ckpt = load_checkpoint(ckpt_path)
    stored = OmegaConf.create(load_checkpoint_config(ckpt_path, ckpt))
    data_cfg = stored.data
    # Machine-specific data settings (data_dir, batch sizes) come from this command line.
    for key, value in (cfg.get("data") or {}).items():
        if key in data_cfg:
            data_cfg[key] = value
    dm = build_datamodule(data_cfg)
    dm.check_available()
    net = build_net(stored.model, dm)
    load_data(dm)
    which = f"{ckpt_path} (the run's best checkpoint)" if best is not None else str(ckpt_path)
    announce("eval", f"{which}: {describe_net(net)} on {describe_data(stored, dm)}", cfg)
    loss = build_loss(stored)
    check_checkpoint_fits(ckpt_path, Classifier(net=net, num_classes=dm.num_classes, loss=loss), ckpt)
    del ckpt
    model = Classifier.load_from_checkpoint(ckpt_path, map_location="cpu", net=net, loss=loss, weights_only=True)

    loggers = _instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = build_trainer(
        cfg.trainer,
        logger=loggers or False,
        callbacks=_instantiate_group(cfg.get("callbacks"), "callbacks"),
    )
    log_hparams(loggers, flat_hparams(stored), metrics=("test/acc", "test/loss"), layout=False)  # no curves to chart
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = as_floats(trainer.callback_metrics)
    report(metrics, cfg)
    return metrics

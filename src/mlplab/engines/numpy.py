"""The NumPy engine (``engine=numpy``, set by ``model=numpy_mlp``): train the lessons' NumPy network (:mod:`mlplab.numpy_net`) from a config.

Same DataModule, split, seed and output dir as the other engines; the loop is Lesson C's:
shuffled mini-batches of ``data.batch_size`` (1: per-sample SGD as in Lesson A), plain
gradient descent with ``optimizer.lr`` for ``trainer.max_epochs`` epochs, squared error.
Per epoch it logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` and
``val/acc_best`` to TensorBoard (when ``logger`` has ``tensorboard``), keeps the weights of
the best validation accuracy (``<output_dir>/numpy_net_best.npz``) and tests those.
Losses are mean per-sample ``1/2 * sum (y - d)^2``, the same numbers as ``loss=mse``.

``trainer.fast_dev_run`` (``debug=fdr``) is honoured as Lightning does: ``n`` batches (true:
1) of training in one epoch, validation and test on ``n`` evaluation batches, no weights
file, no TensorBoard. The other Lightning-only trainer settings (``limit_*_batches``,
``overfit_batches``, ``max_steps``, ...) are refused, as ``engine=ignite`` refuses them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlplab.data import TensorDataModule
from mlplab.engines.limits import check_trainer, fast_dev_batches
from mlplab.errors import ConfigError
from mlplab.hparams import HPARAM_METRICS, flat_hparams, write_hparams_summary
from mlplab.numpy_net import NumpyMLP
from mlplab.runs import mark_training_started

REQUIRED = (
    "loss=mse loss.label_smoothing=0 scheduler=none optimizer=sgd optimizer.momentum=0 "
    "optimizer.weight_decay=0 augment=none"
)


def _check(cfg: DictConfig) -> None:
    """The NumPy net knows one loss and plain gradient descent: refuse settings it would ignore."""
    loss = OmegaConf.select(cfg, "loss._target_", default=None)
    opt = cfg.optimizer
    ok = (
        loss is not None
        and loss.endswith("SquaredError")
        and not OmegaConf.select(cfg, "loss.label_smoothing", default=0)
        and not cfg.get("scheduler")
        and opt.get("_target_") == "torch.optim.SGD"
        and not opt.get("momentum")
        and not opt.get("weight_decay")
        and not opt.get("nesterov")
        and not OmegaConf.select(cfg, "data.augment", default=None)
    )
    if not ok:
        raise ConfigError(
            f"model=numpy_mlp trains with squared error and plain gradient descent only (got loss={loss}, "
            f"optimizer={opt.get('_target_')} momentum={opt.get('momentum')}, scheduler={'set' if cfg.get('scheduler') else 'none'}); "
            f"allowed: {REQUIRED} (as experiment=digits_numpy sets; recipe=none drops a dataset's recipe)"
        )


def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    x, y = ds.tensors
    return x.reshape(x.size(0), -1).cpu().double().numpy(), y.cpu().numpy()


def _evaluate(net: NumpyMLP, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean per-sample loss, accuracy)."""
    return net.loss(x, net.targets(y), reduction="mean"), float(np.mean(net.predict(x) == y))


def fit(cfg: DictConfig, dm: TensorDataModule, net: NumpyMLP, ckpt_path: Path | None = None) -> dict[str, float]:
    if ckpt_path is not None or cfg.get("resume"):
        raise ConfigError(
            "engine=numpy cannot resume (resume=, ckpt_path=); allowed: engine=lightning with another model"
        )
    _check(cfg)
    check_trainer(cfg, engine="engine=numpy")
    fast_dev_run = fast_dev_batches(cfg)  # 0, or: n batches of each stage, one epoch, nothing kept
    mark_training_started()
    out_dir = Path(cfg.paths.output_dir)
    lr = float(cfg.optimizer.lr)
    epochs = 1 if fast_dev_run else int(cfg.trainer.max_epochs)
    dm.setup("fit")
    x_train, y_train = _arrays(dm.data_train)
    x_val, y_val = _arrays(dm.data_val)
    rng = np.random.default_rng(int(cfg.seed))
    if fast_dev_run:  # n random training batches; the first n evaluation batches
        keep = rng.permutation(len(y_train))[: fast_dev_run * dm.batch_size]
        x_train, y_train = x_train[keep], y_train[keep]
        x_val, y_val = x_val[: fast_dev_run * dm.eval_batch_size], y_val[: fast_dev_run * dm.eval_batch_size]
    d_train = net.targets(y_train)
    writer = None
    if cfg.get("logger") and "tensorboard" in cfg.logger and not fast_dev_run:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir))  # the run dir names the TensorBoard run
        write_hparams_summary(writer, flat_hparams(cfg), HPARAM_METRICS)
    steps_per_epoch = -(-len(y_train) // dm.batch_size)
    best_acc, best = -1.0, copy.deepcopy(net)
    result: dict[str, float] = {}
    for epoch in range(epochs):
        train_loss = net.train_epoch(x_train, d_train, lr, dm.batch_size, rng)
        _, train_acc = _evaluate(net, x_train, y_train)
        val_loss, val_acc = _evaluate(net, x_val, y_val)
        if val_acc > best_acc:
            best_acc, best = val_acc, copy.deepcopy(net)
        result = {
            "train/loss": train_loss,
            "train/acc": train_acc,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "val/acc_best": best_acc,
        }
        if writer is not None:
            for key, value in result.items():
                writer.add_scalar(key, value, (epoch + 1) * steps_per_epoch)
    if not fast_dev_run:
        np.savez(out_dir / "numpy_net_best.npz", *best.weights, *[b for b in best.biases if b is not None])
    if cfg.get("test", True):
        x_test, y_test = _arrays(dm.data_test)
        if fast_dev_run:
            x_test, y_test = x_test[: fast_dev_run * dm.eval_batch_size], y_test[: fast_dev_run * dm.eval_batch_size]
        result["test/loss"], result["test/acc"] = _evaluate(best, x_test, y_test)
        if writer is not None:
            for key in ("test/loss", "test/acc"):
                writer.add_scalar(key, result[key], epochs * steps_per_epoch)
    if writer is not None:
        writer.close()
    result["epochs"] = float(epochs)
    return result

"""One LightningModule that trains any net with cross-entropy and an optimizer from config."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class Classifier(L.LightningModule):
    """Cross-entropy classification of ``net``'s outputs.

    Metrics are torchmetrics objects, accumulated on the module's device each step and
    logged once per epoch (no host sync inside a step). Logged: ``train/loss``,
    ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/loss``, ``test/acc``.

    Args:
        net: any ``nn.Module`` mapping a batch of inputs to ``num_classes`` logits.
        num_classes: number of classes.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_: true`` config).
        scheduler: optional ``optimizer -> LRScheduler``, stepped once per epoch; one that takes
            ``total_steps`` (``OneCycleLR``) gets the run's step count and steps every batch.
        config: the run's resolved config, stored in every checkpoint so that ``eval.py``
            can rebuild data and net from the checkpoint alone.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        # The config goes into checkpoints; loggers get a flat hparams view from train().
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()

        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], loss_metric: MeanMetric, acc_metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        # Weighted by batch size: the epoch value is the exact mean over samples.
        loss_metric.update(loss.detach(), weight=y.numel())
        acc_metric.update(logits.detach(), y)
        return loss

    def on_train_start(self) -> None:
        # The sanity check's validation batches must not count towards the best accuracy.
        self.val_acc_best.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, self.train_loss, self.train_acc)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_loss, self.val_acc)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())  # compute() is synced across ranks
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_loss, self.test_acc)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("Classifier was built without an optimizer; it can evaluate but not train")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        if _takes_total_steps(self.scheduler_factory):
            # One-cycle style schedules span the whole run and step after every batch.
            scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}


def _takes_total_steps(factory: Callable) -> bool:
    """A scheduler factory that wants ``total_steps`` (e.g. ``OneCycleLR``) and was not given one."""
    keywords = getattr(factory, "keywords", {}) or {}
    target = getattr(factory, "func", factory)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "total_steps" in params and keywords.get("total_steps") is None

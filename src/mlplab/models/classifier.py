"""One LightningModule that trains any net with a loss and an optimizer from config."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MaxMetric

from mlplab.errors import DivergenceError
from mlplab.lightning_ext.fastpath import (
    StepHooks,
    advance_logging_step,
    backward_and_step,
    carry_step_count,
    direct_steps_possible,
)
from mlplab.models.losses import ClassificationLoss, CrossEntropy
from mlplab.models.metrics import EpochStats

log = logging.getLogger(__name__)
OptimizerFactory = Callable[..., torch.optim.Optimizer]


class Classifier(L.LightningModule):
    """Classification of ``net``'s outputs with ``loss`` (cross-entropy by default).

    Metrics are torchmetrics objects, accumulated on the module's device each step and
    logged once per epoch (no host sync inside a step). Logged: ``train/loss``,
    ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/loss``, ``test/acc``.

    Args:
        net: any ``nn.Module`` mapping a batch of inputs to ``num_classes`` outputs (or one, for 2 classes).
        num_classes: number of classes.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_: true`` config).
        scheduler: optional ``optimizer -> LRScheduler``, stepped once per epoch; one that takes
            ``total_steps`` (``OneCycleLR``) gets the run's step count and steps every batch.
        config: the run's resolved config, stored in every checkpoint so that ``eval.py``
            can rebuild data and net from the checkpoint alone.
        loss: a :class:`~mlplab.models.losses.ClassificationLoss` (``CrossEntropy`` when None);
            it also maps the net's outputs to class scores (``forward`` returns those).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        config: dict | None = None,
        loss: ClassificationLoss | None = None,
    ) -> None:
        super().__init__()
        # The config goes into checkpoints; loggers get a flat hparams view from train().
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "loss"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = loss if loss is not None else CrossEntropy()

        # Lean per-step metrics (loss and accuracy in one update): no input validation or
        # NaN checks (each a host sync).
        self.train_stats, self.val_stats, self.test_stats = EpochStats(), EpochStats(), EpochStats()
        # The best validation accuracy so far is part of the training state: it goes into
        # checkpoints, so a resumed run continues from it.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)
        # The training losses since the last check (detached, on the device) and their global
        # steps, read by check_finite (before each validation and checkpoint), never in a step.
        self._losses: list[Tensor] = []
        self._loss_steps: list[int] = []
        self._epoch_lr = float("nan")
        # Optimizer steps per training_step call (see fuse_steps); 1: Lightning's own loop.
        self.steps_per_call = 1
        self.micro_batch_size = 0
        self._scheduler: Any = None
        self._planned_t_max: int | None = None
        self._scheduler_interval: str | None = None
        # Fused steps bypass Lightning's per-step dispatch where that changes nothing (on_train_start).
        self._direct_steps = False

    def forward(self, x: Tensor) -> Tensor:
        """Class scores (``num_classes`` columns; arg-max = the predicted class)."""
        return self.criterion.scores(self.net(x))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The DataModules keep every split on this device already (moved once, in setup):
        # skip Lightning's generic walk over the batch.
        if isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _step(self, batch: tuple[Tensor, Tensor], stats: EpochStats) -> Tensor:
        x, y = batch
        outputs = self.net(x)
        loss = self.criterion(outputs, y)
        # Accumulated on the device; weighted by batch size, so the epoch value is the exact
        # mean over samples. Nothing is logged (and nothing synced) until the epoch ends.
        stats.update(loss, self.criterion.scores(outputs), y)
        return loss

    def check_finite(self) -> None:
        """Raise :class:`DivergenceError` if a training loss or a weight is not finite.

        One host sync; called before every validation and every checkpoint save, so a
        diverged run stops there and no checkpoint ever receives non-finite weights.
        Under DDP every rank learns whether any rank diverged.
        """
        params_finite = torch.stack([p.detach().isfinite().all() for p in self.parameters()]).all()
        losses = self._joined_losses() if self._losses else params_finite.new_zeros(0)
        losses_bad = losses.isfinite().logical_not()
        local_bad = bool(losses_bad.any() | params_finite.logical_not())
        if not self.trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            self._losses, self._loss_steps = [], []
            return
        first = losses_bad.nonzero()
        where = (
            f"loss at step {self._loss_steps[int(first[0])]}" if len(first) else f"weights by step {self.global_step}"
        )
        raise DivergenceError.training(
            where,
            self.current_epoch,
            self._epoch_lr,
            allowed="a smaller optimizer.lr (or gradient clipping, trainer.gradient_clip_val)",
        )

    def _log_epoch(self, stage: str, stats: EpochStats) -> Tensor:
        """Log ``<stage>/loss`` and ``<stage>/acc`` (computed across ranks), reset, return the accuracy."""
        loss, acc = stats.compute()
        stats.reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc}, prog_bar=stage != "test", sync_dist=True)
        return acc

    def on_train_epoch_start(self) -> None:
        # For the divergence message (an epoch scheduler has stepped by the time it is checked).
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
        if len(self._losses) > 1:  # no check since the last epoch (no validation): keep one tensor
            self._losses = [self._joined_losses()]

    def fuse_steps(self, steps_per_call: int, batch_size: int) -> None:
        """Take ``steps_per_call`` optimizer steps per ``training_step`` call.

        The training batch is then a block of up to ``steps_per_call * batch_size`` rows
        (the DataModule's ``steps_per_call``), cut here into the minibatches of
        ``batch_size`` the DataModule would have served one by one -- the same samples in
        the same order, so the same training. Each step is a manual optimization step
        (``manual_backward``, ``LightningOptimizer.step``): precision plugins, the backward
        and optimizer-step hooks of callbacks (gradient norms) and the global step count
        behave as before. On one device in 32-bit precision without a profiler,
        :func:`mlplab.lightning_ext.fastpath.backward_and_step` makes the same calls without
        Lightning's dispatch. What is amortised over the block is Lightning's per-batch loop.
        """
        self.steps_per_call, self.micro_batch_size = steps_per_call, batch_size
        self.automatic_optimization = steps_per_call == 1

    def on_train_start(self) -> None:
        self._direct_steps = direct_steps_possible(self.trainer, self)
        self._replan_schedule()

    def _replan_schedule(self) -> None:
        """A cosine schedule restored from a checkpoint planned for another length follows this run's.

        ``resume=<dir> trainer.max_epochs=20`` trains longer: the restored ``T_max`` (the old
        length) would leave the added epochs at lr 0. The schedule becomes the one this run
        planned, as if it had been planned so from the start (the lr of the current epoch on
        the new curve); a schedule that spans the run's steps (one-cycle) is refused before
        training instead (:func:`mlplab.engines.checkpoints.check_schedule_plan`).
        """
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            planned = self._planned_t_max
            if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or planned in (
                None,
                scheduler.T_max,
            ):
                continue
            before, scheduler.T_max = scheduler.T_max, planned
            epoch = scheduler.last_epoch
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = (
                    scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * epoch / planned)) / 2
                )
            log.info(
                "the cosine lr schedule is re-planned for %d epochs (the checkpoint's was planned for %d): "
                "epoch %d continues at lr %.6g",
                planned,
                before,
                epoch,
                scheduler.optimizer.param_groups[0]["lr"],
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self.steps_per_call > 1:
            return self._fused_training_step(batch)
        return self._train_step(batch)

    def _train_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """One minibatch's loss, with its metrics and, for the divergence guard, the loss
        and its global step recorded (no device op but a detach, no sync)."""
        self._loss_steps.append(self.global_step)
        loss = self._step(batch, self.train_stats)
        self._losses.append(loss.detach())
        return loss

    def _joined_losses(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in self._losses])

    def _fused_training_step(self, batch: tuple[Tensor, Tensor]) -> None:
        trainer = self.trainer
        optimizer = self.optimizers()
        net, criterion = self.net, self.criterion
        step_scheduler = self._scheduler if self._scheduler_interval == "step" else None
        hooks = StepHooks(trainer, self) if self._direct_steps else None
        # Each iteration is one optimizer step, counted by Lightning (global_step + 1).
        first_step = step = self.global_step
        last_step = trainer.max_steps if trainer.max_steps >= 0 else math.inf
        losses, outputs, sizes = [], [], []
        for x, y in zip(batch[0].split(self.micro_batch_size), batch[1].split(self.micro_batch_size)):
            self._loss_steps.append(step)
            out = net(x)
            loss = criterion(out, y)
            losses.append(loss.detach())
            outputs.append(out.detach())
            sizes.append(len(y))
            if hooks is not None:
                optimizer.optimizer.zero_grad()  # what the wrapper's zero_grad comes down to
                backward_and_step(loss, optimizer, hooks)
            else:
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()
            step += 1
            if step >= last_step:
                break
        # The block's metrics in one update (each torchmetrics update has a wrapper's cost),
        # and its losses for the divergence guard as one tensor.
        self.train_stats.update(losses, self.criterion.scores(torch.cat(outputs)), batch[1][: sum(sizes)], sizes)
        self._losses.append(torch.stack(losses))
        # Lightning's logging step counts optimizer steps, as in its own loop.
        advance_logging_step(trainer, step - first_step - 1)
        # An epoch-interval schedule steps after the epoch's last batch, before validation
        # (and its checkpoint), as Lightning's loop does.
        if self._scheduler is not None and self._scheduler_interval == "epoch":
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                self._scheduler.step()

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.check_finite()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written with another steps_per_call (ckpt_path=) counts its steps
        # under the other optimization mode.
        carry_step_count(checkpoint, self.automatic_optimization)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.check_finite()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_stats)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_stats)

    def on_validation_epoch_end(self) -> None:
        acc = self._log_epoch("val", self.val_stats)
        # The sanity check's validation batches do not count towards the best accuracy.
        if not self.trainer.sanity_checking:
            self.val_acc_best(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_stats)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_stats)

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("Classifier was built without an optimizer; it can evaluate but not train")
        optimizer = self.optimizer_factory(params=self.parameters())
        self._scheduler, self._scheduler_interval = None, None
        if self.scheduler_factory is None:
            return optimizer
        scheduler, interval = build_scheduler(self.scheduler_factory, optimizer, total_steps=self._total_steps)
        self._planned_t_max = getattr(scheduler, "T_max", None)  # before a checkpoint's state replaces it
        if not self.automatic_optimization:  # fused steps: stepped in _fused_training_step
            self._scheduler, self._scheduler_interval = scheduler, interval
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _total_steps(self) -> int:
        """Optimizer steps in the whole run (for a schedule that spans it)."""
        if self.automatic_optimization:
            return int(self.trainer.estimated_stepping_batches)
        # Lightning counts blocks here; a block holds steps_per_call minibatches.
        steps = self.trainer.datamodule.train_steps_per_epoch() * self.trainer.max_epochs
        return min(steps, self.trainer.max_steps) if self.trainer.max_steps >= 0 else steps


def build_scheduler(
    factory: Callable, optimizer: torch.optim.Optimizer, total_steps: Callable[[], int]
) -> tuple[Any, str]:
    """The scheduler and how often to step it: ``"step"`` or ``"epoch"``.

    A schedule that takes ``total_steps`` (``OneCycleLR``) and was not given one spans the
    whole run (``total_steps()``, asked only then) and steps after every batch; any other
    steps once per epoch.
    """
    keywords = getattr(factory, "keywords", {}) or {}
    try:
        params = inspect.signature(getattr(factory, "func", factory)).parameters
    except (TypeError, ValueError):
        params = {}
    if "total_steps" in params and keywords.get("total_steps") is None:
        return factory(optimizer, total_steps=total_steps()), "step"
    return factory(optimizer), "epoch"

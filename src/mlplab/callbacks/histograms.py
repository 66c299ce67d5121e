"""Histograms of each layer's weights (Lesson B: initialisation, and how training moves it)."""

from __future__ import annotations

from typing import Any

import lightning as L

from mlplab.callbacks.gradients import layer_weights
from mlplab.callbacks.plotting import tensorboard_writer
from mlplab.tensorboard_view import diagnostic
from mlplab.validation import positive_int


class WeightHistograms(L.Callback):
    """TensorBoard histograms ``~diagnostics/weights/layer_01``, ... (and ``~diagnostics/gradients/layer_01``, ...).

    Layers are numbered as in :class:`~mlplab.callbacks.GradientNorms` (weight matrices,
    input side first). Weights are logged when training starts (the initialisation), at
    the end of training, and after every ``every_n_epochs``-th epoch (null: only those
    two). With ``gradients=true``, also the gradients of each such epoch's last step
    (Lightning frees them before validation, so they are taken right after that step).
    TensorBoard only; a histogram of a 784x512 layer costs a few milliseconds.
    """

    def __init__(self, every_n_epochs: int | None = None, gradients: bool = False) -> None:
        super().__init__()
        self.every_n_epochs = (
            None
            if every_n_epochs is None
            else positive_int("callbacks.weight_histograms.every_n_epochs", every_n_epochs)
        )
        self.gradients = bool(gradients)
        self._last_step: int | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for i, (_, p) in enumerate(layer_weights(pl_module), start=1):
            values = p if what == "weights" else p.grad
            if values is not None:
                writer.add_histogram(
                    diagnostic(f"{what}/layer_{i:02d}"), values.detach().float().cpu(), global_step=trainer.global_step
                )
        if what == "weights":
            self._last_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "weights")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.gradients and batch_idx + 1 == trainer.num_training_batches and self._due(trainer):
            self._log(trainer, pl_module, "gradients")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            self._log(trainer, pl_module, "weights")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self._log(trainer, pl_module, "weights")

"""Histograms of each layer's weights (Lesson B: initialisation, and how training moves it)."""

from __future__ import annotations

import lightning as L

from mlplab.callbacks.gradients import layer_weights
from mlplab.callbacks.plotting import tensorboard_writer
from mlplab.validation import positive_int


class WeightHistograms(L.Callback):
    """TensorBoard histograms ``weights/layer_01``, ... (and ``gradients/layer_01``, ...).

    Layers are numbered as in :class:`~mlplab.callbacks.GradientNorms` (weight matrices,
    input side first). Logged when training starts (the initialisation) and after every
    ``every_n_epochs``-th epoch; with ``gradients=true`` also the gradients of the
    epoch's last step. TensorBoard only; nothing happens during a step.
    """

    def __init__(self, every_n_epochs: int = 1, gradients: bool = False) -> None:
        self.every_n_epochs = positive_int("callbacks.weight_histograms.every_n_epochs", every_n_epochs)
        self.gradients = bool(gradients)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, with_gradients: bool) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for i, (_, p) in enumerate(layer_weights(pl_module), start=1):
            writer.add_histogram(f"weights/layer_{i:02d}", p.detach().float().cpu(), global_step=trainer.global_step)
            if with_gradients and p.grad is not None:
                writer.add_histogram(
                    f"gradients/layer_{i:02d}", p.grad.detach().float().cpu(), global_step=trainer.global_step
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, with_gradients=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(trainer, pl_module, with_gradients=self.gradients)

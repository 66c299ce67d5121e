"""At test end: a grid of misclassified test images, titled with predicted and true class names."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from mlplab.callbacks.plotting import (
    FONT_SIZE,
    class_names,
    image_grid,
    input_shape,
    is_image_shape,
    log_figure,
    tensorboard_writer,
)
from mlplab.validation import positive_int


class MisclassifiedImages(L.Callback):
    """The first ``max_images`` test images the model gets wrong, as image ``test/misclassified``.

    Each picture is titled ``<predicted>`` over ``(<true>)``, in red. Image data only
    (the DataModule's ``input_shape`` is ``(C, H, W)`` or ``(H, W)``) and TensorBoard
    only; under DDP, rank 0's share of the test set. Collection stops once the grid is full.
    """

    def __init__(self, max_images: int = 24, ncols: int = 6) -> None:
        super().__init__()
        self.max_images = positive_int("callbacks.misclassified.max_images", max_images)
        self.ncols = positive_int("callbacks.misclassified.ncols", ncols)
        self._images: list[Tensor] = []
        self._preds: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._count = 0
        self._active = False
        #: How many images the last test's grid showed.
        self.num_logged = 0

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._preds, self._targets, self._count = [], [], [], 0
        self.num_logged = 0
        self._active = tensorboard_writer(trainer) is not None and is_image_shape(input_shape(trainer))

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or self._count >= self.max_images:
            return
        x, y = batch[0], batch[1]
        preds = pl_module(x).argmax(dim=1)
        wrong = (preds != y).nonzero().flatten()[: self.max_images - self._count].cpu()
        if wrong.numel():
            self._images.append(x[wrong.to(x.device)].cpu())
            self._preds.append(preds[wrong.to(x.device)].cpu())
            self._targets.append(y[wrong.to(x.device)].cpu())
            self._count += wrong.numel()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if not self._active or writer is None or not self._count:
            return
        images, preds, targets = torch.cat(self._images), torch.cat(self._preds), torch.cat(self._targets)
        names = class_names(trainer, int(max(preds.max(), targets.max())) + 1)
        titles = [f"{names[p]}\n({names[t]})" for p, t in zip(preds.tolist(), targets.tolist())]
        fig = image_grid(images, titles, input_shape(trainer), colors=["red"] * len(titles), ncols=self.ncols)
        fig.suptitle("misclassified test images: predicted (true)", fontsize=FONT_SIZE)
        log_figure(writer, "test/misclassified", fig, trainer.global_step)
        self.num_logged = len(titles)
        self._images, self._preds, self._targets = [], [], []

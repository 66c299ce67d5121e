"""When training starts: a grid of sample training inputs with their class names."""

from __future__ import annotations

import lightning as L
import torch

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


class SampleInputs(L.Callback):
    """The first ``num_images`` training inputs, as the model sees them (after
    normalisation), titled with their class names: image ``train/samples``.

    Read from the training dataset by index (the sampler's order is not touched, so the
    run's batches are the same with or without it). Image data and TensorBoard only.
    """

    def __init__(self, num_images: int = 24, ncols: int = 6) -> None:
        super().__init__()
        self.num_images = positive_int("callbacks.sample_inputs.num_images", num_images)
        self.ncols = positive_int("callbacks.sample_inputs.ncols", ncols)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        shape = input_shape(trainer)
        if writer is None or not is_image_shape(shape):
            return
        dataset = trainer.train_dataloader.dataset
        n = min(self.num_images, len(dataset))
        items = [dataset[i] for i in range(n)]
        images = torch.stack([item[0] for item in items])
        labels = [int(item[1]) for item in items]
        names = class_names(trainer, max(labels) + 1)
        fig = image_grid(images, [names[y] for y in labels], shape, ncols=self.ncols)
        fig.suptitle("training inputs (after preprocessing)", fontsize=FONT_SIZE)
        log_figure(writer, "train/samples", fig, trainer.global_step)

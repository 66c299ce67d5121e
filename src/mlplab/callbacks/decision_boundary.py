"""Two-dimensional inputs (moons, XOR): the model's decision regions with the data on top."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from mlplab.callbacks.plotting import (
    FIGURE_WIDTH,
    FONT_SIZE,
    class_names,
    log_figure,
    new_figure,
    style_axes,
    tensorboard_writer,
)
from mlplab.validation import positive_int


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """All ``(inputs, labels)`` of a map-style dataset (its ``tensors`` when it has them)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[0], tensors[1]
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([torch.as_tensor(it[0]) for it in items]), torch.as_tensor([int(it[1]) for it in items])


@torch.no_grad()
def predict_grid(
    model: torch.nn.Module, x: Tensor, resolution: int, margin: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xx, yy, classes)``: the predicted class on a ``resolution``² grid around the points ``x`` (N, 2)."""
    x = x.detach().float().reshape(len(x), 2).cpu()
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    pad = (hi - lo).clamp_min(1e-6) * margin
    lo, hi = lo - pad, hi + pad
    gx = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    gy = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        classes = model(grid.to(device)).argmax(dim=1).cpu()
    finally:
        model.train(was_training)
    return xx.numpy(), yy.numpy(), classes.reshape(resolution, resolution).numpy()


def boundary_figure(
    xx: np.ndarray, yy: np.ndarray, classes: np.ndarray, x: Tensor, y: Tensor, names: Sequence[str], title: str
) -> Any:
    """Filled decision regions, the points coloured by their true class."""
    from matplotlib.colors import ListedColormap

    k = len(names)
    colors = [f"C{i % 10}" for i in range(k)]
    cmap = ListedColormap(colors)
    fig = new_figure(FIGURE_WIDTH, 4.2)
    ax = fig.add_subplot()
    ax.contourf(xx, yy, classes, levels=np.arange(-0.5, k), cmap=cmap, alpha=0.3)
    pts, labels = x.detach().float().reshape(len(x), 2).cpu().numpy(), y.cpu().numpy()
    for c in range(k):
        sel = labels == c
        if sel.any():
            ax.scatter(
                pts[sel, 0], pts[sel, 1], s=12, color=colors[c], edgecolors="black", linewidths=0.3, label=names[c]
            )
    ax.legend(fontsize=FONT_SIZE - 1, loc="best")
    ax.set_title(title)
    style_axes(ax)
    return fig


class DecisionBoundary(L.Callback):
    """Image ``train/decision_boundary`` every ``every_n_epochs`` epochs and at the end of
    training (the training points), and ``test/decision_boundary`` at test end (the test
    points, the tested weights). Only for two-dimensional inputs (the DataModule's
    ``input_dim == 2``); otherwise it does nothing. TensorBoard only.
    """

    def __init__(self, every_n_epochs: int = 10, resolution: int = 200) -> None:
        super().__init__()
        self.every_n_epochs = positive_int("callbacks.decision_boundary.every_n_epochs", every_n_epochs)
        self.resolution = positive_int("callbacks.decision_boundary.resolution", resolution)
        self._last_drawn: int | None = None

    @staticmethod
    def applies(trainer: L.Trainer) -> bool:
        return trainer.datamodule is not None and getattr(trainer.datamodule, "input_dim", None) == 2

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Any, tag: str, title: str) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not self.applies(trainer):
            return
        x, y = dataset_tensors(dataset)
        names = class_names(trainer, int(y.max()) + 1)
        xx, yy, classes = predict_grid(pl_module, x, self.resolution)
        log_figure(writer, tag, boundary_figure(xx, yy, classes, x, y, names, title), trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs == 0:
            self._draw(
                trainer, pl_module, trainer.train_dataloader.dataset, "train/decision_boundary", f"epoch {epoch}"
            )
            self._last_drawn = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_drawn != trainer.global_step:
            self._draw(
                trainer, pl_module, trainer.train_dataloader.dataset, "train/decision_boundary", "end of training"
            )
            self._last_drawn = trainer.global_step

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is not None:
            self._draw(trainer, pl_module, loader.dataset, "test/decision_boundary", "test set")

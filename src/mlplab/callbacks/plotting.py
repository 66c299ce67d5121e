"""What the diagnostics callbacks share: the TensorBoard writer, the data's metadata, figures.

Images, histograms and text go to TensorBoard only: with no ``TensorBoardLogger`` (or on a
rank other than 0 under DDP) :func:`tensorboard_writer` returns ``None`` and the callbacks
skip that work. Figures are drawn with matplotlib's object API (no ``pyplot`` state, no
GUI backend) and rendered to an RGB array with the Agg canvas.

Sizes: TensorBoard shows an image at most as wide as its card (the Time Series tab's cards
are 335 px and up; an image is scaled down to fit), so figures are at most
:data:`FIGURE_WIDTH` inches at 100 dpi (480 px) and their text is :data:`FONT_SIZE` points
(14 px, about 10 px on the narrowest card).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def tensorboard_writer(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the run's first TensorBoard logger, on rank 0; else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def class_names(trainer: L.Trainer, num_classes: int | None = None) -> list[str]:
    """The DataModule's ``class_names``; ``"0" .. "K-1"`` when it has none."""
    names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
    if names:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes or 0)]


def input_shape(trainer: L.Trainer) -> tuple[int, ...] | None:
    """The DataModule's ``input_shape`` (e.g. ``(1, 28, 28)`` or ``(2,)``), or None."""
    shape = getattr(trainer.datamodule, "input_shape", None) if trainer.datamodule is not None else None
    return tuple(int(s) for s in shape) if shape else None


def is_image_shape(shape: tuple[int, ...] | None) -> bool:
    """``(C, H, W)`` with 1 or 3 channels, or ``(H, W)``: something to draw as a picture."""
    if not shape:
        return False
    return (len(shape) == 3 and shape[0] in (1, 3)) or len(shape) == 2


#: Inches (at :data:`DPI`) of a figure's width: 480 px, whole on a TensorBoard image card.
FIGURE_WIDTH = 4.8
DPI = 100
#: Points of every text in a figure: tick labels, titles, counts.
FONT_SIZE = 10.0


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, FIGURE_WIDTH), height), dpi=DPI, layout="constrained")


def style_axes(ax: Any, fontsize: float = FONT_SIZE) -> None:
    """Title, axis labels and tick labels of ``ax`` in ``fontsize`` points."""
    for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
        text.set_fontsize(fontsize)
    ax.tick_params(labelsize=fontsize)


def figure_to_array(fig: Any) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB rendering of a matplotlib figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(writer: Any, tag: str, fig: Any, step: int) -> np.ndarray:
    """Render ``fig`` and log it as image ``tag``; returns the pixels."""
    pixels = figure_to_array(fig)
    writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
    return pixels


def _as_picture(x: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """One input as ``(H, W)`` or ``(H, W, 3)``, scaled to [0, 1] for display."""
    img = x.detach().float().cpu().reshape(shape)
    if img.dim() == 3:
        img = img[0] if img.size(0) == 1 else img.permute(1, 2, 0)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    return img.numpy()


def image_grid(
    images: Tensor,
    titles: Sequence[str],
    shape: tuple[int, ...],
    colors: Sequence[str] | None = None,
    ncols: int = 6,
) -> Any:
    """A figure :data:`FIGURE_WIDTH` wide with the inputs tiled in one picture, each titled
    (e.g. ``"Shirt\n(Coat)"``) in :data:`FONT_SIZE` points: fewer than ``ncols`` columns
    where the titles are too long for that.

    One Axes holding one mosaic, titles as text above each tile: drawing 32 separate
    subplots takes seconds, this a tenth of one.
    """
    n = len(images)
    longest = max((len(line) for t in titles for line in t.split("\n")), default=1)
    fit = int(FIGURE_WIDTH * 72 / (max(longest, 4) * 0.62 * FONT_SIZE))  # columns whose titles fit their tile
    ncols = max(1, min(ncols, n, fit))
    nrows = max(1, math.ceil(n / ncols))
    pictures = [_as_picture(images[i], shape) for i in range(n)]
    h, w = pictures[0].shape[:2]
    gap = max(1, round(0.08 * w))  # input pixels between tiles
    inch = FIGURE_WIDTH / (ncols * (w + gap) + gap)  # inches per input pixel
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    band = round((lines * FONT_SIZE * 1.2 / 72 + 0.04) / inch)  # room above each tile for its title
    cell_h, cell_w = h + band, w + gap
    mosaic = np.ones((nrows * cell_h + gap, ncols * cell_w + gap, *pictures[0].shape[2:]))
    head = 0.4  # inches on top for a suptitle
    width, height = mosaic.shape[1] * inch, mosaic.shape[0] * inch
    fig = new_figure(width, height + head)
    fig.set_layout_engine("none")
    ax = fig.add_axes((0, 0, 1, height / (height + head)))
    ax.set_axis_off()
    for i, pic in enumerate(pictures):
        r, c = divmod(i, ncols)
        top, left = r * cell_h + band, gap + c * cell_w
        mosaic[top : top + h, left : left + w] = pic
        ax.text(
            left + w / 2,
            top - 1,
            titles[i],
            ha="center",
            va="bottom",
            fontsize=FONT_SIZE,
            color=colors[i] if colors else "black",
            linespacing=1.0,
        )
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    return fig

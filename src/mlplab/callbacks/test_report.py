"""At test end: a confusion-matrix image and a per-class precision/recall/F1 report (torchmetrics)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from mlplab.callbacks.plotting import (
    FIGURE_WIDTH,
    FONT_SIZE,
    class_names,
    log_figure,
    new_figure,
    style_axes,
    tensorboard_writer,
)

log = logging.getLogger(__name__)


def report_rows(confusion: Tensor, precision: Tensor, recall: Tensor, f1: Tensor, names: Sequence[str]) -> list[tuple]:
    """``(class, precision, recall, f1, support)`` per class, then the macro average."""
    support = confusion.sum(dim=1)
    rows = [(n, float(p), float(r), float(f), int(s)) for n, p, r, f, s in zip(names, precision, recall, f1, support)]
    rows.append(("macro avg", float(precision.mean()), float(recall.mean()), float(f1.mean()), int(support.sum())))
    return rows


def format_report(rows: list[tuple], accuracy: float, markdown: bool) -> str:
    """The report as a Markdown table (TensorBoard's text tab) or aligned plain text (the log)."""
    if markdown:
        lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {p:.3f} | {r:.3f} | {f:.3f} | {s} |" for n, p, r, f, s in rows]
        return "\n".join(lines) + f"\n\naccuracy: {accuracy:.4f}"
    width = max(len(str(r[0])) for r in rows)
    lines = [f"{'class':>{width}}  precision  recall     F1  support"]
    lines += [f"{n:>{width}}  {p:9.3f}  {r:6.3f}  {f:5.3f}  {s:7d}" for n, p, r, f, s in rows]
    return "\n".join(lines) + f"\n{'accuracy':>{width}}  {accuracy:.4f}"


class TestReport(L.Callback):
    """Confusion matrix and per-class precision, recall, F1 of the test set.

    Predictions are accumulated on the device during testing (torchmetrics; summed
    across DDP ranks), then at test end: the image ``test/confusion_matrix`` (rows: true
    class, columns: predicted; TensorBoard only), the text ``test/report`` (TensorBoard)
    and the same report in the run's log. Class names come from the DataModule.
    The results stay in ``self.confusion`` and ``self.rows`` for code that wants them.
    """

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        super().__init__()
        self.metrics: MetricCollection | None = None
        self.confusion_metric: MulticlassConfusionMatrix | None = None
        self.confusion: Tensor | None = None
        self.rows: list[tuple] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        k = int(pl_module.hparams.get("num_classes") or len(class_names(trainer)))
        kw: dict[str, Any] = {"num_classes": k, "average": None, "validate_args": False}
        self.metrics = MetricCollection(
            {"precision": MulticlassPrecision(**kw), "recall": MulticlassRecall(**kw), "f1": MulticlassF1Score(**kw)}
        ).to(pl_module.device)
        self.confusion_metric = MulticlassConfusionMatrix(num_classes=k, validate_args=False).to(pl_module.device)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x, y = batch[0], batch[1]
        preds = pl_module(x).argmax(dim=1)
        self.metrics.update(preds, y)
        self.confusion_metric.update(preds, y)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # compute() syncs across ranks: every rank calls it; rank 0 writes.
        values = self.metrics.compute()
        confusion = self.confusion_metric.compute().cpu()
        self.metrics.reset()
        self.confusion_metric.reset()
        if not trainer.is_global_zero:
            return
        names = class_names(trainer, confusion.size(0))
        self.confusion = confusion
        self.rows = report_rows(confusion, values["precision"].cpu(), values["recall"].cpu(), values["f1"].cpu(), names)
        accuracy = float(confusion.diag().sum() / confusion.sum().clamp_min(1))
        log.info("test set, per class:\n%s", format_report(self.rows, accuracy, markdown=False))
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        step = trainer.global_step
        writer.add_text("test/report", format_report(self.rows, accuracy, markdown=True), global_step=step)
        log_figure(writer, "test/confusion_matrix", confusion_figure(confusion, names), step)


def confusion_figure(confusion: Tensor, names: Sequence[str]) -> Any:
    """Counts as a heat map, true class down, predicted class across, :data:`FIGURE_WIDTH` wide;
    counts written in (<= 20 classes), in :data:`FONT_SIZE` points up to 10 classes."""
    k = confusion.size(0)
    fig = new_figure(FIGURE_WIDTH, FIGURE_WIDTH * 0.92)
    ax = fig.add_subplot()
    counts = confusion.numpy()
    im = ax.imshow(counts, cmap="Blues")
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    slanted = max(map(len, names), default=0) > 2  # class names, not digits: slanted to fit
    ax.set_xticks(range(k), labels=list(names), rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(k), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix ({int(counts.sum())} samples)")
    fontsize = FONT_SIZE * min(1.0, 10 / max(k, 1))  # smaller cells beyond 10 classes
    style_axes(ax, max(fontsize, 6.0))
    ax.title.set_fontsize(FONT_SIZE)
    digits = len(str(int(counts.max()))) if counts.size else 1
    fontsize *= min(1.0, 3.5 / digits)  # four-digit counts (MNIST's test set) still inside their cells
    if k <= 20:
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if counts[i, j] > threshold else "black",
                )
    return fig

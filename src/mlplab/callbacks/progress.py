"""The progress bar, counting optimizer steps: fused steps do not show.

With fused steps (``steps_per_call`` > 1) a training batch is a block of several
minibatches, and Lightning's ``TQDMProgressBar`` would count blocks (``Epoch 0: 3/3`` for
a digits epoch of 38 steps). :class:`ProgressBar` counts the optimizer steps instead
(``38/38``), as Lightning's own loop would show them. Same arguments as Lightning's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def _steps_per_call(module: L.LightningModule | None) -> int:
    return int(getattr(module, "steps_per_call", 1) or 1)


class ProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` whose training bar counts optimizer steps."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        if _steps_per_call(self.trainer.lightning_module) > 1 and self.trainer.datamodule is not None:
            return self.trainer.datamodule.train_steps_per_epoch()
        return total

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = _steps_per_call(pl_module)
        if steps == 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        n = int(bar.total) if last and bar.total else (batch_idx + 1) * steps  # the last block may be short
        if self.refresh_rate and (last or n // self.refresh_rate != bar.n // self.refresh_rate):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

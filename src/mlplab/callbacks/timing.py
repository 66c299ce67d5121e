"""Wall time per epoch (training + validation + checkpointing), for benchmarks and logs."""

from __future__ import annotations

import json
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from mlplab.atomic import atomic_write_text
from mlplab.tensorboard_view import diagnostic


class EpochTimer(L.Callback):
    """Records the wall time of each epoch, from one epoch's start to the next one's.

    The times land in ``self.epoch_seconds``, are logged as ``~diagnostics/epoch_seconds`` and, with
    ``out_file``, written as JSON (``{"epoch_seconds": [...]}``, atomically) when fitting ends.
    """

    def __init__(self, out_file: str | None = None, log: bool = True) -> None:
        self.out_file = out_file
        self.log = log
        self.epoch_seconds: list[float] = []
        self._start: float | None = None

    def _close_epoch(self, trainer: L.Trainer) -> None:
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        self.epoch_seconds.append(seconds)
        if self.log and trainer.loggers:
            for logger in trainer.loggers:
                logger.log_metrics({diagnostic("epoch_seconds"): seconds}, step=trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_epoch(trainer)
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_epoch(trainer)
        self._start = None
        self._write()

    @rank_zero_only
    def _write(self) -> None:
        if self.out_file:
            atomic_write_text(self.out_file, json.dumps({"epoch_seconds": self.epoch_seconds}))

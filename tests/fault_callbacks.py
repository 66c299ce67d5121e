"""Test-only callbacks that bring a fault into a real run (used through ``+callbacks.x._target_=...``).

``FillDisk`` fills the filesystem of the run's checkpoints at the start of the epoch named by
``MLPLAB_TEST_FILL_AT_EPOCH``, leaving ``MLPLAB_TEST_FILL_LEAVE`` bytes (default 64 KiB) free:
the next checkpoint no longer fits, a small ``run.json`` still does.
``AnomalyProbe`` logs (at DEBUG) whether torch's anomaly detection is on while training.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L


class FillDisk(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if os.environ.get("MLPLAB_TEST_FILL_AT_EPOCH") != str(trainer.current_epoch):
            return
        folder = Path(trainer.default_root_dir)
        leave = int(os.environ.get("MLPLAB_TEST_FILL_LEAVE", 64 * 1024))
        with (folder / "filler").open("wb") as f:
            while (free := shutil.disk_usage(folder).free) > leave:
                f.write(b"\0" * min(1 << 20, free - leave))
                f.flush()


class AnomalyProbe(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        if batch_idx == 0:
            logging.getLogger("mlplab.test").debug("anomaly detection during training: %s", torch.is_anomaly_enabled())


class SignalAfterFirstJob:
    """A Hydra callback: SIGTERM to this process right after the sweep's first job ended (between two jobs)."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        import signal

        if config.hydra.job.num == 0:
            os.kill(os.getpid(), signal.SIGTERM)

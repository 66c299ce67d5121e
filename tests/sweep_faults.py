"""Test-only callbacks for sweeps whose job processes die or are stopped.

Used by ``tests/test_launcher_faults.py`` through ``+callbacks.<name>._target_=sweep_faults.<Class>``
with ``tests/`` on ``PYTHONPATH`` (the launcher's job processes inherit it).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig


class KillJob(L.Callback):
    """Sweep job number ``job`` sends itself ``sig`` after its first training batch (the others train on)."""

    def __init__(self, job: int, sig: str = "SIGKILL") -> None:
        self.job = job
        self.sig = signal.Signals[sig]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0 and HydraConfig.get().job.num == self.job:
            os.kill(os.getpid(), self.sig)


class Stall(L.Callback):
    """From the first batch of the second epoch (``last.ckpt`` written, signal handlers installed)
    the job process has written its pid to ``<pid_dir>/<pid>``, so a test knows the job is
    training, and each batch takes ``sleep_s`` longer, so it goes on training for a while."""

    def __init__(self, pid_dir: str, sleep_s: float = 0.05) -> None:
        self.pid_dir = Path(pid_dir)
        self.sleep_s = sleep_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            return
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / str(os.getpid())).write_text(str(HydraConfig.get().job.num))
        time.sleep(self.sleep_s)

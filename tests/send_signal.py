"""A test-only callback: the run sends itself a signal at a chosen point.

Used by ``tests/test_resume.py`` through ``+callbacks.send_signal._target_=send_signal.SendSignal``
with ``tests/`` on ``PYTHONPATH``. ``MLPLAB_TEST_SIGNAL=<SIGNAME>:<epoch>:<batch>`` picks the
point (batch -1: at the start of that epoch); unset, the callback does nothing, so a resumed
run (whose stored overrides still name it) runs through unless told otherwise.
"""

from __future__ import annotations

import os
import signal

import lightning as L


class SendSignal(L.Callback):
    def _target(self) -> tuple[signal.Signals, int, int] | None:
        spec = os.environ.get("MLPLAB_TEST_SIGNAL")
        if not spec:
            return None
        name, epoch, batch = spec.split(":")
        return signal.Signals[name], int(epoch), int(batch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        target = self._target()
        if target and target[1] == trainer.current_epoch and target[2] == -1:
            os.kill(os.getpid(), target[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        target = self._target()
        if target and target[1] == trainer.current_epoch and target[2] == batch_idx:
            os.kill(os.getpid(), target[0])

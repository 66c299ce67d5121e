"""A test-only callback: the run sends itself a signal at a chosen point.

Used by ``tests/test_resume.py`` and ``tests/test_faults.py`` through
``+callbacks.send_signal._target_=send_signal.SendSignal`` with ``tests/`` on ``PYTHONPATH``.
``MLPLAB_TEST_SIGNAL=<SIGNAME>[+<SIGNAME>...]:<epoch>:<batch>`` picks the point (batch -1:
at the start of that epoch; epoch ``test``: after that batch of the test stage); several
names send several signals back to back (Ctrl+C twice). Unset, the callback does nothing,
so a resumed run (whose stored overrides still name it) runs through unless told otherwise.
"""

from __future__ import annotations

import os
import signal

import lightning as L


class SendSignal(L.Callback):
    def _target(self) -> tuple[list[signal.Signals], str, int] | None:
        spec = os.environ.get("MLPLAB_TEST_SIGNAL")
        if not spec:
            return None
        names, epoch, batch = spec.split(":")
        return [signal.Signals[n] for n in names.split("+")], epoch, int(batch)

    def _send(self, signals: list[signal.Signals]) -> None:
        for sig in signals:
            os.kill(os.getpid(), sig)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        target = self._target()
        if target and target[1] == str(trainer.current_epoch) and target[2] == -1:
            self._send(target[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        target = self._target()
        if target and target[1] == str(trainer.current_epoch) and target[2] == batch_idx:
            self._send(target[0])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        target = self._target()
        if target and target[1] == "test" and target[2] == batch_idx:
            self._send(target[0])

"""What makes an interrupted run resumable with bit-identical results.

- :class:`RNGState` stores the global torch RNG state (dropout draws from it) in every
  checkpoint and restores it on resume. The data order needs nothing: each epoch's
  permutation is seeded by ``seed + epoch`` (:class:`~mlplab.data.BatchSliceSampler`).
- :class:`StopOnSignal` marks the fit loop for :mod:`mlplab.signals`: there SIGINT (Ctrl+C)
  and SIGTERM stop the run cleanly at the next batch boundary instead of wherever the
  interrupt lands (a half-written file, say). A second signal stops at once.
- :class:`AtomicCheckpointIO` writes each checkpoint to a fresh temporary file and renames
  it into place (:mod:`mlplab.atomic`), so a ``kill -9`` never leaves a truncated ``last.ckpt``.

``last.ckpt`` is written at the end of every epoch (the default callbacks), so an
interrupted run resumes from its last completed epoch and redoes the interrupted one.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mlplab.atomic import atomic_write_bytes, storage_error
from mlplab.signals import JOB

log = logging.getLogger(__name__)


class RNGState(L.Callback):
    """Save and restore the global torch (and CUDA) RNG state with the training state."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state_dict["cuda"]))


class StopOnSignal(L.Callback):
    """Tells :mod:`mlplab.signals` when the fit loop runs, where a signal stops at the next batch.

    Lightning stops a run that received SIGTERM at the next batch boundary by raising
    ``SIGTERMException`` (after the hooks, so the epoch-end checkpoint is complete); the
    job's handler routes SIGINT there too while the fit loop runs. Outside the loop a
    signal stops at once. Used without :func:`mlplab.cli.run_job` (a notebook), it
    installs the handler for the trainer's stages and restores the previous one after.
    """

    def __init__(self) -> None:
        self._owner = False

    @property
    def received(self) -> str | None:
        """The first signal received in this job (``"SIGINT"``, ``"SIGTERM"``), or None."""
        return JOB.received

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning registers its SIGTERM handler, which then calls this one too.
        if not JOB.installed and JOB.install():
            self._owner = True
            JOB.start_job()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        JOB.training = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        JOB.training = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning calls no teardown hook after an exception

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        JOB.training = False
        if self._owner:
            JOB.end_job()
            JOB.uninstall()
            self._owner = False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through :func:`mlplab.atomic.atomic_write_bytes`: whole or absent.

    The checkpoint is serialised in memory (as Lightning's own ``_atomic_save`` does), then
    written to a fresh, exclusively created temporary file beside the target and renamed
    into place: a planted symlink is never written through, and a full disk is one
    :class:`~mlplab.errors.StorageError` line with the earlier checkpoints intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:  # Lightning's TypeError for that argument
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(err, path) from None
        atomic_write_bytes(path, buffer.getbuffer())

"""What makes an interrupted run resumable with bit-identical results.

- :class:`RNGState` stores the global torch RNG state (dropout draws from it) in every
  checkpoint and restores it on resume. The data order needs nothing: each epoch's
  permutation is seeded by ``seed + epoch`` (:class:`~mlplab.data.BatchSliceSampler`).
- :class:`StopOnSignal` makes SIGINT (Ctrl+C) behave like SIGTERM under Lightning's
  signal connector: the run stops cleanly at the next batch boundary instead of wherever
  the interrupt lands (a half-written file, say). A second Ctrl+C stops at once.
- :class:`AtomicCheckpointIO` writes each checkpoint to a fresh temporary file and renames
  it into place (:mod:`mlplab.atomic`), so a ``kill -9`` never leaves a truncated ``last.ckpt``.

``last.ckpt`` is written at the end of every epoch (the default callbacks), so an
interrupted run resumes from its last completed epoch and redoes the interrupted one.
"""

from __future__ import annotations

import io
import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mlplab.atomic import atomic_write_bytes, storage_error

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
    """Route SIGINT to Lightning's SIGTERM handler while the trainer runs.

    Lightning stops a run that received SIGTERM at the next batch boundary by raising
    ``SIGTERMException`` (after the hooks, so the epoch-end checkpoint is complete).
    ``received`` names the signal, for the message.
    """

    def __init__(self) -> None:
        self.received: str | None = None

    def _install(self, trainer: L.Trainer) -> None:
        lightning_handler = signal.getsignal(signal.SIGTERM)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.received == "SIGINT":  # the second Ctrl+C
                raise KeyboardInterrupt
            self._note(signum)
            log.warning("SIGINT: stopping at the next batch (press Ctrl+C again to stop at once)")
            if callable(lightning_handler):
                lightning_handler(signum, frame)

        def on_sigterm(signum: int, frame: Any) -> None:
            self._note(signum)
            if callable(lightning_handler):
                lightning_handler(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, on_sigterm)

    def _note(self, signum: int) -> None:
        self.received = self.received or signal.Signals(signum).name

    # Lightning registers its SIGTERM handler just before the stage runs (and restores
    # the original handlers at teardown); these hooks come after that.
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)


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

"""Lightning's ModelCheckpoint with ``last.ckpt`` at every epoch end.

It overrides private members of Lightning's class, so it lives here; outside the verified
Lightning versions it is Lightning's own ``ModelCheckpoint`` (``last.ckpt`` as that version
writes it; ``resume=`` then continues from it all the same).
"""

from __future__ import annotations

import copy
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from mlplab.lightning_ext import supported


class ModelCheckpoint(_LightningModelCheckpoint):
    """:class:`lightning.pytorch.callbacks.ModelCheckpoint` (same arguments), with two
    changes:

    - **``last.ckpt`` is the last completed epoch** (or validation). Since Lightning 2.6,
      ``last.ckpt`` is written only when a top-k checkpoint was saved at the same step:
      with ``save_top_k=1`` only when the monitored metric improved, so ``resume=`` would
      go back to the best epoch, not the last one. Here it is written at every epoch end
      that saves (Lightning's behaviour before 2.6).
    - **Stored paths stay inside the run** (:meth:`load_state_dict`).
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self._last_due(trainer, at_train_epoch_end=True)
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_skipped(trainer, due)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self._last_due(trainer, at_train_epoch_end=False)
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_skipped(trainer, due)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 writes last.ckpt here even under fast_dev_run, which keeps no checkpoint.
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict) -> None:
        """Stored checkpoint paths are read as names inside this callback's ``dirpath``.

        A run dir that was moved or copied resumes as if it had not moved (Lightning would
        drop ``last_model_path`` and write ``last-v1.ckpt`` beside a stale ``last.ckpt``),
        and a tampered checkpoint cannot point the top-k bookkeeping -- which deletes files
        -- at a path outside this run's checkpoints.
        """
        if self.dirpath:
            state_dict = {**state_dict, "dirpath": self.dirpath}
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state_dict[key] = self._inside(state_dict.get(key))
            best_k = state_dict.get("best_k_models")
            if isinstance(best_k, dict):
                state_dict["best_k_models"] = {self._inside(k): v for k, v in best_k.items() if self._inside(k)}
        super().load_state_dict(state_dict)

    def _inside(self, path: object) -> str:
        """``dirpath/<name>`` for a stored ``.../<name>.ckpt`` path, else ""."""
        name = os.path.basename(path) if isinstance(path, str) else ""
        if not name.endswith(".ckpt") or name.startswith("."):
            return ""
        return os.path.join(self.dirpath, name)

    def _last_due(self, trainer: L.Trainer, at_train_epoch_end: bool) -> bool:
        """Whether this hook is the one where Lightning's epoch-end saving happens."""
        return (
            supported()
            and self.save_last is True
            and not self._should_skip_saving_checkpoint(trainer)
            and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end
        )

    def _save_last_if_skipped(self, trainer: L.Trainer, due: bool) -> None:
        """Save ``last`` if the epoch end was due and Lightning left it out (no top-k save)."""
        saved_now = (
            self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved == self.last_model_path
        )
        if due and not saved_now:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _counts(n: int, *fields: str) -> dict[str, int]:
    return {field: n for field in fields}


def epoch_end_loop_state(epochs: int, steps_per_epoch: int, val_batches: int, schedule: str | None) -> dict:
    """The ``loops`` entry of a checkpoint written at the validation end of epoch
    ``epochs - 1``, after ``epochs`` epochs of ``steps_per_epoch`` optimizer steps, one per
    batch (automatic optimization, ``steps_per_call=1``), ``val_batches`` validation batches,
    and a schedule stepped every ``"step"``, every ``"epoch"`` or never (None).

    This is Lightning's own layout of its loops' progress records (what ``ModelCheckpoint``
    stores; ``tests/test_population_launcher.py`` compares it with a real run's), for
    checkpoints of runs trained outside a Trainer (:mod:`mlplab.engines.population`):
    ``resume=`` then continues them as it continues any run. None with a Lightning version
    this package was not verified against, empty (Lightning then starts such a checkpoint's
    run over instead of continuing it).
    """
    if not supported():
        return {}
    steps = epochs * steps_per_epoch
    rcsp = ("ready", "completed", "started", "processed")
    sched_total, sched_current = {"step": (steps, steps_per_epoch), "epoch": (epochs, 1)}.get(schedule or "", (0, 0))
    empty_batches = {"total": _counts(0, *rcsp), "current": _counts(0, *rcsp), "is_last_batch": False}
    epoch_counts = {"ready": epochs, "completed": epochs - 1, "started": epochs, "processed": epochs}
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": steps},
        "epoch_loop.batch_progress": {
            "total": _counts(steps, *rcsp),
            "current": _counts(steps_per_epoch, *rcsp),
            "is_last_batch": True,
        },
        "epoch_loop.scheduler_progress": {
            "total": _counts(sched_total, "ready", "completed"),
            "current": _counts(sched_current, "ready", "completed"),
        },
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {
                "step": {
                    "total": _counts(steps, "ready", "completed"),
                    "current": _counts(steps_per_epoch, "ready", "completed"),
                },
                "zero_grad": {
                    "total": _counts(steps, "ready", "completed", "started"),
                    "current": _counts(steps_per_epoch, "ready", "completed", "started"),
                },
            }
        },
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": {
            "total": _counts(0, "ready", "completed"),
            "current": _counts(0, "ready", "completed"),
        },
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {
            "total": _counts(val_batches, *rcsp),
            "current": _counts(val_batches, *rcsp),
            "is_last_batch": True,
        },
        "epoch_progress": {"total": dict(epoch_counts), "current": dict(epoch_counts)},
    }
    return {
        "fit_loop": fit_loop,
        "validate_loop": {"state_dict": {}, "batch_progress": copy.deepcopy(empty_batches)},
        "test_loop": {"state_dict": {}, "batch_progress": copy.deepcopy(empty_batches)},
        "predict_loop": {
            "state_dict": {},
            "batch_progress": {"total": _counts(0, *rcsp), "current": _counts(0, *rcsp)},
        },
    }


def set_fit_progress(trainer: L.Trainer, epochs: int, steps: int) -> None:
    """Make a fresh Trainer count ``epochs`` completed epochs and ``steps`` optimizer steps,
    as after a fit of that length: its test stage then logs at the step (and epoch) a single
    run tests at. A no-op with a Lightning version this package was not verified against."""
    if not supported():
        return
    loop = trainer.fit_loop
    loop.epoch_progress.current.completed = loop.epoch_progress.total.completed = epochs
    loop.epoch_loop._batches_that_stepped = steps
    loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = steps

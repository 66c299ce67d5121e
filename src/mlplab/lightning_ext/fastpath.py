"""The fast path of a training step: several optimizer steps per Lightning loop iteration.

A Lightning loop iteration costs a few hundred microseconds of Python (hook dispatch,
closures, logging bookkeeping); on a small MLP on a CPU that is as much as a step's own
arithmetic. Fused steps pay it once per block of minibatches:

- fused steps (:meth:`mlplab.models.Classifier.fuse_steps`: several optimizer steps per
  ``training_step`` call) use :func:`backward_and_step` where :func:`direct_steps_possible`:
  a manual optimization step's hook calls made directly instead of through strategy,
  precision plugin and closures -- the same hooks, arguments and order (the canary in
  ``tests/test_architecture.py`` runs a callback that overrides every hook through both);
- :func:`advance_logging_step` keeps Lightning's logging step counting optimizer steps under
  fused steps, :func:`carry_step_count` a checkpoint's step count across
  automatic/manual optimization.

Outside the Lightning versions :mod:`mlplab.lightning_ext` was verified against, none of
this runs: no direct steps, and the run takes Lightning's own loop
(``steps_per_call`` falls back to 1).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from mlplab.lightning_ext import supported

log = logging.getLogger(__name__)

# -- manual optimization steps without Lightning's per-call dispatch ------------------------

#: The hooks Lightning calls around a manual optimization step, in this order.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def direct_steps_possible(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether :func:`backward_and_step` may stand in for ``module.manual_backward(loss)``
    and ``LightningOptimizer.step()``: one device, Lightning's plain 32-bit precision
    plugin, no profiler (Lightning's ``PassThroughProfiler``) and Lightning's own ``backward``.
    Everything else (DDP, mixed precision, a profiler, a custom ``backward``) keeps
    Lightning's path."""
    return (
        supported()
        and type(trainer.strategy) is SingleDeviceStrategy
        and type(trainer.strategy.precision_plugin) is Precision
        and type(trainer.profiler) is PassThroughProfiler
        and type(module).backward is L.LightningModule.backward
        and getattr(module, "_fabric", None) is None
    )


class StepHooks:
    """The callables of :data:`STEP_HOOKS`: the callbacks' (in order), then the module's.

    Resolved once (per ``training_step`` call) instead of Lightning's lookup of every
    hook on every callback at every step, leaving out the hooks an object inherits as
    Lightning's no-op defaults; calling one sets ``_current_fx_name`` around the calls as
    Lightning's dispatchers do (``self.log`` checks it).
    """

    def __init__(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.trainer, self.module = trainer, module
        self.fns: dict[str, tuple[list[Any], Any]] = {}
        for name in STEP_HOOKS:
            callbacks = [getattr(cb, name) for cb in trainer.callbacks if _overrides(cb, L.Callback, name)]
            own = getattr(module, name) if _overrides(module, L.LightningModule, name) else None
            self.fns[name] = (callbacks, own)

    def __call__(self, name: str, *args: Any) -> None:
        callbacks, own = self.fns[name]
        if not callbacks and own is None:
            return
        module = self.module
        previous, module._current_fx_name = module._current_fx_name, name
        for fn in callbacks:
            fn(self.trainer, module, *args)
        if own is not None:
            own(*args)
        module._current_fx_name = previous


def _overrides(obj: Any, base: type, name: str) -> bool:
    """Whether ``obj.name`` is callable and not ``base``'s no-op default."""
    fn = getattr(obj, name, None)
    return callable(fn) and not (name not in vars(obj) and getattr(type(obj), name) is getattr(base, name))


def backward_and_step(loss: Tensor, optimizer: LightningOptimizer, hooks: StepHooks) -> None:
    """``manual_backward(loss)`` and ``optimizer.step()`` where :func:`direct_steps_possible`:
    the same hooks with the same arguments in the same order, the same step count
    (the manual loop's own ``_on_before_step``/``_on_after_step``), the same update --
    without Lightning's dispatch through strategy, precision plugin and closures, about
    tens of microseconds a step on a CPU. ``tests/test_lean.py`` and the canary in
    ``tests/test_architecture.py`` check it against Lightning's path hook by hook."""
    hooks("on_before_backward", loss)
    loss.backward()
    hooks("on_after_backward")
    optimizer._on_before_step()
    hooks("on_before_optimizer_step", optimizer.optimizer)
    optimizer.optimizer.step()
    optimizer._on_after_step()


def advance_logging_step(trainer: L.Trainer, extra_steps: int) -> None:
    """Count ``extra_steps`` more optimizer steps in Lightning's logging step (the x axis of
    every ``self.log``), which counts loop iterations: a fused block of k steps is one
    iteration, so k - 1 more. It is saved in checkpoints with the loop state."""
    trainer.fit_loop.epoch_loop._batches_that_stepped += extra_steps


#: Where a checkpoint's loop state counts optimizer steps, under automatic and manual optimization.
_MANUAL_STEPS = "epoch_loop.manual_optimization.optim_step_progress"
_AUTOMATIC_STEPS = "epoch_loop.automatic_optimization.optim_progress"


def carry_step_count(checkpoint: dict[str, Any], automatic_optimization: bool) -> None:
    """Lightning counts optimizer steps (``global_step``) in one of two progress records,
    automatic or manual optimization. A checkpoint written with another ``steps_per_call``
    (``ckpt_path=``) has its count in the other one: carry it over before the loops load it.

    A checkpoint without both records (another Lightning version's layout) is left as it is,
    with one warning, rather than skipped silently.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    manual = fit.get(_MANUAL_STEPS)
    automatic = fit.get(_AUTOMATIC_STEPS, {}).get("optimizer", {}).get("step")
    if manual is None or automatic is None:
        if fit:
            log.warning(
                "the checkpoint's loop state has no %s and %s records (another Lightning version?): "
                "its optimizer step count is loaded as Lightning reads it",
                _MANUAL_STEPS,
                _AUTOMATIC_STEPS,
            )
        return
    source, target = (manual, automatic) if automatic_optimization else (automatic, manual)
    if target["total"]["completed"] == 0 and source["total"]["completed"] > 0:
        target["total"], target["current"] = dict(source["total"]), dict(source["current"])

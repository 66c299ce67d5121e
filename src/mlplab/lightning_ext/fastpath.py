"""The fast path of a training step: Lightning's per-step dispatch, trimmed to what a run uses.

A Lightning training step calls ~15 LightningModule hooks and 6 hooks on every callback,
most of them the no-op defaults; each call costs a few microseconds of Python (a profiler
action name, a context manager, the module's hook-name bookkeeping). On a small MLP on a
CPU that is as much as the step's own arithmetic.

- :func:`trim_dispatch` sets the per-batch hooks an object does not override to ``None`` on
  the instance (Lightning's dispatchers skip a hook attribute that is not callable), and
  :class:`NullProfiler` makes "no profiler" free;
- fused steps (:meth:`mlplab.models.Classifier.fuse_steps`: several optimizer steps per
  ``training_step`` call) use :func:`backward_and_step` where :func:`direct_steps_possible`:
  a manual optimization step's hook calls made directly instead of through strategy,
  precision plugin and closures -- the same hooks, arguments and order (the canary in
  ``tests/test_architecture.py`` runs a callback that overrides every hook through both);
- :func:`advance_logging_step` keeps Lightning's logging step counting optimizer steps under
  fused steps, :func:`carry_step_count` a checkpoint's step count across
  automatic/manual optimization, :class:`HookNameAttribute` the hook-name bookkeeping cheap.

Outside the Lightning versions :mod:`mlplab.lightning_ext` was verified against, none of
this runs: no trimming, no direct steps, and the run takes Lightning's own loop
(``steps_per_call`` falls back to 1).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from mlplab.lightning_ext import supported

log = logging.getLogger(__name__)

#: Hooks Lightning calls once per training batch (callbacks and LightningModule alike).
TRAIN_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_zero_grad",
    "on_before_optimizer_step",
)
#: ... and per evaluation batch too. (On a LightningModule, Lightning inspects the signatures
#: of the evaluation hooks, which must stay methods; they run on a few batches per epoch.)
PER_BATCH_HOOKS = (
    *TRAIN_BATCH_HOOKS,
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)

_NULL = contextlib.nullcontext()


class NullProfiler(PassThroughProfiler):
    """Records nothing, like Lightning's default ``PassThroughProfiler``, at no cost per call.

    (``Profiler.profile`` is a ``@contextmanager`` generator: a new one per hook call.)
    """

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return _NULL


def unset_noop_hooks(obj: Any, base: type, hooks: tuple[str, ...] = PER_BATCH_HOOKS) -> list[str]:
    """Set each of ``hooks`` that ``type(obj)`` inherits unchanged from ``base`` to ``None``
    on ``obj``; returns their names. A hook already unset stays unset. (Verified Lightning
    only: its dispatchers skip a hook attribute that is not callable.)"""
    unset: list[str] = []
    if not supported():
        return unset
    for name in hooks:
        if name in vars(obj) or not hasattr(base, name):
            continue
        if getattr(type(obj), name) is getattr(base, name):
            object.__setattr__(obj, name, None)  # bypasses nn.Module.__setattr__, same effect
            unset.append(name)
    return unset


def trim_dispatch(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Unset the no-op per-batch hooks of ``trainer``'s callbacks and of ``module`` (verified Lightning only)."""
    if not supported():
        return
    for callback in trainer.callbacks:
        unset_noop_hooks(callback, L.Callback)
        # ModelCheckpoint checks on every batch whether to save by steps or by time; with
        # neither configured (every_n_train_steps=0, no train_time_interval) it never does.
        if (
            isinstance(callback, ModelCheckpoint)
            and not callback._every_n_train_steps
            and callback._train_time_interval is None
            and "on_train_batch_end" not in vars(callback)
        ):
            callback.on_train_batch_end = None  # type: ignore[assignment]
    unset_noop_hooks(module, L.LightningModule, TRAIN_BATCH_HOOKS)
    # Called every step to clip gradients; without trainer.gradient_clip_val it clips nothing.
    if (
        not trainer.gradient_clip_val
        and type(module).configure_gradient_clipping is L.LightningModule.configure_gradient_clipping
    ):
        object.__setattr__(module, "configure_gradient_clipping", None)


# -- manual optimization steps without Lightning's per-call dispatch ------------------------

#: The hooks Lightning calls around a manual optimization step, in this order.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def direct_steps_possible(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether :func:`backward_and_step` may stand in for ``module.manual_backward(loss)``
    and ``LightningOptimizer.step()``: one device, Lightning's plain 32-bit precision
    plugin, no profiler (the :class:`NullProfiler`) and Lightning's own ``backward``.
    Everything else (DDP, mixed precision, a profiler, a custom ``backward``) keeps
    Lightning's path."""
    return (
        supported()
        and type(trainer.strategy) is SingleDeviceStrategy
        and type(trainer.strategy.precision_plugin) is Precision
        and type(trainer.profiler) is NullProfiler
        and type(module).backward is L.LightningModule.backward
        and getattr(module, "_fabric", None) is None
    )


class StepHooks:
    """The callables of :data:`STEP_HOOKS`: the callbacks' (in order), then the module's.

    Resolved once (per ``training_step`` call) instead of Lightning's lookup of every
    hook on every callback at every step; calling one sets ``_current_fx_name`` around
    the calls as Lightning's dispatchers do (``self.log`` checks it).
    """

    def __init__(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.trainer, self.module = trainer, module
        self.fns: dict[str, tuple[list[Any], Any]] = {}
        for name in STEP_HOOKS:
            callbacks = [fn for fn in (getattr(cb, name) for cb in trainer.callbacks) if callable(fn)]
            own = getattr(module, name)
            self.fns[name] = (callbacks, own if callable(own) else None)

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


class HookNameAttribute:
    """A LightningModule mixin: Lightning records the running hook's name in
    ``_current_fx_name`` around every hook call (~20 times a step); ``nn.Module.__setattr__``
    would first search parameters, buffers and submodules for that name each time."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)


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


def precompute_signature(method: Any) -> None:
    """Lightning reads ``training_step``'s signature on every step (to learn whether it takes
    ``batch_idx``); a precomputed ``__signature__`` makes that lookup a third as dear."""
    method.__signature__ = inspect.signature(method)

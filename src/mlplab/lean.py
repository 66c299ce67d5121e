"""Lightning's per-step dispatch, trimmed to what a run actually uses.

A Lightning training step calls ~15 LightningModule hooks and 6 hooks on every
callback, most of them the no-op defaults. Each call costs a few microseconds of pure
Python on top of the hook itself: an f-string for the profiler's action name (for
``ModelCheckpoint`` that is a ``repr`` of its settings), a generator-based context
manager from the default ``PassThroughProfiler``, and two ``nn.Module.__setattr__``
calls that record the hook's name on the module. On a 2-core CPU machine that added up
to about 1 ms a step -- as much as the forward, backward and SGD step of a small MLP.

Lightning's dispatchers skip a hook attribute that is not callable (``call.py``:
``if callable(fn)``), so :func:`trim_dispatch` sets the per-batch hooks that an object
does not override to ``None`` on the instance -- on every callback and on the
LightningModule -- and :class:`NullProfiler` makes "no profiler" free. Behaviour is
unchanged: only calls of no-op defaults disappear. ``tests/test_lean.py`` checks that
Lightning still honours this and that a run's results are the same.

Fused steps (``Classifier.fuse_steps``) go one step further where it changes nothing:
:func:`backward_and_step` makes a manual optimization step's hook calls itself instead
of through strategy, precision plugin and closures (:func:`direct_steps_possible` says
where: one device, 32-bit, no profiler).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

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
    on ``obj``; returns their names. A hook already unset stays unset."""
    unset = []
    for name in hooks:
        if name in vars(obj) or not hasattr(base, name):
            continue
        if getattr(type(obj), name) is getattr(base, name):
            object.__setattr__(obj, name, None)  # bypasses nn.Module.__setattr__, same effect
            unset.append(name)
    return unset


def trim_dispatch(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Unset the no-op per-batch hooks of ``trainer``'s callbacks and of ``module``."""
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
    if not trainer.gradient_clip_val and type(module).configure_gradient_clipping is L.LightningModule.configure_gradient_clipping:
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
        type(trainer.strategy) is SingleDeviceStrategy
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
    40 us a step on a 2-core CPU (README, "Speed"). ``tests/test_lean.py`` checks it
    against Lightning's path hook by hook."""
    hooks("on_before_backward", loss)
    loss.backward()
    hooks("on_after_backward")
    optimizer._on_before_step()
    hooks("on_before_optimizer_step", optimizer.optimizer)
    optimizer.optimizer.step()
    optimizer._on_after_step()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_tuned: bool | None = None


def reuse_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory for large tensors instead of asking the OS.

    glibc serves an allocation above a (dynamic) threshold with a fresh ``mmap`` and gives
    it back on free; the heap's free top is trimmed back to the OS too. A fused training
    block (``steps_per_call x batch_size`` rows: 25 MB at batch 512 on MNIST) was
    therefore new memory every call: 17,000-30,000 page faults an epoch, each page zeroed
    by the kernel. Minibatches gathered one by one fare no better: which threshold applies
    depends on what the process allocated before, and in some runs of the same code the
    heap grew for each 1.6 MB minibatch (batch 512) and was trimmed after it (40,000
    faults an epoch; none in other runs). With allocations up to 32 MiB (glibc's largest
    threshold) kept on the heap and 256 MiB of free heap kept, the same pages serve every
    step (0-6 faults an epoch). Peak RSS of an MNIST run went from 1200 to 1225 MB in the
    benchmark. Process-wide and idempotent; returns whether it applied (False off glibc:
    macOS, Windows, musl).
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
                )
            except (OSError, AttributeError):
                pass
    return _malloc_tuned


# -- denormal floats ------------------------------------------------------------------------

#: Elements per thread below which torch's CPU kernels do not split work (at::internal::GRAIN_SIZE).
_GRAIN_SIZE = 32768


def flush_denormals() -> bool | None:
    """Flush denormal floats to zero on the CPU (FTZ/DAZ), in every thread torch computes on.

    As a classifier grows confident, softmax probabilities and their gradients underflow
    into denormals (below 1.2e-38 in float32); x86 CPUs compute with those through slow
    microcode assists. On the 2-core AMD EPYC here a trained SimpleNet's epoch at batch 64
    took 0.98 s with denormals and 0.48 s without (README, "Speed"). Flushing changes only
    values below 1.2e-38, which round away against anything else in a training step.

    The flag lives in each thread's MXCSR register, and a thread inherits it only when it is
    created: set before torch starts its worker threads (the first large computation of the
    process), it holds for all of them; set later, only for the calling thread. Returns True
    where every intra-op thread flushes (checked with a computation split over all threads),
    False where only this one does, None where the CPU cannot (``torch.set_flush_denormal``).
    """
    if not torch.set_flush_denormal(True):
        return None
    return _flushed(2 * _GRAIN_SIZE * torch.get_num_threads())


def _flushes_here() -> bool:
    """Whether this thread already flushes denormals (one element: no worker thread computes it)."""
    return _flushed(1)


def _flushed(n: int) -> bool:
    """Whether ``n`` products 1e-30 * 1e-10 (a float32 denormal) all came out as zero."""
    return bool((torch.full((n,), 1e-30).mul_(1e-10) == 0).all())


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[bool | None]:
    """:func:`flush_denormals` for the duration of the block (yields its result; None also
    when not ``enabled``). Afterwards this thread computes as before: the flag is part of
    the process's state, and other code run later in it (numpy, hypothesis, a notebook's
    next cell) must not find it changed. Worker threads that torch started inside the
    block keep flushing (no API reaches their registers); that changes values below
    1.2e-38 only."""
    if not enabled:
        yield None
        return
    was_flushing = _flushes_here()
    try:
        yield flush_denormals()
    finally:
        if not was_flushing:
            torch.set_flush_denormal(False)

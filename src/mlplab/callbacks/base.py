"""A callback base that costs nothing on the per-batch hooks it does not use.

Lightning calls every hook of every callback on every batch -- on the order of ten
microseconds per callback and step in hook dispatch, even for hooks left at the no-op
default. Its dispatcher (``_call_callback_hooks``) skips a hook attribute that is not
callable, so :class:`LeanCallback` sets the per-batch hooks a subclass does not
override to ``None`` on the instance: a diagnostic that works at test end or once an
epoch then adds nothing to a training step, in any Trainer. (``mlplab.engines.lightning`` does
the same for every callback of a run, see :mod:`mlplab.lightning_ext.fastpath`.) A test checks that
Lightning still honours this (and that the saving is real).
"""

from __future__ import annotations

import lightning as L

from mlplab.lightning_ext.fastpath import PER_BATCH_HOOKS, unset_noop_hooks

__all__ = ["LeanCallback", "PER_BATCH_HOOKS"]


class LeanCallback(L.Callback):
    """Per-batch hooks are dispatched only if the subclass overrides them (or :meth:`skip` unsets them)."""

    def __init__(self) -> None:
        unset_noop_hooks(self, L.Callback)

    def skip(self, hook: str) -> None:
        """Lightning will not call ``hook`` on this instance."""
        setattr(self, hook, None)

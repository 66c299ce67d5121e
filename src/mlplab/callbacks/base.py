"""A callback base that costs nothing on the per-batch hooks it does not use.

Lightning calls every hook of every callback on every batch -- on the order of ten
microseconds per callback and step in hook dispatch, even for hooks left at the no-op
default. Its dispatcher (``_call_callback_hooks``) skips a hook attribute that is not
callable, so :class:`LeanCallback` sets the per-batch hooks a subclass does not
override to ``None`` on the instance: a diagnostic that works at test end or once an
epoch then adds nothing to a training step. A test checks that Lightning still honours
this (and that the saving is real).
"""

from __future__ import annotations

import lightning as L

PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_zero_grad",
    "on_before_optimizer_step",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


class LeanCallback(L.Callback):
    """Per-batch hooks are dispatched only if the subclass overrides them (or :meth:`skip` unsets them)."""

    def __init__(self) -> None:
        for name in PER_BATCH_HOOKS:
            if getattr(type(self), name) is getattr(L.Callback, name):
                self.skip(name)

    def skip(self, hook: str) -> None:
        """Lightning will not call ``hook`` on this instance."""
        setattr(self, hook, None)

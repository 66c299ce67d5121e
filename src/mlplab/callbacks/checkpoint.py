"""``mlplab.callbacks.ModelCheckpoint``: ``last.ckpt`` at every epoch end (:mod:`mlplab.lightning_ext.checkpoint`).

Defined in :mod:`mlplab.lightning_ext` because it overrides private members of Lightning's
``ModelCheckpoint``; the configs name it here, beside the other callbacks.
"""

from mlplab.lightning_ext.checkpoint import ModelCheckpoint

__all__ = ["ModelCheckpoint"]

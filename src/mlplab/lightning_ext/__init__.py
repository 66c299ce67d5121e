"""The only place in mlplab that knows Lightning's private API.

Everything here leans on names Lightning does not promise to keep: the fast path of a
training step (:mod:`~mlplab.lightning_ext.fastpath`: trimmed hook dispatch, direct
optimizer steps, the logging step of fused steps, a checkpoint's loop-state records),
``last.ckpt`` at every epoch end (:mod:`~mlplab.lightning_ext.checkpoint`) and DDP's child
ranks started as Hydra jobs (:mod:`~mlplab.lightning_ext.ddp`). Nothing outside this
package imports or touches a private Lightning name (``tests/test_architecture.py`` scans
the package for it).

It was verified against :data:`VERIFIED` (``tests/test_lean.py``, the canary of
``tests/test_architecture.py``). With another Lightning version, :func:`supported` is
false: each piece falls back to Lightning's public behaviour (its own training loop, its
own ``ModelCheckpoint``, its own DDP launcher), says so once in the log, and training
stays correct -- only slower.
"""

from __future__ import annotations

import logging

import lightning
from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)

#: The Lightning versions this package was verified against.
VERIFIED = SpecifierSet(">=2.6,<2.7")


_warned = False


def supported() -> bool:
    """Whether the installed Lightning is one :data:`VERIFIED` names (said once in the log when not)."""
    global _warned
    ok = Version(Version(lightning.__version__).base_version) in VERIFIED  # 2.6.6.dev1 counts as 2.6.6
    if not ok and not _warned:
        _warned = True
        log.warning(
            "lightning %s is outside the versions mlplab's Lightning extensions were verified against (%s): "
            "using Lightning's own training loop, ModelCheckpoint and DDP launcher (slower, the same training)",
            lightning.__version__,
            VERIFIED,
        )
    return ok

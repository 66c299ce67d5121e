"""One error family for everything a user can get wrong.

Messages name the key, the bad value and what is allowed; the entry points print them as
one line on stderr and exit non-zero (see :mod:`mlplab.cli`).
"""


class MlplabError(Exception):
    """Base class: a problem the user can fix (bad config, missing data, bad checkpoint)."""


class ConfigError(MlplabError, ValueError):
    """A config value is out of range or of the wrong type."""


class DataError(MlplabError):
    """Dataset files are missing or unusable."""


class CheckpointError(MlplabError):
    """A checkpoint path is missing, unreadable or not an mlplab checkpoint."""


class StorageError(MlplabError):
    """A file could not be written: a full disk, a read-only folder."""


class DivergenceError(MlplabError):
    """Training produced a non-finite loss or weights; the run stops, checkpoints stay good."""

    @classmethod
    def training(cls, where: str, epoch: int, lr: float, allowed: str) -> "DivergenceError":
        """The one message both engines give: ``where`` ("loss at step 12"), the epoch, its start lr."""
        return cls(
            f"training diverged: non-finite {where} (epoch {epoch}, lr {lr:.6g} at the epoch's start); "
            f"the last good checkpoint is kept; allowed: {allowed}"
        )


class RunInterrupted(MlplabError):
    """SIGINT or SIGTERM stopped a run; ``last.ckpt`` holds the last completed epoch."""

    def __init__(self, message: str, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.signal_name = signal_name
        #: The metrics measured before the stop (recorded in run.json).
        self.metrics: dict[str, float] = {}

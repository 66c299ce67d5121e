"""Lightning callbacks of the project."""

from mlplab.callbacks.timing import EpochTimer

__all__ = ["EpochTimer"]

"""Lightning callbacks of the project."""

from mlplab.callbacks.resume import AtomicCheckpointIO, RNGState, StopOnSignal
from mlplab.callbacks.timing import EpochTimer

__all__ = ["AtomicCheckpointIO", "EpochTimer", "RNGState", "StopOnSignal"]

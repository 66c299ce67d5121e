"""Lightning callbacks of the project: diagnostics for TensorBoard, and timing.

Every diagnostic writes images, histograms and text to the run's TensorBoard logger
(skipped when there is none, and on ranks other than 0); scalars go to every logger.
Configured in ``conf/callbacks/`` (``default`` has them all, at cheap settings).
"""

from mlplab.callbacks.checkpoint import ModelCheckpoint
from mlplab.callbacks.decision_boundary import DecisionBoundary
from mlplab.callbacks.gradients import GradientNorms
from mlplab.callbacks.histograms import WeightHistograms
from mlplab.callbacks.misclassified import MisclassifiedImages
from mlplab.callbacks.progress import ProgressBar
from mlplab.callbacks.resume import AtomicCheckpointIO, RNGState, StopOnSignal
from mlplab.callbacks.samples import SampleInputs
from mlplab.callbacks.test_report import TestReport
from mlplab.callbacks.timing import EpochTimer

__all__ = [
    "AtomicCheckpointIO",
    "DecisionBoundary",
    "EpochTimer",
    "GradientNorms",
    "MisclassifiedImages",
    "ModelCheckpoint",
    "ProgressBar",
    "RNGState",
    "SampleInputs",
    "StopOnSignal",
    "TestReport",
    "WeightHistograms",
]

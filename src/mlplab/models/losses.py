"""The two losses of the course, and how a net's outputs become class scores.

A net has ``num_classes`` outputs, or one (``MLP(single_output=True)``, a binary
classifier such as Lesson A's 2-2-1 XOR net). :meth:`ClassificationLoss.scores` turns
either into ``(batch, num_classes)`` scores whose arg-max is the predicted class, which is
what accuracy, prediction and evaluation use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlplab.errors import ConfigError


def _smoothing(value: object) -> float:
    """``loss.label_smoothing``, checked: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"loss.label_smoothing={value!r} is invalid; allowed: a number in [0, 1)")
    return float(value)


def smoothed_targets(labels: Tensor, num_outputs: int, label_smoothing: Tensor | float, dtype: torch.dtype) -> Tensor:
    """Squared error's targets: the one-hot label (one output unit: the 0/1 label) mixed with the
    uniform distribution over the classes, ``(1 - e) * onehot + e / K`` (``e`` may be ``[M, 1, 1]``)."""
    if num_outputs == 1:
        target = labels.to(dtype).unsqueeze(-1)
        classes = 2
    else:
        target = F.one_hot(labels, num_outputs).to(dtype)
        classes = num_outputs
    if isinstance(label_smoothing, Tensor) or label_smoothing:
        target = (1 - label_smoothing) * target + label_smoothing / classes
    return target


class ClassificationLoss(nn.Module):
    """``loss(outputs, labels)`` plus ``scores(outputs)`` (arg-max = predicted class)."""

    def scores(self, outputs: Tensor) -> Tensor:
        return outputs


class CrossEntropy(ClassificationLoss):
    """Cross-entropy of outputs taken as logits, mean over the batch.

    One output unit is the logit of class 1: scores ``[0, o]``, whose softmax is
    ``[1 - sigmoid(o), sigmoid(o)]`` -- the same loss as binary cross-entropy with logits.
    ``label_smoothing`` in [0, 1) mixes the one-hot target with the uniform distribution
    (``torch.nn.functional.cross_entropy``'s option; 0 = the plain loss).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _smoothing(label_smoothing)

    def scores(self, outputs: Tensor) -> Tensor:
        if outputs.size(1) == 1:
            return torch.cat([torch.zeros_like(outputs), outputs], dim=1)
        return outputs

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.scores(outputs), labels, label_smoothing=self.label_smoothing)


class SquaredError(ClassificationLoss):
    """The NumPy lessons' squared error: per sample ``1/2 * sum_k (o_k - d_k)^2`` with ``d``
    the one-hot label, averaged over the batch.

    (Lesson C writes the loss summed over the batch too; the mean keeps the learning rate
    independent of the batch size. For a batch of one both are the same.) With one output
    unit ``d`` is the 0/1 label and the predicted class is ``o > 0.5``. ``label_smoothing``
    in [0, 1) mixes ``d`` with the uniform distribution, ``(1 - e) * d + e / K`` (0: the
    lessons' loss).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _smoothing(label_smoothing)

    def scores(self, outputs: Tensor) -> Tensor:
        if outputs.size(1) == 1:
            return torch.cat([1 - outputs, outputs], dim=1)
        return outputs

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        target = smoothed_targets(labels, outputs.size(1), self.label_smoothing, outputs.dtype)
        return 0.5 * (outputs - target).pow(2).sum(dim=1).mean()

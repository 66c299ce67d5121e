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
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, (int, float))
            or not 0 <= label_smoothing < 1
        ):
            raise ConfigError(f"loss.label_smoothing={label_smoothing!r} is invalid; allowed: a number in [0, 1)")
        self.label_smoothing = float(label_smoothing)

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
    unit ``d`` is the 0/1 label and the predicted class is ``o > 0.5``.
    """

    def scores(self, outputs: Tensor) -> Tensor:
        if outputs.size(1) == 1:
            return torch.cat([1 - outputs, outputs], dim=1)
        return outputs

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if outputs.size(1) == 1:
            target = labels.to(outputs.dtype).unsqueeze(1)
        else:
            target = F.one_hot(labels, outputs.size(1)).to(outputs.dtype)
        return 0.5 * (outputs - target).pow(2).sum(dim=1).mean()

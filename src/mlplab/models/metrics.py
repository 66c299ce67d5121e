"""A lean top-1 accuracy for the training step.

``torchmetrics.classification.MulticlassAccuracy`` goes through the general stat-scores
machinery (one-hot/bincount per class): ~150 us per update on a CPU step here, against
~40 us for two counters. This is a ``torchmetrics.Metric`` all the same, so states
live on the module's device, reset per epoch and are summed across DDP ranks by
torchmetrics; a test checks it equals ``MulticlassAccuracy``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class Accuracy(Metric):
    """Fraction of samples whose arg-max logit is the target."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.correct += (logits.argmax(dim=-1) == target).sum()
        self.total += target.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total

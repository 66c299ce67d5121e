"""Lean epoch metrics for the step: top-1 accuracy and the per-sample mean loss.

``torchmetrics.classification.MulticlassAccuracy`` goes through the general stat-scores
machinery (one-hot/bincount per class): ~150 us per update on a CPU step here, against
~40 us for two counters. This is a ``torchmetrics.Metric`` all the same, so states
live on the module's device, reset per epoch and are summed across DDP ranks by
torchmetrics; tests check them against ``MulticlassAccuracy`` and a weighted mean.
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


class MeanLoss(Metric):
    """The mean of per-batch mean losses weighted by batch size: the exact per-sample mean.

    ``torchmetrics.MeanMetric`` checks every update for NaNs (a host sync per step) and,
    with ``nan_strategy="disable"``, drops the weights (torchmetrics 1.9): the epoch
    value would be the unweighted mean of batch means, which changes with how the samples
    are batched -- across DDP ranks, too. Two sum states, summed across ranks.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("weighted_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, batch_mean: Tensor, batch_size: int) -> None:
        self.weighted_sum += batch_mean.detach() * batch_size
        self.count += batch_size

    def compute(self) -> Tensor:
        return self.weighted_sum / self.count

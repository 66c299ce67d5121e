"""Lean epoch metrics for the step: the per-sample mean loss and top-1 accuracy.

``torchmetrics.classification.MulticlassAccuracy`` goes through the general stat-scores
machinery (one-hot/bincount per class), a large share of a small CPU step, and
``torchmetrics.MeanMetric`` checks every update for NaNs (a host sync per step) and,
with ``nan_strategy="disable"``, drops the weights (torchmetrics 1.9): the epoch value
would be the unweighted mean of batch means, which changes with how the samples are
batched -- across DDP ranks, too. :class:`EpochStats` keeps both in three counters with
one ``update`` per step (each torchmetrics update adds a wrapper's Python on top of its
tensor ops: one metric instead of two halves that). It is a
``torchmetrics.Metric`` all the same, so the states live on the module's device, reset
per epoch and are summed across DDP ranks by torchmetrics; tests check it against
``MulticlassAccuracy`` and a weighted mean.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class EpochStats(Metric):
    """Sum of losses (each batch mean weighted by its batch size), correct predictions, samples.

    ``compute()`` returns ``(mean loss per sample, accuracy)``. A non-finite loss in any
    step leaves ``loss_sum`` non-finite until :meth:`reset` (the divergence guard reads it).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, batch_mean_loss: Tensor | Sequence[Tensor], scores: Tensor, target: Tensor, sizes: Sequence[int] = ()
    ) -> None:
        """One minibatch: its mean loss, class scores and targets. A fused block of
        minibatches (one update for all of them): the minibatches' mean losses in order,
        with their ``sizes``, and the block's scores and targets."""
        # Runs under no_grad (torchmetrics' update wrapper): no detach needed.
        if sizes:  # the same float additions, in the same order, as one update per minibatch
            for loss, n in zip(batch_mean_loss, sizes):
                self.loss_sum.add_(loss, alpha=n)
        else:
            self.loss_sum.add_(batch_mean_loss, alpha=target.numel())
        self.correct.add_(scores.argmax(dim=-1).eq(target).sum())
        self.total.add_(target.numel())

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.loss_sum / self.total, self.correct.float() / self.total

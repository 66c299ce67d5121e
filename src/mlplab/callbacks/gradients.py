"""Per-layer gradient norms: the vanishing-gradient picture (Lesson B) for any net.

The layers are the net's weight matrices (parameters with two or more dimensions) in
the order the net applies them: layer 1 is the first one after the input. Biases are
left out, as in the lesson's picture.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from mlplab.callbacks.plotting import FIGURE_WIDTH, log_figure, new_figure, style_axes, tensorboard_writer
from mlplab.tensorboard_view import diagnostic
from mlplab.validation import positive_int


def layer_weights(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every trainable weight matrix, input side first."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad and p.dim() >= 2]


def gradient_norms(module: torch.nn.Module) -> Tensor:
    """The L2 norm of each weight matrix's gradient (0 where there is none), one tensor on the device."""
    weights = [p for _, p in layer_weights(module)]
    if not weights:
        return torch.zeros(0)
    return torch.stack(
        [p.grad.detach().norm() if p.grad is not None else torch.zeros((), device=p.device) for p in weights]
    )


class GradientNorms(L.Callback):
    """Logs ``~diagnostics/grad_norm/layer_01``, ``_02``, ... and a depth-vs-norm figure.

    Nothing runs on other steps: on every ``every_n_steps``-th optimizer step (default:
    the trainer's ``log_every_n_steps``; step 0 included, the gradients at
    initialisation) the norms are computed in one stacked tensor on the device and
    logged as scalars to every logger. The figure ``~diagnostics/grad_norm/by_depth`` (log-scale norm
    against layer depth, TensorBoard only) is drawn from the first logged step, then
    every ``figure_every_n_epochs`` epochs (null: only at the end of training) from the
    mean of the norms logged since the previous figure.
    """

    def __init__(self, every_n_steps: int | None = None, figure_every_n_epochs: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = (
            None if every_n_steps is None else positive_int("callbacks.gradient_norms.every_n_steps", every_n_steps)
        )
        self.figure_every_n_epochs = (
            None
            if figure_every_n_epochs is None
            else positive_int("callbacks.gradient_norms.figure_every_n_epochs", figure_every_n_epochs)
        )
        self._pending: list[Tensor] = []
        self._figures = 0
        #: ``(global_step, [norm per layer])`` of every logged step, on rank 0.
        self.history: list[tuple[int, list[float]]] = []

    def _every(self, trainer: L.Trainer) -> int:
        return self.every_n_steps or max(1, trainer.log_every_n_steps)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending, self._figures = [], 0
        self.history = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step = trainer.global_step
        if step % self._every(trainer) or not trainer.is_global_zero:
            return
        norms = gradient_norms(pl_module)
        if norms.numel() == 0:
            return
        values = norms.tolist()  # the one host sync, on logging steps only
        self.history.append((step, values))
        metrics = {diagnostic(f"grad_norm/layer_{i:02d}"): v for i, v in enumerate(values, start=1)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._pending.append(norms.detach().float().cpu())
        if self._figures == 0:
            self._figure(trainer, title=f"gradient norms at step {step} (initialisation)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = self.figure_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._figure(trainer, title=f"mean gradient norms, epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._figure(trainer, title=f"mean gradient norms, end of training (step {trainer.global_step})")

    @rank_zero_only
    def _figure(self, trainer: L.Trainer, title: str) -> None:
        if not self._pending:
            return
        mean = torch.stack(self._pending).mean(dim=0)
        self._pending = []
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        self._figures += 1
        fig = new_figure(FIGURE_WIDTH, 3.4)
        ax = fig.add_subplot()
        depth = range(1, len(mean) + 1)
        ax.semilogy(depth, mean.clamp_min(1e-30).numpy(), marker="o")
        ax.set_xlabel("layer (1 = nearest the input)")
        ax.set_ylabel("gradient L2 norm")
        ax.set_xticks(list(depth))
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        style_axes(ax)
        log_figure(writer, diagnostic("grad_norm/by_depth"), fig, trainer.global_step)

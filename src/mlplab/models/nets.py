"""The course's nets as plain ``nn.Module``s, sized from the data.

Every net takes ``input_dim`` and ``num_classes`` (the DataModule knows both) and
flattens its input, so the same net trains on 8x8 digits and 28x28 MNIST.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mlplab.errors import ConfigError
from mlplab.validation import non_negative_number, positive_int, positive_number

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class _LayerStack(nn.Module):
    """A net that is one ``nn.Sequential``, ``self.layers`` (flatten first)."""

    layers: nn.Sequential

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SimpleNet(_LayerStack):
    """Lesson D's SimpleNet: in -> hidden -> classes, two linear layers, no activation."""

    def __init__(self, input_dim: int, num_classes: int, hidden_size: int = 120) -> None:
        super().__init__()
        hidden_size = positive_int("model.hidden_size", hidden_size)
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(input_dim, hidden_size), nn.Linear(hidden_size, num_classes)
        )


class SigmoidNet(_LayerStack):
    """Lesson D's SigmoidNet: a sigmoid after *both* layers, the output too.

    Cross-entropy is then taken on outputs squashed into (0, 1) -- faithful to the lesson,
    and part of why it learns slowly.
    """

    def __init__(self, input_dim: int, num_classes: int, hidden_size: int = 120) -> None:
        super().__init__()
        hidden_size = positive_int("model.hidden_size", hidden_size)
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(input_dim, hidden_size),
            nn.Sigmoid(),
            nn.Linear(hidden_size, num_classes),
            nn.Sigmoid(),
        )


INITS = ("default", "glorot_uniform", "normal")
OUTPUT_ACTIVATIONS = ("sigmoid",)


class MLP(_LayerStack):
    """A fully connected net of any depth and width.

    Args:
        hidden_sizes: widths of the hidden layers, e.g. ``[32, 16]`` or ``[5] * 50``.
        activation: after every hidden layer: ``relu``, ``sigmoid``, ``tanh`` or ``identity``.
        dropout: probability p of a ``Dropout`` after every hidden layer (0: none).
        batch_norm: a ``BatchNorm1d`` after every hidden linear layer, before its activation
            (batch statistics in training, running averages in evaluation).
        output_activation: ``None`` (outputs are logits) or ``"sigmoid"`` (outputs in (0, 1),
            as SigmoidNet and the NumPy lessons' nets; pair it with ``loss=mse``).
        single_output: one output unit instead of two for a 2-class problem (Lesson A's
            2-2-1 XOR net); the loss maps it to class scores.
        bias: whether the linear layers have biases (Lesson B's deep chain has none).
        init: ``default`` (PyTorch's), ``glorot_uniform`` (sklearn's MLP: weights and biases
            uniform in +-sqrt(f / (fan_in + fan_out)), f = 2 for sigmoid, 6 otherwise), or
            ``normal`` (weights N(0, init_std^2), biases 0).
        init_std: the standard deviation of ``init=normal``.
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
        output_activation: str | None = None,
        single_output: bool = False,
        bias: bool = True,
        init: str = "default",
        init_std: float = 0.1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        sizes = list(hidden_sizes) if isinstance(hidden_sizes, Sequence) and not isinstance(hidden_sizes, str) else None
        if not sizes:
            raise ConfigError(
                f"model.hidden_sizes={hidden_sizes!r} is invalid; allowed: a non-empty list of positive integers"
            )
        for i, h in enumerate(sizes):
            positive_int(f"model.hidden_sizes[{i}]", h)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r} is invalid; allowed: {', '.join(sorted(ACTIVATIONS))}")
        if output_activation is not None and output_activation not in OUTPUT_ACTIVATIONS:
            raise ConfigError(
                f"model.output_activation={output_activation!r} is invalid; allowed: null, {', '.join(OUTPUT_ACTIVATIONS)}"
            )
        if single_output and num_classes != 2:
            raise ConfigError(
                f"model.single_output=true needs 2 classes, the data has {num_classes}; allowed: false for this data"
            )
        if init not in INITS:
            raise ConfigError(f"model.init={init!r} is invalid; allowed: {', '.join(INITS)}")
        init_std = positive_number("model.init_std", init_std)
        dropout = non_negative_number("model.dropout", dropout, below=1.0)
        if not isinstance(batch_norm, bool):
            raise ConfigError(f"model.batch_norm={batch_norm!r} is invalid; allowed: true, false")
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip([input_dim, *sizes[:-1]], sizes):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], 1 if single_output else num_classes, bias=bias))
        if output_activation is not None:
            layers.append(ACTIVATIONS[output_activation]())
        self.layers = nn.Sequential(*layers)
        if init != "default":
            factor = 2.0 if activation == "sigmoid" else 6.0
            for layer in self.layers:
                if isinstance(layer, nn.Linear):
                    _init_linear(layer, init, init_std, factor)


@torch.no_grad()
def _init_linear(layer: nn.Linear, init: str, std: float, glorot_factor: float) -> None:
    if init == "normal":
        nn.init.normal_(layer.weight, 0.0, std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    else:  # glorot_uniform, sklearn's MLP rule (sklearn/neural_network/_multilayer_perceptron.py, _init_coef)
        bound = math.sqrt(glorot_factor / (layer.in_features + layer.out_features))
        nn.init.uniform_(layer.weight, -bound, bound)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -bound, bound)

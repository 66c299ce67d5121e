"""The course's nets as plain ``nn.Module``s, sized from the data.

Every net takes ``input_dim`` and ``num_classes`` (the DataModule knows both) and
flattens its input, so the same net trains on 8x8 digits and 28x28 MNIST.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mlplab.errors import ConfigError
from mlplab.validation import non_negative_number, positive_int

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
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(input_dim, hidden_size), nn.Linear(hidden_size, num_classes))


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


class MLP(_LayerStack):
    """A fully connected net of any depth and width: ``hidden_sizes``, an activation, and
    optional dropout after every hidden layer."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
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
            raise ConfigError(
                f"model.activation={activation!r} is invalid; allowed: {', '.join(sorted(ACTIVATIONS))}"
            )
        dropout = non_negative_number("model.dropout", dropout, below=1.0)
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip([input_dim, *sizes[:-1]], sizes):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

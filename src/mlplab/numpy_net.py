"""The lessons' from-scratch network in NumPy (Lessons A and C), kept as a test oracle.

A fully connected net with a sigmoid after *every* layer (the output too), the squared
error ``1/2 * sum (y - d)^2`` and back-propagation written out layer by layer, exactly as
the students write it:

* weights shaped ``(out, in)`` with separate biases ``(out, 1)``; samples as **columns**
  (``features x samples``, Lesson C) or as rows (``layout="rows"``, Lesson A);
* forward: ``z_l = W_l a_{l-1} + b_l``, ``a_l = sigmoid(z_l)``;
* backward: ``delta_L = (a_L - d) * a_L (1 - a_L)``,
  ``delta_l = (W_{l+1}^T delta_{l+1}) * a_l (1 - a_l)``,
  ``dW_l = delta_l a_{l-1}^T``, ``db_l = sum of delta_l over the samples``;
* one gradient-descent step ``W -= lr * dW``; mini-batches of shuffled samples
  (``batch_size=1`` is the lessons' per-sample "SGD").

The tests check that for the same weights its gradients equal torch autograd's on
:class:`mlplab.models.MLP` (sigmoid hidden and output, ``loss=mse``) to 1e-6 in float64, and
that it learns XOR; ``model=numpy_mlp`` trains it on any DataModule (:mod:`mlplab.engines.numpy`).

``reduction`` says how a batch's per-sample losses combine: ``"sum"`` (Lesson C's formula)
or ``"mean"`` (what training uses, like :class:`mlplab.models.SquaredError`: the learning
rate then does not depend on the batch size).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mlplab.errors import ConfigError
from mlplab.validation import positive_int, positive_number

LAYOUTS = ("columns", "rows")
REDUCTIONS = ("sum", "mean")


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class NumpyMLP:
    """Sigmoid MLP with squared error, trained by hand-written back-propagation.

    Args:
        sizes: layer sizes, inputs first, e.g. ``[2, 2, 1]`` (XOR) or ``[64, 32, 16, 10]``.
        layout: ``"columns"`` (``X`` is features x samples) or ``"rows"`` (samples x features);
            inputs, targets and outputs all use it.
        bias: whether layers have biases.
        init_std: weights are drawn N(0, init_std^2); ``None``: 1/sqrt(fan_in) per layer.
            Biases start at 0.
        seed: seed of the weight draw (NumPy's ``default_rng``).
        dtype: float64 by default (the oracle's precision).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        layout: str = "columns",
        bias: bool = True,
        init_std: float | None = None,
        seed: int = 0,
        dtype: type = np.float64,
    ) -> None:
        if len(sizes) < 2:
            raise ConfigError(f"sizes={list(sizes)} is invalid; allowed: at least an input and an output size")
        self.sizes = [positive_int(f"sizes[{i}]", s) for i, s in enumerate(sizes)]
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r} is invalid; allowed: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.dtype = dtype
        rng = np.random.default_rng(seed)
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray | None] = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            std = 1.0 / np.sqrt(fan_in) if init_std is None else positive_number("init_std", init_std)
            self.weights.append(rng.normal(0.0, std, (fan_out, fan_in)).astype(dtype))
            self.biases.append(np.zeros((fan_out, 1), dtype=dtype) if bias else None)

    # -- layout -------------------------------------------------------------------------------
    def _cols(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=self.dtype)
        if a.ndim == 1:  # one sample
            a = a[:, None] if self.layout == "columns" else a[None, :]
        return a if self.layout == "columns" else a.T

    def _out(self, a: np.ndarray) -> np.ndarray:
        return a if self.layout == "columns" else a.T

    # -- forward / loss / backward --------------------------------------------------------------
    def _forward(self, x_cols: np.ndarray) -> list[np.ndarray]:
        """Activations of every layer, inputs first (columns)."""
        activations = [x_cols]
        for w, b in zip(self.weights, self.biases):
            z = w @ activations[-1]
            if b is not None:
                z = z + b
            activations.append(sigmoid(z))
        return activations

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._out(self._forward(self._cols(x))[-1])

    def loss(self, x: np.ndarray, d: np.ndarray, reduction: str = "sum") -> float:
        """``1/2 * sum (y - d)^2`` over units and samples (``"mean"``: divided by the samples)."""
        y, d = self._forward(self._cols(x))[-1], self._cols(d)
        total = 0.5 * float(np.sum((y - d) ** 2))
        return total / y.shape[1] if reduction == "mean" else total

    def gradients(
        self, x: np.ndarray, d: np.ndarray, reduction: str = "sum"
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Back-propagation: ``(dW per layer, db per layer)`` of :meth:`loss`."""
        return self._backward(self._forward(self._cols(x)), self._cols(d), reduction)

    def _backward(
        self, activations: list[np.ndarray], d: np.ndarray, reduction: str
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction={reduction!r} is invalid; allowed: {', '.join(REDUCTIONS)}")
        scale = 1.0 / d.shape[1] if reduction == "mean" else 1.0
        y = activations[-1]
        delta = (y - d) * y * (1.0 - y) * scale
        grad_w: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        grad_b: list[np.ndarray | None] = [None] * len(self.weights)
        for layer in range(len(self.weights) - 1, -1, -1):
            grad_w[layer] = delta @ activations[layer].T
            if self.biases[layer] is not None:
                grad_b[layer] = delta.sum(axis=1, keepdims=True)
            if layer > 0:
                a = activations[layer]
                delta = (self.weights[layer].T @ delta) * a * (1.0 - a)
        return grad_w, grad_b

    def step(self, grad_w: list[np.ndarray], grad_b: list[np.ndarray | None], lr: float) -> None:
        """One gradient-descent step."""
        for i, (gw, gb) in enumerate(zip(grad_w, grad_b)):
            self.weights[i] -= lr * gw
            if gb is not None:
                self.biases[i] -= lr * gb

    # -- training / prediction ------------------------------------------------------------------
    def train_epoch(self, x: np.ndarray, d: np.ndarray, lr: float, batch_size: int, rng: np.random.Generator) -> float:
        """One pass over shuffled mini-batches (mean reduction); returns the epoch's mean
        per-sample loss (each batch's loss measured before its step)."""
        x, d = self._cols(x), self._cols(d)
        n = x.shape[1]
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            activations, db = self._forward(x[:, idx]), d[:, idx]
            total += 0.5 * float(np.sum((activations[-1] - db) ** 2))
            self.step(*self._backward(activations, db, "mean"), lr=lr)
        return total / n

    def fit(
        self, x: np.ndarray, d: np.ndarray, epochs: int, lr: float, batch_size: int = 1, seed: int = 0
    ) -> list[float]:
        """Train; returns the loss history (one mean per-sample loss per epoch)."""
        rng = np.random.default_rng(seed)
        return [self.train_epoch(x, d, lr, batch_size, rng) for _ in range(epochs)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices: arg-max of the outputs, or ``output > 0.5`` for one output unit."""
        y = self._forward(self._cols(x))[-1]
        return (y[0] > 0.5).astype(np.int64) if y.shape[0] == 1 else y.argmax(axis=0)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Labels as the net's targets (one-hot, or the 0/1 label for one output unit), in its layout."""
        labels = np.asarray(labels, dtype=np.int64)
        n_out = self.sizes[-1]
        cols = labels[None, :].astype(self.dtype) if n_out == 1 else np.eye(n_out, dtype=self.dtype)[:, labels]
        return self._out(cols)


def numpy_mlp(
    input_dim: int,
    num_classes: int,
    hidden_sizes: Sequence[int] = (32, 16),
    single_output: bool = False,
    bias: bool = True,
    init_std: float | None = None,
    seed: int = 0,
    activation: str = "sigmoid",
    output_activation: str | None = "sigmoid",
) -> NumpyMLP:
    """``model=numpy_mlp``: a :class:`NumpyMLP` sized from the data (samples as rows).

    ``activation``/``output_activation`` are accepted so that presets written for the torch
    MLP (sigmoid hidden and output) run with ``model=numpy_mlp``; anything but sigmoid is refused.
    """
    for key, value in (("model.activation", activation), ("model.output_activation", output_activation)):
        if value != "sigmoid":
            raise ConfigError(
                f"{key}={value!r} is invalid for model=numpy_mlp; allowed: sigmoid (the lessons' NumPy net)"
            )
    sizes = list(hidden_sizes) if isinstance(hidden_sizes, Sequence) and not isinstance(hidden_sizes, str) else None
    if not sizes:
        raise ConfigError(
            f"model.hidden_sizes={hidden_sizes!r} is invalid; allowed: a non-empty list of positive integers"
        )
    for i, h in enumerate(sizes):
        positive_int(f"model.hidden_sizes[{i}]", h)
    if single_output and num_classes != 2:
        raise ConfigError(f"model.single_output=true needs 2 classes, the data has {num_classes}; allowed: false")
    out = 1 if single_output else num_classes
    return NumpyMLP([input_dim, *sizes, out], layout="rows", bias=bias, init_std=init_std, seed=seed)

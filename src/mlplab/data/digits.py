"""sklearn's 8x8 digits: 1,797 images that ship with scikit-learn (no network needed)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from mlplab.data.tensor import TensorDataModule, normalise, split_indices
from mlplab.validation import held_out_count

N_DIGITS = 1797


class DigitsDataModule(TensorDataModule):
    """Pixels (0-16) scaled to [0, 1] as in Lesson A; seeded random train/val/test split.

    ``test_size`` is a count or a fraction of all 1,797 images (default 0.25, the lesson's);
    ``val_size``/``train_size`` are counts or fractions of what the test set leaves.
    """

    input_shape = (1, 8, 8)
    class_names = tuple(str(i) for i in range(10))

    def __init__(
        self,
        batch_size: int = 32,
        test_size: int | float = 0.25,
        val_size: int | float = 0.1,
        train_size: int | float | None = None,
        split_seed: int = 42,
        eval_batch_size: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        augment: nn.Module | None = None,
    ) -> None:
        self.test_size, self.n_test = held_out_count(test_size, N_DIGITS, "images")
        self.expected_pool_size = N_DIGITS - self.n_test
        self.mean, self.std = float(mean), float(std)
        super().__init__(batch_size, val_size, train_size, split_seed, eval_batch_size, augment)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).div_(16.0)
        y = torch.tensor(digits.target, dtype=torch.long)
        normalise(x, self.mean, self.std)
        # The test set is drawn first, with its own stream of the same seed, so it does not
        # change when train/val sizes change.
        test_idx, pool_idx = split_indices(len(y), (self.n_test, len(y) - self.n_test), self.split_seed)
        return x[pool_idx], y[pool_idx], x[test_idx], y[test_idx]

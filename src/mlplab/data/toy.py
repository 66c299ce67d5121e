"""The lessons' toy problems in 2-D: XOR (Lesson A) and sklearn's two moons (Lesson B).

Same interface as the image DataModules (``input_dim``, ``num_classes``, ``class_names``,
``input_shape``), so every net and engine trains on them unchanged.
"""

from __future__ import annotations

import torch
from sklearn.datasets import make_moons
from torch import Tensor

from mlplab.data.tensor import TensorDataModule, split_indices
from mlplab.validation import held_out_count, int_in, non_negative_number, positive_int

XOR_X = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))
XOR_Y = (0, 1, 1, 0)


class XORDataModule(TensorDataModule):
    """The four XOR points, labels 0 1 1 0.

    As in the lesson there is nothing to hold out: train, validation and test are all the
    same four points, so ``val/acc`` and ``test/acc`` say whether the net has *learnt* XOR
    (1.0), not whether it generalises.
    """

    input_shape = (2,)
    class_names = ("0", "1")

    def __init__(self, batch_size: int = 4, eval_batch_size: int | None = None, augment: None = None) -> None:
        # val_size is required by the base class; XOR does not split (see splits()).
        super().__init__(batch_size, 1, None, 0, eval_batch_size, augment)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = torch.tensor(XOR_X), torch.tensor(XOR_Y)
        return x, y, x.clone(), y.clone()

    def splits(self) -> tuple[tuple[Tensor, Tensor], ...]:
        x, y, _, _ = self.load()
        return (x, y), (x.clone(), y.clone()), (x.clone(), y.clone())


class MoonsDataModule(TensorDataModule):
    """sklearn's ``make_moons``: two interleaving half circles, 2 classes.

    Defaults are Lesson B's (``n_samples=200, noise=0.15, random_state=123``). The test set
    (``test_size``, a count or fraction of all points) is drawn first with ``split_seed``;
    ``val_size``/``train_size`` are counts or fractions of the rest.
    """

    input_shape = (2,)
    class_names = ("0", "1")

    def __init__(
        self,
        n_samples: int = 200,
        noise: float = 0.15,
        random_state: int = 123,
        batch_size: int = 32,
        test_size: int | float = 0.25,
        val_size: int | float = 0.2,
        train_size: int | float | None = None,
        split_seed: int = 42,
        eval_batch_size: int | None = None,
        augment: None = None,
    ) -> None:
        self.n_samples = positive_int("data.n_samples", n_samples)
        self.noise = non_negative_number("data.noise", noise)
        self.random_state = int_in("data.random_state", random_state, low=0)
        self.test_size, self.n_test = held_out_count(test_size, self.n_samples, "points")
        self.expected_pool_size = self.n_samples - self.n_test
        super().__init__(batch_size, val_size, train_size, split_seed, eval_batch_size, augment)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_np, y_np = make_moons(n_samples=self.n_samples, noise=self.noise, random_state=self.random_state)
        x, y = torch.tensor(x_np, dtype=torch.float32), torch.tensor(y_np, dtype=torch.long)
        test_idx, pool_idx = split_indices(len(y), (self.n_test, len(y) - self.n_test), self.split_seed)
        return x[pool_idx], y[pool_idx], x[test_idx], y[test_idx]

"""The shared data path: whole splits as tensors, batches by tensor indexing.

A dataset is loaded once, converted to float and normalised once, split with a seeded
``torch.Generator`` and served through a standard :class:`~torch.utils.data.DataLoader`
whose sampler, :class:`BatchSliceSampler`, yields one ``slice`` of positions per batch.
:class:`BatchTensorDataset` turns a slice into a batch with one gather through its
current order (a permutation redrawn each epoch for training) -- or, for evaluation, a
zero-copy view. No per-sample Python, no PIL, no worker processes. On a GPU the tensors
are moved to the device once, in ``setup``, and the permutation is drawn there too, so
a training step copies nothing from the host.

Under DDP the sampler itself gives each rank its share (Lightning's distributed sampler
is off: ``trainer.use_distributed_sampler=false``). ``data.batch_size`` is per rank.
Training: every rank draws the same permutation (same seed, same epoch) and takes its
own contiguous block of ``ceil(n / ranks)`` positions, padded by wrapping around, so all
ranks take the same number of steps (DDP needs that). Evaluation: the blocks partition
the ``n`` samples exactly (sizes differ by at most one) -- no padding, so every sample
counts once in the synced metrics.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from mlplab.errors import ConfigError
from mlplab.validation import positive_int, resolve_size, size_or_fraction


class BatchTensorDataset(Dataset):
    """Tensors sharing their first dimension, indexed by a row or by a slice of positions.

    ``order`` (a permutation, or None for the stored order) maps slice positions to rows:
    ``ds[0:64]`` is the first 64 rows *in that order*, gathered at once (a zero-copy view
    when ``order`` is None). An integer index is a stored row.
    """

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors or any(t.size(0) != tensors[0].size(0) for t in tensors):
            raise ValueError("BatchTensorDataset needs tensors with the same first dimension")
        self.tensors = tensors
        self.order: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def to(self, device: torch.device | str) -> "BatchTensorDataset":
        """Move the tensors (once); returns self."""
        self.tensors = tuple(t.to(device) for t in self.tensors)
        self.order = None if self.order is None else self.order.to(device)
        return self

    def __len__(self) -> int:
        return self.tensors[0].size(0)

    def __getitem__(self, index: int | slice) -> tuple[Tensor, ...]:
        if isinstance(index, slice) and self.order is not None:
            # index_select copies whole rows, faster on a CPU than t[rows]
            # (advanced indexing walks element by element; docs: Speed).
            rows = self.order[index]
            return tuple(t.index_select(0, rows) for t in self.tensors)
        return tuple(t[index] for t in self.tensors)


class BatchSliceSampler(Sampler[slice]):
    """One ``slice(start, stop)`` of positions per batch, in order; the last may be short.

    With ``shuffle`` (training), each epoch first draws a new ``order`` for the dataset on
    the dataset's device, seeded by ``seed + epoch``: reproducible, and the same on every
    DDP rank. Lightning calls :meth:`set_epoch`; without it the epoch counts up by itself.

    With ``num_replicas > 1`` this rank (``rank``) walks only its own block of positions
    (see the module doc): with ``shuffle`` equal blocks of ``ceil(n / num_replicas)``,
    the order padded by wrapping around; without, an exact partition of the ``n`` samples.
    """

    def __init__(
        self,
        dataset: BatchTensorDataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def block(self) -> tuple[int, int]:
        """``(start, stop)``: the positions this rank walks."""
        n, world, rank = len(self.dataset), self.num_replicas, self.rank
        if self.shuffle:
            share = math.ceil(n / world)
            return rank * share, (rank + 1) * share
        return rank * n // world, (rank + 1) * n // world

    def __len__(self) -> int:
        start, stop = self.block()
        return math.ceil((stop - start) / self.batch_size)

    def __iter__(self) -> Iterator[slice]:
        n = len(self.dataset)
        start, stop = self.block()
        if self.shuffle:
            gen = torch.Generator(device=self.dataset.device).manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen, device=self.dataset.device)
            padded = self.num_replicas * (stop - start)
            if padded > n:  # wrap around: the first positions serve twice
                order = order.repeat(math.ceil(padded / n))[:padded]
            self.dataset.order = order
            self.epoch += 1
        for begin in range(start, stop, self.batch_size):
            yield slice(begin, min(begin + self.batch_size, stop))


class SequentialSliceSampler(BatchSliceSampler, SequentialSampler):
    """A :class:`BatchSliceSampler` that never shuffles, and says so by its type.

    Under ``trainer.overfit_batches`` Lightning swaps every loader's sampler that is not a
    :class:`~torch.utils.data.SequentialSampler` for one that yields single indices -- with
    ``batch_size=None`` each batch would then be one unbatched row. Evaluation loaders, and
    the training loader when overfitting, use this class so that Lightning keeps them.
    """

    def __init__(self, dataset: BatchTensorDataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        BatchSliceSampler.__init__(self, dataset, batch_size, shuffle=False, num_replicas=num_replicas, rank=rank)
        self.data_source = dataset  # SequentialSampler's attribute


def split_indices(
    n: int,
    sizes: Sequence[int],
    seed: int,
) -> list[Tensor]:
    """Disjoint random index sets of the given sizes from ``range(n)``, seeded."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} samples, only {n} exist")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


class TensorDataModule(L.LightningDataModule):
    """Base for in-memory datasets.

    Subclasses set ``input_shape`` and ``class_names`` and implement :meth:`load`, which
    returns ``(x_pool, y_pool, x_test, y_test)``: float inputs already scaled and
    normalised, int64 labels. The *pool* is split here into train and validation sets.

    Split sizes are a count (int) or a fraction of the pool (float); ``train_size=None``
    takes whatever the validation set leaves.

    ``augment`` (image data only, off by default) is a module applied to each *training*
    batch after it reached its device (:meth:`on_after_batch_transfer`), e.g.
    ``kornia.augmentation.RandomAffine``: random parameters per image, drawn from torch's
    seeded global generator. Validation and test batches are never touched.
    """

    input_shape: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    #: Size of the train+val pool when it is known before loading (for early errors).
    expected_pool_size: int | None = None

    def __init__(
        self,
        batch_size: int = 64,
        val_size: int | float = 0.1,
        train_size: int | float | None = None,
        split_seed: int = 42,
        eval_batch_size: int | None = None,
        augment: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if augment is not None and len(self.input_shape) != 3:
            raise ConfigError(
                f"data.augment is set but {type(self).__name__} is not image data (input shape {self.input_shape}); "
                "allowed: augment=none for this data"
            )
        self.augment = augment
        self.batch_size = positive_int("data.batch_size", batch_size)
        self.eval_batch_size = positive_int(
            "data.eval_batch_size", eval_batch_size if eval_batch_size is not None else max(batch_size, 1000)
        )
        self.val_size = size_or_fraction("data.val_size", val_size)
        self.train_size = size_or_fraction("data.train_size", train_size, optional=True)
        if not isinstance(split_seed, int) or isinstance(split_seed, bool):
            raise ConfigError(f"data.split_seed={split_seed!r} is invalid; allowed: an integer")
        self.split_seed = split_seed
        if self.expected_pool_size is not None:
            self.split_sizes(self.expected_pool_size)
        #: Minibatches per training batch (set by mlplab.engines.lightning for fused steps): a training
        #: batch is then a block of up to ``steps_per_call * batch_size`` rows, the same
        #: minibatches back to back, which ``Classifier.fuse_steps`` cuts apart again.
        self.steps_per_call = 1
        self.data_train: BatchTensorDataset | None = None
        self.data_val: BatchTensorDataset | None = None
        self.data_test: BatchTensorDataset | None = None

    # -- metadata the model is sized from -------------------------------------------------
    @property
    def input_dim(self) -> int:
        return int(torch.Size(self.input_shape).numel())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- splitting ------------------------------------------------------------------------
    def split_sizes(self, pool: int) -> tuple[int, int]:
        """(train, val) counts for a pool of ``pool`` samples; raises ConfigError if they do not fit."""
        val = resolve_size(self.val_size, pool)
        if val >= pool:
            raise ConfigError(
                f"data.val_size={self.val_size} asks for {val} validation samples, but only {pool} are available "
                f"for train+val; allowed: a count <= {pool - 1} or a fraction in (0, 1)"
            )
        train = pool - val if self.train_size is None else resolve_size(self.train_size, pool)
        if train + val > pool:
            raise ConfigError(
                f"data.train_size={self.train_size} and data.val_size={self.val_size} ask for "
                f"{train} train + {val} val samples, but only {pool} are available for train+val; "
                f"allowed: train + val <= {pool}"
            )
        return train, val

    def check_available(self) -> None:
        """Raise :class:`~mlplab.errors.DataError` now if the data cannot be had (cheap, writes nothing)."""

    # -- Lightning hooks ------------------------------------------------------------------
    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def splits(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(x, y)`` of train, validation and test: the pool from :meth:`load`, split seeded."""
        x_pool, y_pool, x_test, y_test = self.load()
        n_train, n_val = self.split_sizes(x_pool.size(0))
        train_idx, val_idx = split_indices(x_pool.size(0), (n_train, n_val), self.split_seed)
        return (x_pool[train_idx], y_pool[train_idx]), (x_pool[val_idx], y_pool[val_idx]), (x_test, y_test)

    def setup(self, stage: str | None = None) -> None:
        """Load and split once (a run loads its data before it writes any output); on an
        accelerator, the Trainer's call moves the whole dataset there, once."""
        if self.data_train is None:
            train, val, test = self.splits()
            self.data_train, self.data_val, self.data_test = (BatchTensorDataset(*s) for s in (train, val, test))
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type != "cpu" and self.data_train.tensors[0].device != device:
            for ds in (self.data_train, self.data_val, self.data_test):
                ds.to(device)

    def _loader(self, dataset: BatchTensorDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if len(dataset) < world:
            raise ConfigError(
                f"trainer.devices={world} processes in all is invalid for a split of {len(dataset)} samples; "
                f"allowed: at most {len(dataset)} processes (each rank needs a sample), or larger splits"
            )
        sampler: BatchSliceSampler
        if shuffle:
            # torch.initial_seed() is the run's seed (seed_everything), the same on every rank.
            sampler = BatchSliceSampler(
                dataset, batch_size, shuffle=True, seed=torch.initial_seed(), num_replicas=world, rank=rank
            )
        else:
            sampler = SequentialSliceSampler(dataset, batch_size, num_replicas=world, rank=rank)
        return DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_as_is)

    def train_dataloader(self) -> DataLoader:
        # Overfitting wants the same batches every epoch: in stored order, as Lightning does.
        overfit = self.trainer is not None and (getattr(self.trainer, "overfit_batches", 0) or 0) > 0
        return self._loader(self.data_train, self.batch_size * self.steps_per_call, shuffle=not overfit)

    def train_steps_per_epoch(self) -> int:
        """Minibatches of ``batch_size`` in one training epoch on this rank (call after setup)."""
        return len(self._loader(self.data_train, self.batch_size, shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Augment training batches (only those) on their device."""
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            x, y = batch
            batch = (self.augment(x), y)
        return batch


def _as_is(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The dataset already returns a whole batch."""
    return batch


def normalise(x: Tensor, mean: float, std: float) -> Tensor:
    """In place ``(x - mean) / std``; returns ``x``."""
    if mean:
        x.sub_(mean)
    if std != 1:
        x.div_(std)
    return x

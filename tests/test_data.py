"""DataModules: split sizes and disjointness, seeding, values, IDX files, DataLoaders, real data."""

from __future__ import annotations

import gzip
import math
import socket
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from torchvision.datasets import MNIST

from conftest import RAW_NAMES, write_tiny_mnist
from mlplab.data import BatchSliceSampler, DigitsDataModule, FashionMNISTDataModule, MNISTDataModule, split_indices
from mlplab.errors import ConfigError, DataError

N_DIGITS = 1797


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Each sample (pixels + label) as a hashable row; a multiset of them."""
    flat = x.reshape(x.size(0), -1).numpy()
    return Counter(flat[i].tobytes() + bytes([int(y[i])]) for i in range(len(y)))


def _digits(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def digits_default() -> DigitsDataModule:
    return _digits()


# -- split_indices -------------------------------------------------------------------------------


def test_split_indices_disjoint_sized_seeded():
    a, b, c = split_indices(100, (50, 30, 15), seed=3)
    assert [len(a), len(b), len(c)] == [50, 30, 15]
    all_idx = torch.cat([a, b, c])
    assert len(set(all_idx.tolist())) == 95  # disjoint
    assert all_idx.min() >= 0 and all_idx.max() < 100
    again = split_indices(100, (50, 30, 15), seed=3)
    assert all(torch.equal(x, y) for x, y in zip((a, b, c), again))
    other = split_indices(100, (50, 30, 15), seed=4)
    assert not torch.equal(a, other[0])
    # sizes that add up to n: a permutation of range(n)
    (whole,) = split_indices(10, (10,), seed=0)
    assert sorted(whole.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="101"):
        split_indices(100, (60, 41), seed=0)


# -- digits --------------------------------------------------------------------------------------


def test_digits_default_sizes(digits_default):
    dm = digits_default
    n_test = round(0.25 * N_DIGITS)  # test_size 0.25 of all images
    n_val = round(0.1 * (N_DIGITS - n_test))  # val_size 0.1 of what the test set leaves
    n_train = N_DIGITS - n_test - n_val
    assert n_test in (449, 450)
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (n_train, n_val, n_test)
    assert len(dm.data_train) + len(dm.data_val) + len(dm.data_test) == N_DIGITS


def test_digits_splits_are_a_partition_of_the_dataset(digits_default):
    dm = digits_default
    digits = load_digits()
    full = _rows(torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1), torch.tensor(digits.target))
    parts = [_rows(*d.tensors) for d in (dm.data_train, dm.data_val, dm.data_test)]
    # pairwise disjoint ...
    for i in range(3):
        for j in range(i + 1, 3):
            assert not (parts[i].keys() & parts[j].keys())
    # ... and together exactly the 1,797 images with their labels
    assert parts[0] + parts[1] + parts[2] == full


def test_digits_tensors_shapes_range_metadata(digits_default):
    dm = digits_default
    for ds in (dm.data_train, dm.data_val, dm.data_test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == (x.size(0),)
        assert y.min() >= 0 and y.max() <= 9
    x_all = torch.cat([d.tensors[0] for d in (dm.data_train, dm.data_val, dm.data_test)])
    assert x_all.min().item() == 0.0 and x_all.max().item() == 1.0
    assert dm.input_shape == (1, 8, 8) and dm.input_dim == 64 and dm.num_classes == 10
    assert dm.class_names == tuple(str(i) for i in range(10))
    y_all = torch.cat([d.tensors[1] for d in (dm.data_train, dm.data_val, dm.data_test)])
    assert torch.bincount(y_all, minlength=10).tolist() == np.bincount(load_digits().target).tolist()


def test_digits_same_seed_same_split_other_seed_other_split(digits_default):
    a, b = digits_default, _digits(split_seed=42)
    for da, db in zip((a.data_train, a.data_val, a.data_test), (b.data_train, b.data_val, b.data_test)):
        assert all(torch.equal(ta, tb) for ta, tb in zip(da.tensors, db.tensors))
    c = _digits(split_seed=7)
    assert len(c.data_test) == len(a.data_test)
    assert _rows(*c.data_test.tensors) != _rows(*a.data_test.tensors)
    assert _rows(*c.data_val.tensors) != _rows(*a.data_val.tensors)


def test_digits_test_set_does_not_depend_on_train_val_sizes(digits_default):
    other = _digits(val_size=300, train_size=200)
    assert torch.equal(other.data_test.tensors[0], digits_default.data_test.tensors[0])
    assert torch.equal(other.data_test.tensors[1], digits_default.data_test.tensors[1])


def test_digits_split_by_counts():
    dm = _digits(test_size=300, val_size=100, train_size=500)
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (500, 100, 300)
    parts = [_rows(*d.tensors) for d in (dm.data_train, dm.data_val, dm.data_test)]
    assert sum(parts, Counter()).total() == 900 and len(sum(parts, Counter())) == 900


def test_digits_split_by_fractions():
    dm = _digits(test_size=0.2, val_size=0.25, train_size=0.5)
    n_test = round(0.2 * N_DIGITS)
    pool = N_DIGITS - n_test
    assert len(dm.data_test) == n_test
    assert len(dm.data_val) == round(0.25 * pool)
    assert len(dm.data_train) == round(0.5 * pool)
    assert len(dm.data_train) + len(dm.data_val) < pool  # the rest is unused


def test_digits_mean_std_normalise():
    plain, norm = _digits(), _digits(mean=0.5, std=0.25)
    assert torch.allclose(norm.data_train.tensors[0], (plain.data_train.tensors[0] - 0.5) / 0.25)
    assert torch.equal(norm.data_train.tensors[1], plain.data_train.tensors[1])


# -- DataLoaders ---------------------------------------------------------------------------------


def test_train_loader_batches_and_last_partial_batch(digits_default):
    dm = digits_default
    n_train = len(dm.data_train)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == math.ceil(n_train / 32) == len(loader)
    for x, y in batches[:-1]:
        assert isinstance(x, torch.Tensor) and x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
        assert isinstance(y, torch.Tensor) and y.shape == (32,) and y.dtype == torch.int64
    last_x, last_y = batches[-1]
    expected_last = n_train - 32 * (len(batches) - 1)
    assert expected_last == (n_train % 32 or 32)
    assert last_x.shape == (expected_last, 1, 8, 8) and last_y.shape == (expected_last,)
    # one epoch visits every training sample exactly once
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert _rows(xs, ys) == _rows(*dm.data_train.tensors)


def test_eval_loaders_are_in_order():
    dm = _digits(eval_batch_size=50)
    val = list(dm.val_dataloader())
    n_val = len(dm.data_val)
    assert [len(b[1]) for b in val] == [50] * (n_val // 50) + ([n_val % 50] if n_val % 50 else [])
    assert torch.equal(torch.cat([b[0] for b in val]), dm.data_val.tensors[0])
    test = list(dm.test_dataloader())
    assert torch.equal(torch.cat([b[1] for b in test]), dm.data_test.tensors[1])
    sampler = dm.val_dataloader().sampler
    assert isinstance(sampler, BatchSliceSampler) and not sampler.shuffle
    # evaluation batches are views of the stored tensors: no copy at all
    first_x, _ = next(iter(dm.val_dataloader()))
    assert first_x.untyped_storage().data_ptr() == dm.data_val.tensors[0].untyped_storage().data_ptr()
    # default eval batch: max(batch_size, 1000) -> one batch for digits' val set
    assert dm.eval_batch_size == 50 and _digits().eval_batch_size == 1000


def test_shuffle_is_reproducible_under_a_seed(digits_default):
    dm = digits_default

    def epoch_labels(seed: int, epoch: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    first, again, other = epoch_labels(123), epoch_labels(123), epoch_labels(124)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, dm.data_train.tensors[1])  # it is shuffled
    assert sorted(first.tolist()) == sorted(other.tolist())
    # a new order every epoch, the same for the same (seed, epoch)
    assert not torch.equal(epoch_labels(123, epoch=1), first)
    assert torch.equal(epoch_labels(123, epoch=1), epoch_labels(123, epoch=1))
    loader = dm.train_dataloader()  # without set_epoch the epoch counts up by itself
    assert not torch.equal(torch.cat([y for _, y in loader]), torch.cat([y for _, y in loader]))


def _rank_loaders(dm: DigitsDataModule, stage: str, world: int) -> list[DataLoader]:
    """The loader each of ``world`` DDP ranks gets (every rank runs with the same seed)."""
    loaders = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        torch.manual_seed(7)
        loaders.append(getattr(dm, f"{stage}_dataloader")())
    dm.trainer = None
    return loaders


def test_train_loader_is_standard_and_sharded_per_rank():
    dm = _digits()
    loader = dm.train_dataloader()
    assert type(loader) is DataLoader and loader.num_workers == 0
    assert isinstance(loader.sampler, BatchSliceSampler) and loader.sampler.shuffle
    assert loader.batch_size is None and len(loader) == math.ceil(len(dm.data_train) / 32)

    # Under DDP: data.batch_size is per rank; every rank takes the same number of steps,
    # ceil(ceil(n / ranks) / batch_size), and together they see every sample of the epoch.
    n = len(dm.data_train)  # 1213: odd, so one sample is served twice (padding)
    for world in (2, 3):
        share = math.ceil(n / world)
        seen = []
        for rank_loader in _rank_loaders(dm, "train", world):
            batches = list(rank_loader)
            assert len(rank_loader) == len(batches) == math.ceil(share / 32)
            assert [len(y) for _, y in batches] == [32] * (share // 32) + ([share % 32] if share % 32 else [])
            seen.append(torch.cat([x for x, _ in batches]))
        both = torch.cat(seen)
        assert len(both) == world * share and world * share - n < world
        assert set(_rows(both, torch.zeros(len(both), dtype=torch.long))) == set(
            _rows(dm.data_train.tensors[0], torch.zeros(n, dtype=torch.long))
        )
    # One rank: the same batches as before sharding existed (0..n in steps of batch_size).
    torch.manual_seed(7)
    assert [(s.start, s.stop) for s in dm.train_dataloader().sampler] == [(i, min(i + 32, n)) for i in range(0, n, 32)]


@pytest.mark.parametrize("world", [2, 3])
def test_eval_loaders_shard_every_sample_exactly_once(world):
    dm = _digits(eval_batch_size=100)
    n = len(dm.data_test)
    assert n == 449  # divides by neither 2 nor 3 ranks, nor by the batch size
    parts = [torch.cat([y for _, y in rank_loader]) for rank_loader in _rank_loaders(dm, "test", world)]
    # contiguous blocks, sizes differing by at most one, no padding: the stored order, once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert torch.equal(torch.cat(parts), dm.data_test.tensors[1])
    assert all(len(y) <= 100 for rank_loader in _rank_loaders(dm, "val", world) for _, y in rank_loader)


def test_too_many_ranks_for_a_split():
    dm = _digits(val_size=2)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ConfigError, match=r"trainer.devices=3 processes in all is invalid for a split of 2 samples"):
        dm.val_dataloader()


# -- MNIST / Fashion-MNIST from IDX files ------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to download or open a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(MNIST, "download", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _scaled(arr: np.ndarray, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return (torch.from_numpy(arr).unsqueeze(1).float() / 255.0 - mean) / std


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize(
    ("cls", "folder", "mean", "std"),
    [(MNISTDataModule, "MNIST", 0.0, 1.0), (FashionMNISTDataModule, "FashionMNIST", 0.5, 0.5)],
)
def test_idx_files_load_with_values_labels_and_splits(tmp_path, no_network, download, cls, folder, mean, std):
    arrays = write_tiny_mnist(tmp_path, folder=folder, n_train=60, n_test=20)
    dm = cls(data_dir=str(tmp_path), download=download, val_size=10, batch_size=16, mean=mean, std=std)
    assert dm.raw_folder == tmp_path / folder / "raw"
    dm.prepare_data()
    # the .gz archives were extracted next to themselves
    for name in RAW_NAMES:
        assert (tmp_path / folder / "raw" / name.removesuffix(".gz")).is_file()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (50, 10, 20)
    # official test set = the t10k files, in order
    x_test, y_test = dm.data_test.tensors
    assert x_test.shape == (20, 1, 28, 28) and x_test.dtype == torch.float32
    assert torch.allclose(x_test, _scaled(arrays["t10k-images-idx3-ubyte.gz"], mean, std), atol=1e-6)
    assert y_test.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    # train/val: the seeded split of the train file
    train_idx, val_idx = split_indices(60, (50, 10), seed=42)
    x_pool = _scaled(arrays["train-images-idx3-ubyte.gz"], mean, std)
    y_pool = torch.from_numpy(arrays["train-labels-idx1-ubyte.gz"]).long()
    assert torch.allclose(dm.data_train.tensors[0], x_pool[train_idx], atol=1e-6)
    assert torch.equal(dm.data_train.tensors[1], y_pool[train_idx])
    assert torch.allclose(dm.data_val.tensors[0], x_pool[val_idx], atol=1e-6)
    assert torch.equal(dm.data_val.tensors[1], y_pool[val_idx])
    lo, hi = (0 - mean) / std, (1 - mean) / std
    assert x_pool.min() >= lo and x_pool.max() <= hi
    assert dm.input_dim == 784 and dm.num_classes == 10


def test_idx_train_size_and_val_size(tmp_path, no_network):
    write_tiny_mnist(tmp_path)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False, train_size=30, val_size=10)
    dm.setup()  # without prepare_data: setup extracts what it needs itself
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (30, 10, 20)
    assert not (_rows(*dm.data_train.tensors).keys() & _rows(*dm.data_val.tensors).keys())


def test_idx_already_extracted_files_are_used(tmp_path, no_network):
    gz_arrays = write_tiny_mnist(tmp_path, seed=0)
    raw = tmp_path / "MNIST" / "raw"
    # extracted files with *different* content (another seed) beside the archives
    other = write_tiny_mnist(tmp_path / "other", seed=1)
    for name in RAW_NAMES:
        with gzip.open(tmp_path / "other" / "MNIST" / "raw" / name, "rb") as src:
            (raw / name.removesuffix(".gz")).write_bytes(src.read())
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False, val_size=10)
    dm.prepare_data()
    dm.setup()
    expected = _scaled(other["t10k-images-idx3-ubyte.gz"])
    assert torch.equal(dm.data_test.tensors[0], expected)
    assert not torch.equal(expected, _scaled(gz_arrays["t10k-images-idx3-ubyte.gz"]))

    # extracted files alone, no archives, also work
    for name in RAW_NAMES:
        (raw / name).unlink()
    dm2 = MNISTDataModule(data_dir=str(tmp_path), download=False, val_size=10)
    dm2.prepare_data()
    dm2.setup()
    assert torch.equal(dm2.data_test.tensors[0], expected)


def test_missing_files_offline_raise_data_error_naming_files_and_folder(tmp_path, no_network):
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in msg
    for name in RAW_NAMES:
        assert name in msg
    # only the missing one is named
    write_tiny_mnist(tmp_path / "partial", folder="FashionMNIST")
    (tmp_path / "partial" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "partial"), download=False)
    with pytest.raises(DataError) as info:
        dm.setup()
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(dm.raw_folder) in msg
    assert "train-images-idx3-ubyte.gz" not in msg


def test_failed_download_raises_data_error(tmp_path, monkeypatch):
    def no_route(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(MNIST, "download", no_route)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "download failed" in msg and "no route to host" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "t10k-images-idx3-ubyte.gz" in msg


# -- real data -------------------------------------------------------------------------------


def test_real_mnist(real_data_dir):
    dm = MNISTDataModule(data_dir=str(real_data_dir), download=False)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (55_000, 5_000, 10_000)
    x_pool = torch.cat([dm.data_train.tensors[0], dm.data_val.tensors[0]])
    assert x_pool.min().item() == 0.0 and x_pool.max().item() == 1.0
    # MNIST's well-known pixel statistics (0.1307, 0.3081) for the 60,000 training images
    assert x_pool.mean().item() == pytest.approx(0.1307, abs=5e-4)
    assert x_pool.std().item() == pytest.approx(0.3081, abs=5e-4)
    # the test set is the official t10k set, in order
    official = MNIST(str(real_data_dir), train=False, download=False)
    assert torch.equal(dm.data_test.tensors[1], official.targets)
    assert torch.equal(dm.data_test.tensors[0], official.data.unsqueeze(1).float() / 255)
    assert sorted(torch.unique(dm.data_train.tensors[1]).tolist()) == list(range(10))


def test_real_fashion_mnist(real_data_dir):
    dm = FashionMNISTDataModule(data_dir=str(real_data_dir), download=False, mean=0.5, std=0.5)
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (55_000, 5_000, 10_000)
    assert dm.class_names[0] == "T-shirt/top" and len(dm.class_names) == 10
    x_all = torch.cat([d.tensors[0] for d in (dm.data_train, dm.data_val, dm.data_test)])
    assert x_all.min().item() == -1.0 and x_all.max().item() == 1.0
    # Fashion-MNIST is balanced: 1,000 test images per class
    assert torch.bincount(dm.data_test.tensors[1]).tolist() == [1000] * 10

    lesson = FashionMNISTDataModule(
        data_dir=str(real_data_dir), download=False, train_size=10_000, val_size=1_000, mean=0.5, std=0.5
    )
    lesson.setup()
    assert (len(lesson.data_train), len(lesson.data_val), len(lesson.data_test)) == (10_000, 1_000, 10_000)
    assert torch.equal(lesson.data_test.tensors[0], dm.data_test.tensors[0])
    assert not (_rows(*lesson.data_train.tensors).keys() & _rows(*lesson.data_val.tensors).keys())


def test_setup_moves_the_data_to_the_trainers_device_once():
    # No GPU here: a stand-in trainer whose root device is "meta" shows where setup puts the data.
    from types import SimpleNamespace

    dm = DigitsDataModule()
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    dm.setup("fit")
    for ds in (dm.data_train, dm.data_val, dm.data_test):
        assert ds.device.type == "meta" and all(t.device.type == "meta" for t in ds.tensors)
    cpu = DigitsDataModule()
    cpu.setup("fit")  # no trainer: stays on the CPU
    assert cpu.data_train.device.type == "cpu"

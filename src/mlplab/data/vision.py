"""MNIST and Fashion-MNIST from torchvision, held as tensors.

The official 10,000-image test set is the test set; the 60,000 training images are the
pool that train and validation are split from. Files live in torchvision's layout,
``<data_dir>/<MNIST|FashionMNIST>/raw/``. :meth:`prepare_data` makes sure they are there:

1. extracted files (``train-images-idx3-ubyte`` ...) are used as they are;
2. else the ``.gz`` archives found there are extracted next to them (no network);
3. else, with ``download=True``, torchvision downloads them (its real download path);
4. else one :class:`~mlplab.errors.DataError` names the missing files and where to put them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.utils import extract_archive

from mlplab.data.tensor import TensorDataModule, normalise
from mlplab.errors import DataError


class TorchvisionIDXDataModule(TensorDataModule):
    """Shared code for torchvision's IDX-file datasets (MNIST layout)."""

    dataset_cls: type[MNIST] = MNIST
    input_shape = (1, 28, 28)
    expected_pool_size = 60_000

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 128,
        val_size: int | float = 5000,
        train_size: int | float | None = None,
        split_seed: int = 42,
        eval_batch_size: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        augment: nn.Module | None = None,
    ) -> None:
        super().__init__(batch_size, val_size, train_size, split_seed, eval_batch_size, augment)
        self.data_dir = str(Path(os.path.expanduser(str(data_dir))))
        self.download = bool(download)
        self.mean, self.std = float(mean), float(std)

    @property
    def raw_folder(self) -> Path:
        return Path(self.data_dir) / self.dataset_cls.__name__ / "raw"

    def missing_files(self) -> list[str]:
        """Archive names (``*.gz``) with neither the archive nor its extracted file present."""
        raw = self.raw_folder
        names = [name for name, _md5 in self.dataset_cls.resources]
        return [n for n in names if not (raw / n).is_file() and not (raw / n.removesuffix(".gz")).is_file()]

    def _missing_message(self, missing: list[str]) -> str:
        name = self.dataset_cls.__name__
        return (
            f"{name} files missing in {self.raw_folder}: {', '.join(missing)}; put them there "
            f"(or set data.data_dir to a folder holding {name}/raw/, or data.download=true with network access)"
        )

    def check_available(self) -> None:
        missing = self.missing_files()
        if missing and not self.download:
            raise DataError(self._missing_message(missing))

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if missing and self.download:
            try:
                for train in (True, False):
                    self.dataset_cls(self.data_dir, train=train, download=True)
            except Exception as err:  # no network, a mirror down, a read-only dir ...
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DataError(f"{self._missing_message(missing)}; the download failed ({first_line})") from None
            missing = self.missing_files()
        if missing:
            raise DataError(self._missing_message(missing))
        for archive, _md5 in self.dataset_cls.resources:
            gz, plain = self.raw_folder / archive, self.raw_folder / archive.removesuffix(".gz")
            if not plain.is_file():
                try:
                    extract_archive(str(gz), str(self.raw_folder))
                except OSError as err:
                    raise DataError(f"cannot extract {gz} into {self.raw_folder}: {err.strerror or err}") from None

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = self.dataset_cls(self.data_dir, train=train, download=False)
        except Exception as err:
            raise DataError(f"cannot read {self.dataset_cls.__name__} from {self.raw_folder}: {err}") from None
        x = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)
        return normalise(x, self.mean, self.std), ds.targets.to(torch.long)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not all((self.raw_folder / n.removesuffix(".gz")).is_file() for n, _ in self.dataset_cls.resources):
            self.prepare_data()
        return (*self._read(train=True), *self._read(train=False))


class MNISTDataModule(TorchvisionIDXDataModule):
    """MNIST, pixels scaled to [0, 1] (Lesson C); ``mean``/``std`` normalise further."""

    dataset_cls = MNIST
    class_names = tuple(str(i) for i in range(10))


class FashionMNISTDataModule(TorchvisionIDXDataModule):
    """Fashion-MNIST; the config normalises with mean 0.5, std 0.5 as Lesson D does."""

    dataset_cls = FashionMNIST
    class_names = tuple(FashionMNIST.classes)

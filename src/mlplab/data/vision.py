"""MNIST and Fashion-MNIST from torchvision, held as tensors.

The official 10,000-image test set is the test set; the 60,000 training images are the
pool that train and validation are split from. Files live in torchvision's layout,
``<data_dir>/<MNIST|FashionMNIST>/raw/``. :meth:`prepare_data` makes sure they are there:

1. extracted files (``train-images-idx3-ubyte`` ...) are used as they are;
2. else the ``.gz`` archives found there are extracted next to them (no network);
3. else, with ``download=True``, torchvision downloads them (its real download path, which
   checks each archive's md5) into a temporary folder, moved into place only when complete;
4. else one :class:`~mlplab.errors.DataError` names the missing files, where to put them
   (``MLPLAB_DATA_DIR`` or ``data.data_dir``) and, after a failed download, its reason.

Nothing half-written ever passes for good: an archive is decompressed in memory and written
through :func:`mlplab.atomic.atomic_write_bytes` (a fresh temporary file, renamed when
complete; no planted symlink is written through); a download interrupted halfway leaves
nothing in ``raw/``. Every file read is checked (:func:`read_idx`): IDX magic and
dimensions, size against its header, images and labels counts, labels in range. A file
whose header claims the official dataset's size (60,000 or 10,000 items) must also match
the official file's md5 -- a truncated or corrupted download is refused with the file's
name. Smaller IDX files (your own, or the tests') get the structural checks only.

**A read-only folder of archives works**: when the extracted file cannot be written there
(a read-only mount, no write permission, a full disk), the archive is decompressed in
memory for this run only (MNIST: about 55 MB, well under a second) and nothing is written;
a read-only folder is logged at INFO, other write failures as a WARNING. Unusable files
are one :class:`~mlplab.errors.DataError` line naming the file: unreadable (permission
denied), a directory where a data file belongs, not a complete gzip archive, or failing
the checks above.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.datasets import MNIST, FashionMNIST

from mlplab.atomic import READ_ONLY_ERRNOS, atomic_write_bytes
from mlplab.data.tensor import TensorDataModule, normalise
from mlplab.errors import DataError, StorageError

log = logging.getLogger(__name__)

#: md5 of the official extracted files (torchvision's ``resources`` hold the archives' md5).
OFFICIAL_MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
#: Items in the official files: a header announcing these counts claims to be the official file.
OFFICIAL_COUNT = {"train": 60_000, "t10k": 10_000}
_FIX = "delete it and run again (with data.download=true it is fetched again)"


def _official_count(name: str) -> int:
    return OFFICIAL_COUNT[name.split("-", 1)[0]]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_bytes(path: Path) -> bytes:
    """A data file's content; a directory or an unreadable file is one :class:`DataError` naming it."""
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a data file; allowed: remove or rename it") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); allowed: a file this user can read") from None


def _refuse_non_files(paths: list[Path]) -> None:
    """Something other than a regular file under a data file's name is refused, naming it."""
    for path in paths:
        try:
            if not path.exists() or path.is_file():
                continue
            what = "a directory" if path.is_dir() else "not a regular file"
        except OSError as err:  # a folder on the way that this user may not search
            raise DataError(f"cannot read {path} ({err.strerror or err}); allowed: a file this user can read") from None
        raise DataError(f"{path} is {what}, not a data file; allowed: remove or rename it")


def _gz_header_count(raw: bytes) -> int | None:
    """The item count a gzipped IDX file's header announces (None if unreadable)."""
    try:
        head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(raw, 8)
    except zlib.error:
        return None
    return struct.unpack(">I", head[4:8])[0] if len(head) == 8 else None


def decompress_archive(gz: Path, md5: str | None = None) -> bytes:
    """The decompressed content of ``gz``; an official-sized archive must match ``md5``.

    Raises :class:`DataError` naming ``gz`` if it cannot be read, is not a complete gzip
    archive, or claims the official item count with another md5.
    """
    raw = _read_bytes(gz)
    if md5 is not None and _gz_header_count(raw) == _official_count(gz.name) and _md5(raw) != md5:
        raise DataError(
            f"{gz} claims to be the official archive but its md5 is not {md5} (an interrupted download?); {_FIX}"
        )
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{gz} is not a complete gzip archive ({err}); {_FIX}") from None


def read_idx(
    path: Path, ndim: int, item_shape: tuple[int, ...], official_md5: str | None = None, data: bytes | None = None
) -> Tensor:
    """An uncompressed IDX file of unsigned bytes as a uint8 tensor, checked.

    ``data`` is the file's content when it is already in memory (``path`` then only names
    it in messages). Raises :class:`DataError` naming ``path`` if it cannot be read, if the
    magic number, the dimensions or the size disagree with the header, or if the header
    claims the official dataset's item count but the content is not the official file
    (``official_md5``).
    """
    kind = "images" if ndim > 1 else "labels"
    if data is None:
        data = _read_bytes(path)
    expected_magic = bytes((0, 0, 0x08, ndim))
    if data[:4] != expected_magic:
        raise DataError(
            f"{path} is not an IDX file of {kind} (magic {data[:4].hex() or 'none'}, expected {expected_magic.hex()}); {_FIX}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated ({len(data)} bytes, shorter than its header); {_FIX}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if tuple(dims[1:]) != tuple(item_shape):
        shape = "x".join(map(str, dims[1:]))
        raise DataError(f"{path} holds {kind} of shape {shape}, expected {'x'.join(map(str, item_shape))}; {_FIX}")
    size = header + math.prod(dims)
    if len(data) != size:
        raise DataError(
            f"{path} is truncated or has extra bytes: {len(data)} bytes, its header announces {size}; {_FIX}"
        )
    if official_md5 is not None and dims[0] == _official_count(path.name) and _md5(data) != official_md5:
        raise DataError(
            f"{path} claims to be the official file ({dims[0]} {kind}) but its md5 is {_md5(data)}, "
            f"not {official_md5} (corrupted?); {_FIX}"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(dims)


# torchvision's MNIST.download gathers each mirror's failure into one multi-line message:
# "Error downloading <file>:\nTried <mirror>, got:\n<reason>\n..." -- only the reasons say why.
_TORCHVISION_FRAME = re.compile(r"^(Error downloading (?P<file>\S+?):|Tried \S+, got:)$")


def download_failure(err: BaseException) -> str:
    """Why a download failed, on one line: the innermost non-empty reason in ``err``'s chain.

    For torchvision's summary of failed mirrors that is the file and each distinct mirror's
    reason (``train-images-idx3-ubyte.gz: <urlopen error [Errno -3] Temporary failure in
    name resolution>``); an exception with no message at all is named by its type.
    """
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    for exc in reversed(chain):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        files = [m["file"] for m in map(_TORCHVISION_FRAME.match, lines) if m and m["file"]]
        reasons = list(dict.fromkeys(line for line in lines if not _TORCHVISION_FRAME.match(line)))
        if reasons:
            return f"{files[0]}: {'; '.join(reasons)}" if files else "; ".join(reasons)
    return type(chain[-1]).__name__


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
        # Decompressed archives that could not be written into raw/ (read-only): file name -> content.
        self._in_memory: dict[str, bytes] = {}

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
        msg = (
            f"{name} files missing in {self.raw_folder}: {', '.join(missing)}; put them there, or point mlplab "
            f"at a folder holding {name}/raw/ with MLPLAB_DATA_DIR=<folder> (or data.data_dir=<folder>)"
        )
        # With download on, the caller adds why the download failed instead.
        return msg if self.download else f"{msg}, or set data.download=true with network access"

    def check_available(self) -> None:
        missing = self.missing_files()
        if missing and not self.download:
            raise DataError(self._missing_message(missing))

    def prepare_data(self) -> None:
        archives = [archive for archive, _md5 in self.dataset_cls.resources]
        _refuse_non_files([self.raw_folder / n for a in archives for n in (a, a.removesuffix(".gz"))])
        missing = self.missing_files()
        if missing and self.download:
            self._download(missing)
            missing = self.missing_files()
        if missing:
            raise DataError(self._missing_message(missing))
        for archive, md5 in self.dataset_cls.resources:
            gz, plain = self.raw_folder / archive, self.raw_folder / archive.removesuffix(".gz")
            if not plain.is_file() and plain.name not in self._in_memory:
                self._extract(gz, plain, md5)

    def _download(self, missing: list[str]) -> None:
        """torchvision's download into a temporary folder; complete files are moved into ``raw/``."""
        try:
            self.raw_folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.raw_folder.parent))
        except OSError as err:
            raise DataError(f"{self._missing_message(missing)}; cannot write there ({err.strerror or err})") from None
        try:
            for train in (True, False):
                self.dataset_cls(str(tmp), train=train, download=True)
            fetched = tmp / self.dataset_cls.__name__ / "raw"
            for archive, _md5 in self.dataset_cls.resources:
                if not (self.raw_folder / archive).exists() and (fetched / archive).is_file():
                    os.replace(fetched / archive, self.raw_folder / archive)
        except Exception as err:  # no network, a mirror down, a bad md5, a read-only dir ...
            reason = download_failure(err)
            raise DataError(f"{self._missing_message(missing)}; the download failed ({reason})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _extract(self, gz: Path, plain: Path, md5: str) -> None:
        """Decompress ``gz`` as ``plain`` next to it (atomically); where that cannot be written, keep it in memory."""
        data = decompress_archive(gz, md5)
        try:
            atomic_write_bytes(plain, data)
        except StorageError as err:
            read_only = getattr(err, "errno", None) in READ_ONLY_ERRNOS
            (log.info if read_only else log.warning)(
                "%s: reading %s in memory for this run (%s)", plain.parent, gz.name, err
            )
            self._in_memory[plain.name] = data

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        official = OFFICIAL_MD5.get(self.dataset_cls.__name__, {})
        images_name, labels_name = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        images_file, images_data = self._source(images_name)
        labels_file, labels_data = self._source(labels_name)
        images = read_idx(images_file, 3, self.input_shape[1:], official.get(images_name), images_data)
        labels = read_idx(labels_file, 1, (), official.get(labels_name), labels_data)
        if len(images) != len(labels):
            raise DataError(
                f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels; {_FIX}"
            )
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise DataError(f"{labels_file} has label {int(labels.max())}; allowed: 0..{self.num_classes - 1}; {_FIX}")
        x = images.unsqueeze(1).to(torch.float32).div_(255.0)
        return normalise(x, self.mean, self.std), labels.to(torch.long)

    def _source(self, name: str) -> tuple[Path, bytes | None]:
        """Where the extracted file ``name`` is read from: ``(raw/name, None)``, or
        ``(raw/name.gz, content)`` when it was decompressed in memory (the path names it in messages)."""
        data = self._in_memory.pop(name, None)
        return (self.raw_folder / f"{name}.gz", data) if data is not None else (self.raw_folder / name, None)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        names = [n.removesuffix(".gz") for n, _ in self.dataset_cls.resources]
        if not all((self.raw_folder / n).is_file() or n in self._in_memory for n in names):
            self.prepare_data()
        return (*self._read("train"), *self._read("t10k"))


class MNISTDataModule(TorchvisionIDXDataModule):
    """MNIST, pixels scaled to [0, 1] (Lesson C); ``mean``/``std`` normalise further."""

    dataset_cls = MNIST
    class_names = tuple(str(i) for i in range(10))


class FashionMNISTDataModule(TorchvisionIDXDataModule):
    """Fashion-MNIST; the config normalises with mean 0.5, std 0.5 as Lesson D does."""

    dataset_cls = FashionMNIST
    class_names = tuple(FashionMNIST.classes)

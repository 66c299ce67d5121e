"""Bad dataset files are refused with an error naming the file -- never trained on.

Structural checks run on every file (IDX magic, dimensions, size against the header, images
and labels counts, label range); files whose header claims the official dataset's size must
also match the official md5. Extraction and download never leave a half-written file
behind that a later run could take for good.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import MNIST

from conftest import QUICK, compose_cfg, write_tiny_mnist
from mlplab.data import MNISTDataModule
from mlplab.errors import DataError
from mlplab.models import Classifier
from mlplab.training import train

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _write_gz(path: Path, raw: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(raw)


def _idx(array: np.ndarray, magic: bytes | None = None) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = magic if magic is not None else bytes((0, 0, 0x08, array.ndim))
    return magic + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _setup_error(root: Path) -> str:
    dm = MNISTDataModule(data_dir=str(root), download=False, val_size=10)
    with pytest.raises(DataError) as info:
        dm.setup()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


rng = np.random.default_rng(0)
IMGS = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
LABS = (np.arange(60) % 10).astype(np.uint8)

# (what, file replaced, its uncompressed content, words the message must hold)
BAD_FILES = [
    ("labels magic on images", IMAGES, _idx(IMGS, magic=b"\x00\x00\x08\x01"), ["not an IDX file of images", "00000803"]),
    ("not IDX at all", LABELS, b"<html>404 Not Found</html>", ["not an IDX file of labels"]),
    ("images truncated", IMAGES, _idx(IMGS)[:-100], ["truncated", "header announces 47056"]),
    ("extra bytes", LABELS, _idx(LABS) + b"\x00" * 7, ["extra bytes", "header announces 68"]),
    ("27x28 images", IMAGES, _idx(IMGS[:, :27, :]), ["shape 27x28, expected 28x28"]),
    ("count mismatch", LABELS, _idx(LABS[:59]), ["has 60 images but", "has 59 labels"]),
    ("label out of range", LABELS, _idx(np.where(LABS == 3, 10, LABS)), ["has label 10; allowed: 0..9"]),
]


@pytest.mark.parametrize(("name", "what", "raw", "parts"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_structurally_bad_files_are_refused_naming_the_file(tmp_path, name, what, raw, parts):
    write_tiny_mnist(tmp_path)
    raw_dir = tmp_path / "MNIST" / "raw"
    _write_gz(raw_dir / f"{what}.gz", raw)
    msg = _setup_error(tmp_path)
    named = IMAGES if "has 60 images" in parts[0] else what
    assert str(raw_dir / named) in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


def test_a_truncated_archive_is_refused_and_leaves_no_extracted_file(tmp_path):
    write_tiny_mnist(tmp_path)
    gz = tmp_path / "MNIST" / "raw" / f"{IMAGES}.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    msg = _setup_error(tmp_path)
    assert msg.startswith(f"{gz} is not a complete gzip archive") and "delete it" in msg, msg
    assert not (gz.parent / IMAGES).exists()
    assert not list(gz.parent.glob("*.partial"))


@pytest.fixture
def real_mnist(real_data_dir, tmp_path) -> Path:
    """A writable copy of the real MNIST archives (only the .gz: other tests extract next to them)."""
    shutil.copytree(real_data_dir / "MNIST", tmp_path / "MNIST", ignore=lambda _dir, names: [n for n in names if n != "raw" and not n.endswith(".gz")])
    return tmp_path


def test_official_archive_with_wrong_checksum_or_cut_short_is_refused(real_mnist):
    gz = real_mnist / "MNIST" / "raw" / f"{LABELS}.gz"
    good = gz.read_bytes()
    # One flipped byte inside the compressed stream: the header still claims 60,000 labels.
    gz.write_bytes(good[:5000] + bytes([good[5000] ^ 0xFF]) + good[5001:])
    msg = _setup_error(real_mnist)
    assert msg.startswith(f"{gz} claims to be the official archive but its md5 is not d53e105ee54ea40749a09fcbcd1e9432"), msg
    # An interrupted download: the first half of the real archive.
    gz.write_bytes(good[: len(good) // 2])
    assert _setup_error(real_mnist).startswith(f"{gz} claims to be the official archive")
    assert not (gz.parent / LABELS).exists()


def test_official_sized_extracted_file_with_other_content_is_refused(real_mnist):
    raw = real_mnist / "MNIST" / "raw"
    labels = bytearray(gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # a wrong label, still in range
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    msg = _setup_error(real_mnist)
    assert msg.startswith(f"{raw / 't10k-labels-idx1-ubyte'} claims to be the official file (10000 labels)"), msg
    assert "27ae3e4e09519cfbb04c329615203637" in msg


def test_an_interrupted_download_leaves_nothing_that_passes_for_good(tmp_path, monkeypatch):
    def half_then_interrupted(self):
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        (Path(self.raw_folder) / f"{IMAGES}.gz").write_bytes(b"\x1f\x8b\x08" + b"\x00" * 500)
        raise KeyboardInterrupt  # Ctrl+C halfway through

    monkeypatch.setattr(MNIST, "download", half_then_interrupted)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    # Nothing in raw/ and no temporary folder left: the next run sees the files as missing.
    assert [p.name for p in (tmp_path / "MNIST").iterdir()] == ["raw"]
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []
    offline = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError, match=r"MNIST files missing in .*train-images-idx3-ubyte.gz"):
        offline.prepare_data()


def test_training_never_starts_on_bad_data(tmp_path, monkeypatch):
    def refuse(self, batch, batch_idx):
        raise AssertionError("a training step ran on bad data")

    monkeypatch.setattr(Classifier, "training_step", refuse)
    write_tiny_mnist(tmp_path / "data")
    _write_gz(tmp_path / "data" / "MNIST" / "raw" / f"{LABELS}.gz", _idx(np.full(60, 12, dtype=np.uint8)))
    cfg = compose_cfg(
        QUICK + ["logger=none", "data=mnist", f"data.data_dir={tmp_path / 'data'}", "data.download=false", "data.val_size=10"],
        tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has label 12; allowed: 0\.\.9"):
        train(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))

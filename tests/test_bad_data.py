"""Bad dataset files are refused with an error naming the file -- never trained on.

Structural checks run on every file (IDX magic, dimensions, size against the header, images
and labels counts, label range); files whose header claims the official dataset's size must
also match the official md5. Extraction and download never leave a half-written file
behind that a later run could take for good.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import io
import os
import shutil
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST

from conftest import QUICK, compose_cfg, run_cli, write_tiny_mnist
from mlplab.data import MNISTDataModule
from mlplab.engines import fit, train
from mlplab.errors import DataError
from mlplab.models import Classifier

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
    (
        "labels magic on images",
        IMAGES,
        _idx(IMGS, magic=b"\x00\x00\x08\x01"),
        ["not an IDX file of images", "00000803"],
    ),
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


def test_extraction_never_writes_through_a_symlink_planted_at_a_predictable_name(tmp_path):
    from test_atomic import assert_sentinel_untouched, plant_symlinks

    arrays = write_tiny_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    sentinels = [plant_symlinks(raw, n.removesuffix(".gz"), tmp_path / f"outside{i}") for i, n in enumerate(arrays)]
    MNISTDataModule(data_dir=str(tmp_path), download=False, val_size=10).setup()
    for name, array in arrays.items():
        extracted = raw / name.removesuffix(".gz")
        assert not extracted.is_symlink() and extracted.read_bytes()[-array.size :] == array.tobytes()
    for sentinel in sentinels:
        assert_sentinel_untouched(sentinel)


@pytest.fixture
def real_mnist(real_data_dir, tmp_path) -> Path:
    """A writable copy of the real MNIST archives (only the .gz: other tests extract next to them)."""
    shutil.copytree(
        real_data_dir / "MNIST",
        tmp_path / "MNIST",
        ignore=lambda _dir, names: [n for n in names if n != "raw" and not n.endswith(".gz")],
    )
    return tmp_path


def test_official_archive_with_wrong_checksum_or_cut_short_is_refused(real_mnist):
    gz = real_mnist / "MNIST" / "raw" / f"{LABELS}.gz"
    good = gz.read_bytes()
    # One flipped byte inside the compressed stream: the header still claims 60,000 labels.
    gz.write_bytes(good[:5000] + bytes([good[5000] ^ 0xFF]) + good[5001:])
    msg = _setup_error(real_mnist)
    assert msg.startswith(
        f"{gz} claims to be the official archive but its md5 is not d53e105ee54ea40749a09fcbcd1e9432"
    ), msg
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


# -- missing files: where to point mlplab, and why the download failed ---------------------------

POINT_AT = (
    "put them there, or point mlplab at a folder holding MNIST/raw/ with MLPLAB_DATA_DIR=<folder> "
    "(or data.data_dir=<folder>)"
)
NO_NETWORK = "<urlopen error [Errno -3] Temporary failure in name resolution>"


def _no_network(*_args, **_kwargs):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def _missing(root: Path) -> str:
    return f"MNIST files missing in {root / 'MNIST' / 'raw'}: {', '.join(RAW_GZ)}"


def test_missing_files_offline_name_mlplab_data_dir_and_the_download_switch(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert str(info.value) == f"{_missing(tmp_path)}; {POINT_AT}, or set data.download=true with network access"


def test_a_failed_download_gives_its_reason_and_does_not_suggest_download(tmp_path, monkeypatch):
    """torchvision's own download (each mirror tried) without a network: its RuntimeError's
    first line is only "Error downloading train-images-idx3-ubyte.gz:", the reason is below."""
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert str(info.value) == (
        f"{_missing(tmp_path)}; {POINT_AT}; the download failed (train-images-idx3-ubyte.gz: {NO_NETWORK})"
    )
    assert list((tmp_path / "MNIST").iterdir()) == [tmp_path / "MNIST" / "raw"]  # no temporary folder left


def test_a_download_error_without_a_message_gives_its_cause(tmp_path, monkeypatch):
    def wrapped(self):
        try:
            _no_network()
        except urllib.error.URLError as err:
            raise RuntimeError() from err

    monkeypatch.setattr(MNIST, "download", wrapped)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert str(info.value).endswith(f"; {POINT_AT}; the download failed ({NO_NETWORK})")


@pytest.mark.slow  # a CLI subprocess: about 20 s on 2 busy cores
def test_cli_a_failed_download_is_one_line_with_its_reason(tmp_path):
    offline = tmp_path / "offline"
    offline.mkdir()
    # Loaded at the subprocess's start: urllib there has no network either.
    (offline / "sitecustomize.py").write_text(
        "import socket, urllib.error, urllib.request\n"
        "def _no_network(*_args, **_kwargs):\n"
        "    raise urllib.error.URLError(socket.gaierror(-3, 'Temporary failure in name resolution'))\n"
        "urllib.request.urlopen = _no_network\n"
    )
    pythonpath = os.pathsep.join(p for p in (str(offline), os.environ.get("PYTHONPATH")) if p)
    data = tmp_path / "data"
    proc = run_cli(
        "train",
        [*QUICK, "logger=none", "data=mnist", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=tmp_path,
        env={"MLPLAB_ROOT": str(tmp_path), "MLPLAB_DATA_DIR": str(data), "PYTHONPATH": pythonpath},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {_missing(data)}; {POINT_AT}; the download failed (train-images-idx3-ubyte.gz: {NO_NETWORK})"
    )


def test_training_never_starts_on_bad_data(tmp_path, monkeypatch):
    def refuse(self, batch, batch_idx):
        raise AssertionError("a training step ran on bad data")

    monkeypatch.setattr(Classifier, "training_step", refuse)
    write_tiny_mnist(tmp_path / "data")
    _write_gz(tmp_path / "data" / "MNIST" / "raw" / f"{LABELS}.gz", _idx(np.full(60, 12, dtype=np.uint8)))
    cfg = compose_cfg(
        QUICK
        + [
            "logger=none",
            "data=mnist",
            f"data.data_dir={tmp_path / 'data'}",
            "data.download=false",
            "data.val_size=10",
        ],
        tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has label 12; allowed: 0\.\.9"):
        train(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# -- the disk: read-only folders, unreadable files, a directory where a file belongs ------------


def _refuse_writes_in(monkeypatch: pytest.MonkeyPatch, folder: Path, err: int) -> None:
    """What a non-root process sees in ``folder`` on a read-only mount (EROFS) or without write
    permission (EACCES): every create, write, rename, link and unlink there fails. Tests run as
    root in CI, where ``chmod`` alone stops nothing."""
    folder = folder.resolve()

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).parent == folder

    def refused(path):
        return OSError(err, os.strerror(err), str(path))

    real_open, real_io_open = os.open, io.open

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise refused(path)
        return real_open(path, flags, *args, **kwargs)

    def py_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and inside(file) and set(mode) & set("wax+"):
            raise refused(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)
    for name in ("replace", "rename", "link", "symlink", "mkdir", "remove", "unlink"):
        real = getattr(os, name)

        def refuse_inside(*args, _real=real, _name=name, **kwargs):
            paths = args[:2] if _name in ("replace", "rename", "link", "symlink") else args[:1]
            target = paths[-1]
            if inside(target):
                if _name in ("remove", "unlink") and err == errno.EACCES and not os.path.lexists(target):
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(target))
                raise refused(target)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, refuse_inside)


@pytest.fixture
def read_only_raw(tmp_path, monkeypatch):
    """A folder of tiny MNIST archives only, read-only (``chmod 0o555``, and simulated as root)."""
    arrays = write_tiny_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    raw.chmod(0o555)
    yield raw, arrays, lambda err: _refuse_writes_in(monkeypatch, raw, err)
    raw.chmod(0o755)


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES], ids=["read-only mount", "no write permission"])
def test_a_read_only_folder_of_archives_is_read_in_memory_and_left_as_it_is(read_only_raw, err, caplog):
    raw, arrays, refuse_writes = read_only_raw
    refuse_writes(err)
    before = sorted(os.listdir(raw))
    dm = MNISTDataModule(data_dir=str(raw.parents[1]), download=False, val_size=10)
    with caplog.at_level("INFO", logger="mlplab.data.vision"):
        dm.prepare_data()  # as Lightning calls it, then load() in setup()
        _x_pool, y_pool, x_t, y_t = dm.load()
    assert sorted(os.listdir(raw)) == before == sorted(arrays)  # nothing written, nothing left behind
    assert torch.equal(y_pool, torch.as_tensor(arrays["train-labels-idx1-ubyte.gz"], dtype=torch.long))
    assert torch.equal(y_t, torch.as_tensor(arrays["t10k-labels-idx1-ubyte.gz"], dtype=torch.long))
    expected = torch.as_tensor(arrays["t10k-images-idx3-ubyte.gz"]).unsqueeze(1).float() / 255
    assert torch.equal(x_t, expected)
    assert f"{raw}: reading train-images-idx3-ubyte.gz in memory for this run" in caplog.text


def test_training_on_a_read_only_folder_of_archives_works(read_only_raw, tmp_path):
    raw, _arrays, refuse_writes = read_only_raw
    refuse_writes(errno.EROFS)
    cfg = compose_cfg(
        QUICK
        + ["logger=none", "data=mnist", f"data.data_dir={raw.parents[1]}", "data.download=false", "data.val_size=10"],
        tmp_path / "run",
    )
    metrics = fit(cfg)
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test/acc"] <= 1.0
    assert sorted(os.listdir(raw)) == sorted(RAW_GZ)


RAW_GZ = [f"{n}.gz" for n in (IMAGES, LABELS, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]


def _deny_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """``path`` unreadable: ``chmod 0``, and as root (which reads anyway) every open of it refused."""
    path.chmod(0)
    real_io_open = io.open

    def py_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(os.path.abspath(file)) == path.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)


@pytest.mark.parametrize("name", [LABELS, f"{LABELS}.gz"], ids=["extracted file", "archive"])
def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path, monkeypatch, name):
    write_tiny_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    if not name.endswith(".gz"):
        (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    _deny_reading(monkeypatch, raw / name)
    before = sorted(os.listdir(raw))
    msg = _setup_error(tmp_path)
    assert msg == f"cannot read {raw / name} (Permission denied); allowed: a file this user can read", msg
    assert sorted(p for p in os.listdir(raw) if not p.endswith("-ubyte")) == sorted(
        p for p in before if not p.endswith("-ubyte")
    )
    assert not list(raw.glob("*.partial")) and not list(raw.glob(".*"))
    (raw / name).chmod(0o644)


def test_a_directory_where_an_extracted_file_belongs_is_one_line_and_nothing_is_left_behind(tmp_path):
    write_tiny_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / IMAGES).mkdir()
    (raw / IMAGES / "keep.txt").write_text("someone's file")
    msg = _setup_error(tmp_path)
    assert msg == f"{raw / IMAGES} is a directory, not a data file; allowed: remove or rename it", msg
    assert sorted(os.listdir(raw)) == sorted([*RAW_GZ, IMAGES])  # no partial file, nothing extracted
    assert os.listdir(raw / IMAGES) == ["keep.txt"]


@pytest.mark.slow  # a CLI subprocess: about 20 s on 2 busy cores
def test_cli_a_directory_where_a_data_file_belongs_exits_2_with_one_line(tmp_path):
    write_tiny_mnist(tmp_path / "data")
    raw = tmp_path / "data" / "MNIST" / "raw"
    (raw / IMAGES).mkdir()
    proc = run_cli(
        "train",
        [
            *QUICK,
            "logger=none",
            "data=mnist",
            "data.download=false",
            "data.val_size=10",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=tmp_path,
        env={"MLPLAB_ROOT": str(tmp_path), "MLPLAB_DATA_DIR": str(tmp_path / "data")},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: {raw / IMAGES} is a directory, not a data file; allowed: remove or rename it"
    )
    assert sorted(os.listdir(raw)) == sorted([*RAW_GZ, IMAGES])

"""Shared test helpers: config composition, CLI subprocesses, dataset files."""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mlplab.cli import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RAW_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Real MNIST / Fashion-MNIST raw files, in torchvision's layout (<dir>/MNIST/raw/*.gz): the
# folder MLPLAB_DATA_DIR names, as for users, else ../shared/data beside the clone. Read-only;
# tests copy them. CI sets MLPLAB_REQUIRE_REAL_DATA=1 so that missing files fail, not skip.
SHARED_DATA = Path(os.environ.get("MLPLAB_DATA_DIR") or REPO.parent / "shared" / "data")
# No test writes into that folder (a user's, or CI's read-only copy, writable to root): runs
# that name no data dir of their own get an empty one of the session's.
_SESSION_DATA = tempfile.mkdtemp(prefix="mlplab-test-data-")
atexit.register(shutil.rmtree, _SESSION_DATA, True)
os.environ["MLPLAB_DATA_DIR"] = _SESSION_DATA

register_resolvers()

# Fast, quiet settings for tests that train.
QUICK = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(autouse=True)
def _no_hydra_config_left_behind():
    """compose_cfg sets Hydra's global HydraConfig; each test starts and ends without one."""
    yield
    HydraConfig.instance().cfg = None


def compose_cfg(overrides: list[str], out_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose a config as the CLI would, with every output under ``out_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir)
        del cfg["hydra"]
    return cfg


def run_cli(
    script: str, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python src/<script>.py args`` as a user would; returns the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "src" / f"{script}.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the format of MNIST's raw files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_tiny_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    """Tiny random MNIST-layout files under ``root/folder/raw``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(root / folder / "raw" / name, arr)
    return arrays


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the real MNIST and Fashion-MNIST raw files (skip if absent)."""
    missing = [
        f"{d}/raw/{n}"
        for d in ("MNIST", "FashionMNIST")
        for n in RAW_NAMES
        if not (SHARED_DATA / d / "raw" / n).is_file()
    ]
    if missing:
        msg = (
            f"real MNIST/Fashion-MNIST files not found under {SHARED_DATA} (set MLPLAB_DATA_DIR to a folder "
            f"holding MNIST/raw/ and FashionMNIST/raw/): missing {missing[0]} ..."
        )
        if os.environ.get("MLPLAB_REQUIRE_REAL_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("real-data")
    for d in ("MNIST", "FashionMNIST"):
        shutil.copytree(SHARED_DATA / d / "raw", root / d / "raw")
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls gain nothing from intra-op threads; on a shared 2-core machine two
    threads per process oversubscribe the cores and make training ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linears(net: torch.nn.Module) -> list[torch.nn.Linear]:
    """The net's ``nn.Linear`` layers, input first."""
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_nested(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values are equal, of the same types, tensors bit for bit."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)

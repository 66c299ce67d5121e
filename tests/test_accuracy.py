"""Accuracy targets with the config groups' defaults (10 epochs, SGD lr 0.05 momentum 0.9;
digits without its recipe, ``recipe=none``; the recipes' targets: test_results.py).

The digits target and a short MNIST run (which checks the real-file loading path end to
end, through the CLI) are in the default suite. The MNIST and Fashion-MNIST targets with
full training are marked slow: ``pytest -m slow``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import compose_cfg, run_cli
from mlplab.engines import train

QUIET = ["callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]


def _test_acc(tmp_path: Path, *overrides: str) -> float:
    """Train with the defaults plus ``overrides``; the test accuracy of the best checkpoint."""
    cfg = compose_cfg([*QUIET, "optimized_metric=test/acc", *overrides], tmp_path / "run")
    acc = train(cfg)
    assert acc is not None and 0.0 <= acc <= 1.0
    return acc


def test_digits_relu_mlp_reaches_95_percent(tmp_path: Path) -> None:
    assert _test_acc(tmp_path, "data=digits", "model=relu_mlp", "recipe=none") >= 0.95


def test_mnist_short_run_through_cli_learns(tmp_path: Path, real_data_dir: Path) -> None:
    """100 batches of real MNIST, data dir from MLPLAB_DATA_DIR: well above chance."""
    proc = run_cli(
        "train",
        [
            "data=mnist",
            "model=relu_mlp",
            "data.download=false",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=100",
            f"paths.log_dir={tmp_path / 'logs'}",
            *QUIET,
        ],
        cwd=tmp_path,
        env={"MLPLAB_DATA_DIR": str(real_data_dir), "MLPLAB_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"test/acc=(\d+\.\d+)", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) > 0.8
    # The raw archives were found where MLPLAB_DATA_DIR points and extracted beside them.
    assert (real_data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "model", "target"),
    [
        ("mnist", "simple_net", 0.91),
        ("mnist", "relu_mlp", 0.97),
        ("fashion_mnist", "simple_net", 0.83),
        ("fashion_mnist", "relu_mlp", 0.87),
    ],
)
def test_real_data_accuracy_targets(tmp_path: Path, real_data_dir: Path, data: str, model: str, target: float) -> None:
    acc = _test_acc(tmp_path, f"data={data}", f"model={model}", f"data.data_dir={real_data_dir}", "data.download=false")
    print(f"{data} {model}: test/acc={acc:.4f} (target {target})")
    assert acc >= target


@pytest.mark.slow
def test_fashion_fast_reaches_its_goal_with_its_seed(real_data_dir, tmp_path):
    """fashion_fast with its seed (42) reaches 0.90 (docs: Results). Over seeds 1-5 its mean,
    0.904, is below the 0.905 reference, so it has no row in tests/test_results.py;
    mnist_fast's mean is checked there."""
    assert _test_acc(tmp_path, "experiment=fashion_fast", "trainer=cpu", f"data.data_dir={real_data_dir}") >= 0.90

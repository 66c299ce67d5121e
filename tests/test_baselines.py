"""python -m mlplab.baselines: sklearn's classic models on mlplab's own splits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, compose_cfg
from mlplab.baselines import main, run_baselines, split_arrays


def test_the_baselines_see_the_splits_a_run_sees(tmp_path):
    cfg = compose_cfg(["data=digits"], tmp_path)
    arrays = split_arrays(cfg.data)
    assert {k: v[0].shape for k, v in arrays.items()} == {"train": (1213, 64), "val": (135, 64), "test": (449, 64)}
    from mlplab.engines.build import build_datamodule
    from mlplab.engines.run import load_data

    dm = build_datamodule(cfg.data)
    load_data(dm)
    np.testing.assert_array_equal(arrays["test"][0], dm.data_test.tensors[0].flatten(1).numpy())
    np.testing.assert_array_equal(arrays["train"][1], dm.data_train.tensors[1].numpy())


@pytest.mark.slow
def test_digits_baselines_reach_what_sklearn_reaches(tmp_path):
    """On digits' 25 % test split: the SVC and the MLP above 0.96, logistic regression above 0.93
    (slow: sklearn's MLP takes a minute on 2 busy cores)."""
    rows = {
        r["baseline"]: r
        for r in run_baselines(compose_cfg(["data=digits"], tmp_path).data, ["svc", "logistic_regression", "mlp"], 1)
    }
    assert rows["svc"]["test/acc"] >= 0.97, rows
    assert rows["mlp"]["test/acc"] >= 0.96, rows
    assert 0.93 <= rows["logistic_regression"]["test/acc"] < rows["svc"]["test/acc"], rows
    assert all(0.9 <= r["val/acc"] <= 1.0 and r["fit_s"] > 0 for r in rows.values())


def test_the_command_prints_a_table_and_refuses_bad_input_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert main(["data=moons", "baselines=logistic_regression,svc"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| data | baseline | val/acc | test/acc | fit (s) |"
    assert [line.split(" | ")[1] for line in out[2:]] == ["logistic_regression", "svc"]
    assert main(["experiment=moons_activations", "baselines=logistic_regression"]) == 0  # data= from the preset
    assert capsys.readouterr().out.splitlines()[2].startswith("| moons | logistic_regression | ")
    assert main(["baselines=knn"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: baselines=knn is not an option; allowed: logistic_regression, svc, mlp"
    )
    with pytest.raises(SystemExit) as info:
        main(["data=digts"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: data=digts is not an option; allowed: ")


def test_python_dash_m_runs_it():
    proc = subprocess.run(
        [sys.executable, "-m", "mlplab.baselines", "data=moons", "baselines=logistic_regression"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| moons | logistic_regression |" in proc.stdout

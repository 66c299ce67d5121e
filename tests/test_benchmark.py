"""The benchmark is not a test; this runs it tiny so that it cannot rot."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO


def _smoke(script: str, out) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> --smoke --out <out>``, which must succeed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    return proc


# Four engines in subprocesses (~35 s): slow, so the default suite stays under ~10 min; CI runs it.
@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    _smoke("bench_training.py", tmp_path)
    result = json.loads((tmp_path / "bench.json").read_text())
    engines = {r["engine"] for r in result["results"]}
    assert engines == {"bare", "mlplab", "ignite", "torchvision"}
    for r in result["results"]:
        [epochs] = r["epoch_seconds"]  # one round (--smoke), 1 warm-up + 1 timed epoch
        assert len(epochs) == 2 and all(s > 0 for s in epochs)
        assert r["median_s"] == r["round_medians_s"][0] == epochs[1] and r["peak_rss_mb"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| simple_net | 64 |" in table and "mlplab / bare" in table


# Two digits sweeps (both launchers, 2 jobs, 3 epochs) and an import timing in subprocesses (~40 s).
@pytest.mark.slow
def test_population_benchmark_smoke(tmp_path):
    proc = _smoke("bench_population.py", tmp_path)
    result = json.loads((tmp_path / "population-smoke.json").read_text())
    case = result["cases"]["digits16"]
    assert case["jobs"] == 2 and case["epochs"] == 3 and case["rounds"] == 1
    basic, population = case["basic"], case["population"]
    for entry in (basic, population):
        assert entry["wall_s"] > entry["start_s"] > 0 and entry["peak_rss_mb"] > 0
        assert entry["jobs_per_s"] == pytest.approx(2 / entry["wall_s"], rel=1e-2)
    assert 0 < population["train_s"] < population["wall_s"]
    assert population["member_epochs_per_s"] == pytest.approx(
        2 * 3 / population["train_s"], rel=5e-2
    )  # train_s rounded
    assert case["ratio"] == pytest.approx(population["wall_s"] / basic["wall_s"], abs=1e-3)
    assert 0 < case["imports_s"] < basic["wall_s"]
    expected = (population["wall_s"] - population["start_s"] - case["imports_s"]) / (
        basic["wall_s"] - basic["start_s"] - case["imports_s"]
    )
    assert case["ratio_after_imports"] == pytest.approx(expected, abs=2e-2)  # from unrounded figures
    assert f"| digits16 | population / basic | **{case['ratio']:.2f}** |" in proc.stdout


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", REPO / "benchmarks" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_times_neither_the_warm_up_nor_the_last_epoch(bench):
    """The last epoch carries a run's end-of-training work (figures, histograms), not per-epoch cost."""
    assert bench.timed_epochs([9.0, 1.0, 2.0, 3.0, 8.0]) == [1.0, 2.0, 3.0]
    assert bench.timed_epochs([9.0, 1.0]) == [1.0]  # --smoke: 2 epochs


def test_ratios_are_paired_within_rounds_in_abba_order(bench):
    group = ["bare", "mlplab", "ignite"]
    assert [bench.round_order(group, r) for r in range(3)] == [group, group[::-1], group]
    # Round 2 ran on a machine twice as slow, round 3 had a slow spell during a's run: the
    # paired median is 1.1, the ratio of the per-engine medians would be 1.3 / 1.0.
    a = {"round_medians_s": [1.1, 2.2, 1.3]}
    b = {"round_medians_s": [1.0, 2.0, 1.0]}
    assert bench.paired_ratio(a, b) == pytest.approx(1.1)
    with pytest.raises(ValueError):  # rounds missing on one side are an error, not a shorter zip
        bench.paired_ratio({"round_medians_s": [1.0]}, b)


def test_without_mnist_the_benchmark_makes_full_size_synthetic_data_that_mlplab_loads(bench, tmp_path, monkeypatch):
    """Random pixels in archives of the official size would fail mlplab's md5 check."""
    from mlplab.data import MNISTDataModule

    monkeypatch.setattr(bench, "find_mnist", lambda: None)
    data_dir, desc = bench.prepare_data(tmp_path, smoke=False)
    assert desc.startswith("synthetic")
    dm = MNISTDataModule(data_dir=str(data_dir), download=False, val_size=5000)
    dm.setup("fit")
    x_train, y_train = dm.data_train.tensors
    assert x_train.shape == (59_999 - 5000, 1, 28, 28) and int(y_train.max()) <= 9
    assert len(dm.data_test) == 9_999


FAKE_CASE = """
import json, os, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
go_fd, ready_fd = (int(fd) for fd in args["--pace"].split(","))
go, ready = os.fdopen(go_fd, "r"), os.fdopen(ready_fd, "w")
if args["--case"].startswith("hang"):
    time.sleep(60)
log = open(os.path.join(args["--work"], "order.log"), "a")
for epoch in range(int(args["--epochs"])):
    ready.write("ready\\n"); ready.flush()
    assert go.readline() == "go\\n"
    log.write(f"{args['--case']} {epoch}\\n"); log.flush()
ready.write("ready\\n"); ready.flush()
print(json.dumps({"epoch_seconds": [1.0], "peak_rss_mb": 1}))
"""


def _fake_driver(bench, tmp_path, monkeypatch, **kw):
    script = tmp_path / "fake_case.py"
    script.write_text(FAKE_CASE)
    monkeypatch.setattr(bench, "__file__", str(script))
    args = argparse.Namespace(epochs=3, accelerator="cpu", val_size=1, case_timeout=30.0, **kw)
    return args


def test_the_lockstep_driver_runs_one_epoch_at_a_time_in_abba_order(bench, tmp_path, monkeypatch):
    args = _fake_driver(bench, tmp_path, monkeypatch)
    results = bench.run_group([("a", "m", 1), ("b", "m", 1)], args, tmp_path, tmp_path)
    assert set(results) == {("a", "m", 1), ("b", "m", 1)}
    order = (tmp_path / "order.log").read_text().split("\n")[:-1]
    assert order == ["a,m,1 0", "b,m,1 0", "b,m,1 1", "a,m,1 1", "a,m,1 2", "b,m,1 2"]


def test_a_hung_case_stops_the_benchmark_with_a_message(bench, tmp_path, monkeypatch):
    args = _fake_driver(bench, tmp_path, monkeypatch)
    args.case_timeout = 1.0
    with pytest.raises(SystemExit, match=r"case hang,m,1 failed .*no report within --case-timeout=1 s"):
        bench.run_group([("a", "m", 1), ("hang", "m", 1)], args, tmp_path, tmp_path)

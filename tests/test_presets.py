"""Every preset under conf/ is *run* (trained or evaluated with it) by some test.

``RUN_BY`` names, for each yaml under conf/, a test that runs it; the tests below run the
presets that no other test file runs: one short fit each (1 epoch, tiny data or a few
batches), checking real numbers and the files made. Most are in the default suite; the
GPU trainers (and trainer=mps) need their GPU and are skipped without one (the only skips here); the SLURM
launcher's sweep runs through the CLI with stand-ins for sbatch/srun/sacct (slow).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF, REPO, compose_cfg, write_tiny_mnist
from mlplab.engines import fit
from mlplab.errors import ConfigError

QUIET = ["trainer=cpu", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]

#: conf/<path>.yaml -> "<test file>::<test>" that runs it (a parametrized test runs each case).
RUN_BY = {
    "train": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "_lesson": "test_lessons.py::test_xor_preset_learns_xor_and_eval_reproduces_it",  # in every lesson preset
    "eval": "test_cli.py::test_eval_reproduces_train_test_accuracy",
    "augment/none": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "augment/affine": "test_lessons.py::test_affine_augmentation_changes_training_batches_only",
    "augment/hflip": "test_presets.py::test_preset_runs",
    "augment/shift": "test_lessons.py::test_shift_augmentation_moves_each_image_by_whole_pixels_up_to_two",
    "callbacks/default": "test_cli.py::test_single_run_outputs_and_tensorboard",
    "callbacks/diagnostics": "test_presets.py::test_preset_runs",
    "callbacks/early_stopping": "test_presets.py::test_preset_runs",
    "callbacks/none": "test_ddp.py::test_multirun_of_ddp_jobs",
    "data/digits": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "data/mnist": "test_models.py::test_every_model_trains_on_every_dataset",
    "data/fashion_mnist": "test_models.py::test_every_model_trains_on_every_dataset",
    "data/xor": "test_lessons.py::test_xor_preset_learns_xor_and_eval_reproduces_it",
    "data/moons": "test_lessons.py::test_moons_activations_preset",
    "debug/fdr": "test_presets.py::test_fast_dev_run_is_one_batch_in_every_engine",
    "debug/limit": "test_presets.py::test_limit_preset_runs_a_few_batches_of_each_stage",
    "debug/profiler": "test_presets.py::test_profiler_preset_reports_and_trains_as_without_it",
    "debug/default": "test_presets.py::test_debug_default_preset_detects_anomalies_and_logs_debug_lines",
    "debug/overfit": "test_presets.py::test_overfit_preset_memorises_its_batches",
    "experiment/batch_size_sweep": "test_presets.py::test_preset_runs",
    "experiment/digits_numpy": "test_lessons.py::test_digits_numpy_preset_passes_the_lessons_target",
    "experiment/digits_relu": "test_lessons.py::test_digits_keras_presets",
    "experiment/digits_sigmoid": "test_lessons.py::test_digits_keras_presets",
    "experiment/dropout": "test_lessons.py::test_dropout_preset_shows_overfitting",
    "experiment/fashion_fast": "test_presets.py::test_preset_runs",
    "experiment/lesson_d_fashion": "test_presets.py::test_preset_runs",
    "experiment/lesson_d_models": "test_presets.py::test_preset_runs",
    "experiment/mnist_fast": "test_presets.py::test_preset_runs",
    "experiment/mnist_tp": "test_presets.py::test_preset_runs",
    "experiment/moons_activations": "test_lessons.py::test_moons_activations_preset",
    "experiment/vanishing_gradient": "test_presets.py::test_preset_runs",
    "experiment/xor": "test_lessons.py::test_xor_preset_learns_xor_and_eval_reproduces_it",
    "experiment/batch_size_sweep_seeds": "test_population_launcher.py::test_seeds_presets_run_as_populations_and_report_over_seeds",
    "experiment/lesson_d_models_seeds": "test_population_launcher.py::test_seeds_presets_run_as_populations_and_report_over_seeds",
    "experiment/dropout_seeds": "test_population_launcher.py::test_seeds_presets_run_as_populations_and_report_over_seeds",
    "experiment/moons_activations_seeds": "test_population_launcher.py::test_seeds_presets_run_as_populations_and_report_over_seeds",
    "recipe/digits": "test_results.py::test_the_digits_recipe_is_the_default_and_reaches_97_percent",
    "recipe/moons": "test_results.py::test_the_moons_recipe_keeps_the_epoch_of_least_val_loss",
    "recipe/none": "test_lessons.py::test_xor_preset_learns_xor_and_eval_reproduces_it",  # in every lesson preset
    "hparams_search/digits_optuna": "test_sweeps.py::test_optuna_search_on_digits",
    "hydra/default": "test_cli.py::test_single_run_outputs_and_tensorboard",
    "hydra/launcher/joblib": "test_sweeps.py::test_joblib_sweep_runs_jobs_in_parallel_into_one_sweep_dir_and_survives_a_failure",
    "hydra/launcher/population": "test_population_launcher.py::test_a_population_sweep_from_the_command_line",
    "hydra/launcher/slurm": "test_presets.py::test_slurm_launcher_preset_runs_its_jobs",
    "logger/csv": "test_models.py::test_every_model_trains_on_every_dataset",
    "logger/many_loggers": "test_presets.py::test_preset_runs",
    "logger/mlflow": "test_presets.py::test_mlflow_logger_records_the_run_in_its_local_store",
    "logger/none": "test_lessons.py::test_xor_preset_learns_xor_and_eval_reproduces_it",
    "logger/tensorboard": "test_cli.py::test_single_run_outputs_and_tensorboard",
    "loss/cross_entropy": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "loss/mse": "test_lessons.py::test_mse_run_reports_the_squared_error",
    "model/numpy_mlp": "test_lessons.py::test_digits_numpy_preset_passes_the_lessons_target",
    "model/relu_mlp": "test_models.py::test_every_model_trains_on_every_dataset",
    "model/relu_net": "test_presets.py::test_preset_runs",
    "model/sigmoid_net": "test_models.py::test_every_model_trains_on_every_dataset",
    "model/simple_net": "test_models.py::test_every_model_trains_on_every_dataset",
    "optimizer/adam": "test_lessons.py::test_mse_run_reports_the_squared_error",
    "optimizer/sgd": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "paths/default": "test_cli.py::test_single_run_outputs_and_tensorboard",
    "scheduler/cosine": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "scheduler/none": "test_lessons.py::test_xor_preset_learns_xor_and_eval_reproduces_it",
    "scheduler/onecycle": "test_ignite.py::test_ignite_onecycle_steps_per_batch",
    "trainer/default": "test_accuracy.py::test_digits_relu_mlp_reaches_95_percent",
    "trainer/cpu": "test_models.py::test_every_model_trains_on_every_dataset",
    "trainer/ddp_cpu": "test_ddp.py::test_multirun_of_ddp_jobs",
    "trainer/gpu": "test_presets.py::test_preset_runs",
    "trainer/ddp": "test_presets.py::test_preset_runs",
    "trainer/mps": "test_presets.py::test_preset_runs",  # composed and refused here: test_bad_input.py
}


def test_every_preset_is_run_by_a_named_test():
    """A preset added under conf/ needs an entry here, and each entry names a test that exists."""
    presets = {str(p.relative_to(CONF).with_suffix("")) for p in CONF.rglob("*.yaml")}
    assert not presets - set(RUN_BY), sorted(presets - set(RUN_BY))
    for where in set(RUN_BY.values()):
        file, name = where.split("::")
        assert f"def {name}(" in (REPO / "tests" / file).read_text(), where


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """Tiny random MNIST and Fashion-MNIST raw files (60 train, 20 test images each)."""
    root = tmp_path_factory.mktemp("tiny-images")
    write_tiny_mnist(root, folder="MNIST")
    write_tiny_mnist(root, folder="FashionMNIST", seed=1)
    return root


def _finite(metrics: dict, *keys: str) -> None:
    for key in keys:
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)


def _tags(tb_dir: Path) -> dict[str, list[str]]:
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea.Tags()


# -- debug presets --------------------------------------------------------------------------------


def test_overfit_preset_memorises_its_batches(tmp_path):
    """debug=overfit: the 3 training batches are learnt (train/acc 1.0) in the preset's 30 epochs.

    The DataModules' batch samplers must survive Lightning's overfit handling (it replaces a
    sampler that is not sequential, which made every batch one unbatched row)."""
    cfg = compose_cfg([*QUIET, "debug=overfit", "logger=none"], tmp_path / "run")
    metrics = fit(cfg)
    assert metrics["epochs"] == 30
    # The least cross-entropy: the entropy of the targets (the digits recipe smooths them).
    e, k = cfg.loss.label_smoothing, 10
    floor = -((1 - e + e / k) * math.log(1 - e + e / k) + (k - 1) * (e / k) * math.log(e / k)) if e else 0.0
    assert metrics["train/acc"] == 1.0 and floor <= metrics["train/loss"] < floor + 0.1, (floor, metrics)
    _finite(metrics, "val/acc", "test/acc")
    assert metrics["test/acc"] > 0.5  # 96 digits learnt: well above chance (0.1) on the test set


@pytest.mark.parametrize("engine", ["lightning", "ignite", "numpy"])
def test_fast_dev_run_is_one_batch_in_every_engine(tmp_path, engine):
    """debug=fdr: one batch of training, validation and test in one epoch, no checkpoint; the
    ignite and NumPy engines honour it as Lightning does (before, they ran 10 and 30 epochs)."""
    extra = {"lightning": [], "ignite": ["engine=ignite"], "numpy": ["experiment=digits_numpy"]}[engine]
    out = tmp_path / "run"
    metrics = fit(compose_cfg([*QUIET, "debug=fdr", *extra], out))
    _finite(metrics, "train/loss", "val/acc", "test/acc", "test/loss")
    assert not (out / "checkpoints").exists() and not (out / "numpy_net_best.npz").exists()
    if engine != "lightning":
        assert metrics["epochs"] == 1 and not list(out.glob("events.out.tfevents.*"))
    if engine == "ignite":  # the same single step as Lightning: the same test numbers
        lightning = fit(compose_cfg([*QUIET, "debug=fdr", "logger=none"], tmp_path / "lightning"))
        assert metrics["test/acc"] == pytest.approx(lightning["test/acc"], abs=1e-6)
        assert metrics["test/loss"] == pytest.approx(lightning["test/loss"], rel=1e-4)
    if engine == "numpy":  # one sample (batch 1) learnt: about chance
        assert metrics["test/acc"] < 0.5


def test_limit_preset_runs_a_few_batches_of_each_stage(tmp_path):
    """debug=limit: 3 epochs of 3 training batches (9 optimizer steps), validation and test
    on limited batches; the loops without Lightning's limits refuse it in one line."""
    out = tmp_path / "run"
    metrics = fit(compose_cfg([*QUIET, "debug=limit", "logger=csv"], out))
    assert metrics["epochs"] == 3
    _finite(metrics, "train/loss", "val/acc", "test/acc")
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 9 and last["epoch"] == 2
    logged = (out / "csv" / "metrics.csv").read_text().splitlines()
    assert sum(1 for row in logged if ",test/acc" not in row and row.split(",")[-1:] != [""]) > 0
    for engine in (["engine=ignite"], ["experiment=digits_numpy"]):
        with pytest.raises(
            ConfigError, match=r"does not implement trainer.limit_train_batches=3; allowed: engine=lightning"
        ):
            fit(compose_cfg([*QUIET, "debug=limit", *engine], tmp_path / engine[0]))


def test_profiler_preset_reports_and_trains_as_without_it(tmp_path, caplog):
    """debug=profiler: Lightning's SimpleProfiler times every hook through Lightning's own
    dispatch (38 optimizer steps of a digits epoch in 3 fused calls), its reports are in the
    run dir and named on the console, and the training is the same as without a profiler."""
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="mlplab.engines.lightning"):
        profiled = fit(compose_cfg([*QUIET, "debug=profiler", "logger=none"], out))
    plain = fit(compose_cfg([*QUIET, "trainer.max_epochs=1", "logger=none"], tmp_path / "plain"))
    assert profiled == plain
    fit_report = (out / "fit-profiler.txt").read_text()
    assert "FIT Profiler Report" in fit_report
    rows = {
        cells[1]: cells
        for cells in ([c.strip() for c in line.split("|")] for line in fit_report.splitlines() if line.startswith("|"))
    }
    assert rows["optimizer_step"][3] == "38" and rows["run_training_batch"][3] == "3"  # calls
    assert "TEST Profiler Report" in (out / "test-profiler.txt").read_text()
    assert f"profiler reports: {out / 'fit-profiler.txt'}, {out / 'test-profiler.txt'}" in caplog.text
    with pytest.raises(ConfigError, match=r"engine=ignite does not implement trainer.profiler="):
        fit(compose_cfg([*QUIET, "debug=profiler", "engine=ignite"], tmp_path / "ignite"))


def test_debug_default_preset_detects_anomalies_and_logs_debug_lines(tmp_path, monkeypatch):
    """debug=default: one epoch with torch's anomaly detection on and DEBUG lines in the
    console and train.log (not the thousands of matplotlib's); ignite honours the anomaly
    detection too, the NumPy engine (no autograd) refuses it in one line."""
    import os

    from conftest import run_cli
    from mlplab.runs import read_run_record

    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        [
            *QUIET,
            "debug=default",
            "logger=none",
            f"hydra.run.dir={run_dir}",
            "+callbacks.probe._target_=fault_callbacks.AnomalyProbe",
        ],
        cwd=tmp_path,
        env={
            "MLPLAB_ROOT": str(tmp_path),
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_run_record(run_dir)["epochs"] == 1
    log = (run_dir / "train.log").read_text()
    assert "[mlplab.test][DEBUG] - anomaly detection during training: True" in log
    assert "[mlplab.engines.run][DEBUG] - net: MLP(" in log and "[DEBUG]" in proc.stdout + proc.stderr
    assert "font_manager" not in log

    seen = []
    flatten = torch.nn.Flatten.forward
    monkeypatch.setattr(
        torch.nn.Flatten, "forward", lambda self, x: seen.append(torch.is_anomaly_enabled()) or flatten(self, x)
    )
    fit(compose_cfg([*QUIET, "debug=default", "engine=ignite"], tmp_path / "ignite"))
    assert seen and all(seen) and not torch.is_anomaly_enabled()
    with pytest.raises(ConfigError, match=r"engine=numpy does not implement trainer.detect_anomaly=True; allowed"):
        fit(compose_cfg([*QUIET, "debug=default", "experiment=digits_numpy"], tmp_path / "numpy"))


# -- the other presets: one short run each ---------------------------------------------------------

ON_IMAGES = ["data.download=false", "data.val_size=10", "data.eval_batch_size=16"]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="trainer=gpu/ddp need a CUDA GPU; none is visible")
MPS = pytest.mark.skipif(
    not torch.backends.mps.is_available(), reason="trainer=mps needs an Apple GPU; none is visible"
)

#: id -> (overrides, on tiny MNIST/Fashion files, lowest test/acc: digits runs must beat chance)
CASES = {
    "augment=hflip": (["data=mnist", "augment=hflip"], True, None),
    "callbacks=diagnostics": (["callbacks=diagnostics"], False, 0.5),
    "callbacks=early_stopping": (
        ["callbacks=early_stopping", "optimizer.lr=1e-12", "trainer.max_epochs=20"],
        False,
        None,
    ),
    "logger=many_loggers": (["logger=many_loggers"], False, 0.5),
    "experiment=mnist_tp": (["experiment=mnist_tp"], True, None),
    "experiment=batch_size_sweep": (["experiment=batch_size_sweep", "data.batch_size=16"], True, None),
    "experiment=mnist_fast": (["experiment=mnist_fast"], True, None),
    "experiment=fashion_fast": (["experiment=fashion_fast"], True, None),
    "experiment=lesson_d_fashion": (["experiment=lesson_d_fashion", "data.train_size=40"], True, None),
    "experiment=lesson_d_models+model=relu_net": (
        ["experiment=lesson_d_models", "model=relu_net", "data.train_size=40"],
        True,
        None,
    ),
    "experiment=vanishing_gradient": (["experiment=vanishing_gradient"], False, None),
    "trainer=gpu": (["trainer=gpu"], False, 0.5),
    "trainer=ddp": (["trainer=ddp"], False, 0.5),
    "trainer=mps": (["trainer=mps"], False, 0.5),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=MPS if c == "trainer=mps" else GPU) if c.startswith("trainer=") else c for c in CASES],
)
def test_preset_runs(tmp_path, tiny_images, case):
    overrides, images, lowest = CASES[case]
    if not case.startswith("trainer="):
        overrides = [*QUIET, *overrides]
    else:
        overrides = [*QUIET[1:], *overrides]
    if images:
        overrides = [*overrides, f"data.data_dir={tiny_images}", *ON_IMAGES]
    if "trainer.max_epochs=" not in " ".join(overrides):
        overrides.append("trainer.max_epochs=1")
    out = tmp_path / "run"
    metrics = fit(compose_cfg(overrides, out))
    _finite(metrics, "train/loss", "val/loss", "val/acc", "test/loss", "test/acc")
    if lowest is not None:
        assert metrics["test/acc"] > lowest, metrics
    assert (out / "checkpoints" / "last.ckpt").is_file()

    if case == "callbacks=diagnostics":  # every diagnostic at full rate, after one epoch
        tags = _tags(out)
        assert any(t.startswith("~diagnostics/weights/") for t in tags["histograms"]), tags["histograms"]
        assert any(t.startswith("~diagnostics/gradients/") for t in tags["histograms"]), tags["histograms"]
        assert "~diagnostics/grad_norm/by_depth" in tags["images"] and "test/confusion_matrix" in tags["images"], tags[
            "images"
        ]
    elif case == "callbacks=early_stopping":  # val/acc never improves: stops after 1 + patience 3 epochs
        assert metrics["epochs"] == 4
    elif case == "logger=many_loggers":
        assert "val/acc" in (out / "csv" / "metrics.csv").read_text()
        assert "val/acc" in _tags(out)["scalars"]


def test_mlflow_logger_records_the_run_in_its_local_store(tmp_path):
    """logger=mlflow, read back with MLflow's own client from the SQLite store under the log
    dir (what `mlflow ui` shows): the run named after its dir, its parameters, and every
    metric with the values the run reports."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs" / "12-00-00_abc123"
    cfg = compose_cfg([*QUIET, "logger=mlflow", "trainer.max_epochs=2"], out)
    cfg.paths.log_dir = str(tmp_path)
    metrics = fit(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mlplab").experiment_id])
    assert run.info.run_name == "12-00-00_abc123" and run.info.status == "FINISHED"
    assert run.data.tags["output_dir"] == str(out)
    params = run.data.params
    assert params["optimizer.lr"] == "0.05" and params["model._target_"] == "mlplab.models.MLP"
    assert params["model.hidden_sizes"] == "[256, 128]" and params["trainer.max_epochs"] == "2"
    for key in ("train/loss", "train/acc", "val/acc", "val/acc_best", "test/acc", "test/loss"):
        assert run.data.metrics[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one a epoch
    assert len(client.get_metric_history(run.info.run_id, "test/acc")) == 1
    assert not (tmp_path / "mlflow-artifacts").exists() and not (tmp_path / "mlruns").exists()


# -- hydra/launcher=slurm: submitit's sbatch file, run by a stand-in for SLURM -------------------

FAKE_SBATCH = r'''#!/usr/bin/env python3
"""sbatch stand-in: keeps the submission file and answers at once, as sbatch does; a detached
process runs the job (srun: the command) once submitit has moved its files into the job
folder, then leaves a marker for sacct."""
import os, re, shutil, subprocess, sys
script_path = sys.argv[-1]
script = open(script_path).read()
assert "--array" not in script, "one job per submission here"
state = os.environ["FAKE_SLURM_DIR"]
shutil.copy(script_path, os.path.join(state, "submitted.sh"))
shutil.copy(script_path, os.path.join(state, "job.sh"))
folder = re.search(r"submitit.core._submit (\S+)", script)[1].replace("%j", "4242")
runner = f"""
import os, subprocess, time
deadline = time.time() + 120
while not os.path.exists({os.path.join(folder, '4242_submitted.pkl')!r}) and time.time() < deadline:
    time.sleep(0.2)
env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
           SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NAME="train")
code = subprocess.run(["bash", {os.path.join(state, 'job.sh')!r}], env=env).returncode
open({os.path.join(state, 'finished')!r}, "w").write("COMPLETED" if code == 0 else "FAILED")
"""
subprocess.Popen([sys.executable, "-c", runner], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("Submitted batch job 4242")
'''
FAKE_SRUN = r'''#!/usr/bin/env python3
"""srun stand-in: drops srun's own options, runs the command."""
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args = args[2:] if args[0] in ("--output", "--error") else args[1:]
os.execvp(args[0], args)
'''
FAKE_SACCT = r"""#!/bin/sh
# sacct stand-in: RUNNING until the job's runner leaves its marker
state=$(cat "$FAKE_SLURM_DIR/finished" 2>/dev/null || echo RUNNING)
echo "JobID|State|NodeList"
echo "4242|$state|localhost"
"""


@pytest.mark.slow  # a sweep through the CLI: about 30 s on 2 cores
def test_slurm_launcher_preset_runs_its_jobs(tmp_path):
    """-m hydra/launcher=slurm: the preset's resources reach the sbatch file, and the job it
    describes trains (SLURM's sbatch/srun/sacct replaced by local stand-ins on PATH)."""
    import os
    import stat

    from conftest import run_cli
    from mlplab.runs import read_run_record

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    log_dir = tmp_path / "logs"
    proc = run_cli(
        "train",
        [
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=debugq",
            *QUIET,
            "trainer.max_epochs=1",
            "logger=none",
            f"paths.log_dir={log_dir}",
        ],
        cwd=tmp_path,
        env={
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_DIR": str(tmp_path),
            "MLPLAB_ROOT": str(tmp_path),
            "MLPLAB_DATA_DIR": str(tmp_path / "data"),
        },
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted = (tmp_path / "submitted.sh").read_text()
    for line in (
        "--partition=debugq",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=4",
        "--mem=16GB",
        "--time=60",
    ):
        assert f"#SBATCH {line}" in submitted, submitted
    [job] = [p.parent for p in log_dir.glob("multiruns/*/*/*/run.json")]
    record = read_run_record(job)
    assert record["status"] == "ok", record
    assert record["metrics"]["test/acc"] > 0.5  # digits, one epoch: well above chance
    assert (job / "checkpoints" / "last.ckpt").is_file()

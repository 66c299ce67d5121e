"""The command line end to end: help, run dirs, checkpoints, TensorBoard, eval, multirun, DDP.

Every CLI test runs ``python src/train.py`` (or ``eval.py``) in a subprocess with
``paths.log_dir`` and ``MLPLAB_ROOT`` under ``tmp_path``. A subprocess costs several
seconds of imports, so each test checks everything it can on one run's output.
Reproducibility and the return value of ``train()`` go through the Python API.
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import QUICK, REPO, compose_cfg, run_cli
from mlplab.data import DigitsDataModule
from mlplab.engines import train

# Quiet, short CLI runs. Every run also gets paths.log_dir (see _cli_args).
CLI_QUICK = ["trainer=cpu", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]
METRIC_TAGS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
RUN_NAME_RE = re.compile(r"^\d{2}-\d{2}-\d{2}_[0-9a-f]{6}$")
SUMMARY_RE = re.compile(r"test/acc=(\d+\.\d{4}).*\(output: (.+)\)$")


# -- helpers ------------------------------------------------------------------------------
def _env(tmp_path: Path) -> dict[str, str]:
    # MLPLAB_ROOT under tmp_path as well: a run that forgot paths.log_dir still stays out of the repo.
    return {"MLPLAB_ROOT": str(tmp_path), "MLPLAB_DATA_DIR": str(tmp_path / "data")}


def _cli_args(log_dir: Path, *extra: str) -> list[str]:
    return [*CLI_QUICK, f"paths.log_dir={log_dir}", *extra]


def _check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def _summaries(stdout: str) -> list[tuple[float, Path]]:
    """``(test/acc, output dir)`` of every summary line train/eval printed."""
    out = []
    for line in stdout.splitlines():
        m = SUMMARY_RE.search(line.strip())
        if m:
            out.append((float(m.group(1)), Path(m.group(2))))
    return out


def _accumulator(tb_dir: Path) -> EventAccumulator:
    assert list(tb_dir.glob("events.out.tfevents.*")), f"no event file in {tb_dir}"
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def _scalars(ea: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _hparams(ea: EventAccumulator) -> dict[str, HParamsPluginData]:
    return {tag: HParamsPluginData.FromString(raw) for tag, raw in ea.PluginTagToContent("hparams").items()}


def _tensorboard_hparams_experiment(logdir: Path):
    """The experiment TensorBoard's HPARAMS tab shows for ``tensorboard --logdir logdir``."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    hp = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider, multiplexer=mux))
    ctx = context.RequestContext()
    return hp.experiment_from_metadata(
        ctx, "", True, hp.hparams_metadata(ctx, ""), hp.hparams_from_data_provider(ctx, "", None)
    )


def _all_tags(ea: EventAccumulator) -> set[str]:
    tags: set[str] = set()
    for value in ea.Tags().values():
        if isinstance(value, list):
            tags.update(value)
    return tags


def _state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _run_dirs(log_dir: Path) -> list[Path]:
    """Every dir under ``log_dir`` that Hydra made for a job (it holds ``.hydra/``)."""
    return sorted(p.parent for p in log_dir.rglob(".hydra"))


# -- a. help --------------------------------------------------------------------------------
def test_help_lists_groups_and_options(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    proc = run_cli("train", ["--help", f"paths.log_dir={log_dir}"], cwd=tmp_path, env=_env(tmp_path))
    _check_ok(proc)
    text = proc.stdout
    assert "python src/train.py" in text and "python src/eval.py ckpt_path=PATH" in text
    section = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        m = re.match(r"^(\w+): (.+)$", line.strip())
        if m:
            groups[m.group(1)] = [o.strip() for o in m.group(2).split(",")]
    assert {"digits", "fashion_mnist", "mnist"} <= set(groups["data"])
    assert {"relu_mlp", "sigmoid_net", "simple_net"} <= set(groups["model"])
    assert {"ddp", "ddp_cpu", "cpu", "gpu", "default"} <= set(groups["trainer"])
    assert {"callbacks", "logger", "optimizer", "scheduler", "experiment", "debug"} <= set(groups)
    # The composed config is shown below the groups, with the default choices.
    assert "_target_: mlplab.data.DigitsDataModule" in text and "_target_: mlplab.models.MLP" in text
    assert "Common keys:" in text
    assert not log_dir.exists(), "--help must not create output dirs"


# -- b, c, d. two concurrent runs on digits, then eval --------------------------------------
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two identical ``train.py`` commands started together (default run dirs, 2 epochs)."""
    tmp = tmp_path_factory.mktemp("digits-runs")
    log_dir = tmp / "logs"
    cmd = [sys.executable, str(REPO / "src" / "train.py"), *_cli_args(log_dir, "trainer.max_epochs=2")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **_env(tmp)}
    procs = []
    for i in range(2):
        out, err = (tmp / f"stdout{i}.txt").open("w"), (tmp / f"stderr{i}.txt").open("w")
        procs.append((subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=err), out, err))
    results = []
    for i, (proc, out, err) in enumerate(procs):
        rc = proc.wait(timeout=600)
        out.close(), err.close()
        results.append(
            subprocess.CompletedProcess(
                cmd, rc, (tmp / f"stdout{i}.txt").read_text(), (tmp / f"stderr{i}.txt").read_text()
            )
        )
    return {"tmp": tmp, "log_dir": log_dir, "procs": results}


def test_concurrent_runs_get_distinct_run_dirs(digits_runs: dict) -> None:
    log_dir = digits_runs["log_dir"]
    printed = []
    for proc in digits_runs["procs"]:
        _check_ok(proc)
        summaries = _summaries(proc.stdout)
        assert len(summaries) == 1
        printed.append(summaries[0][1])
    assert printed[0] != printed[1]
    assert _run_dirs(log_dir) == sorted(printed)
    for run_dir in printed:
        ckpts = run_dir / "checkpoints"
        assert (ckpts / "last.ckpt").is_file()
        assert len(list(ckpts.glob("epoch_*.ckpt"))) == 1
        assert len(list(run_dir.glob("events.out.tfevents.*"))) >= 1
    # Each run tested its own best checkpoint.
    for proc, run_dir in zip(digits_runs["procs"], printed):
        best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
        assert f"Restoring states from the checkpoint path at {best}" in proc.stderr


def test_single_run_outputs_and_tensorboard(digits_runs: dict) -> None:
    log_dir = digits_runs["log_dir"]
    proc = digits_runs["procs"][0]
    _check_ok(proc)
    [(printed_acc, run_dir)] = _summaries(proc.stdout)
    assert 0.0 <= printed_acc <= 1.0

    # <log_dir>/runs/<date>/<time>_<uid>
    rel = run_dir.relative_to(log_dir)
    assert rel.parts[0] == "runs" and len(rel.parts) == 3
    assert DATE_RE.match(rel.parts[1]) and RUN_NAME_RE.match(rel.parts[2]), rel

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.trainer.max_epochs == 2 and cfg.paths.log_dir == str(log_dir)
    assert cfg.data._target_ == "mlplab.data.DigitsDataModule" and cfg.model._target_ == "mlplab.models.MLP"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    [best] = list((run_dir / "checkpoints").glob("epoch_*.ckpt"))

    ea = _accumulator(run_dir)
    scalars = _scalars(ea)
    assert set(METRIC_TAGS) <= set(scalars)
    for tag in METRIC_TAGS:
        values = [v for _, v in scalars[tag]]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
        if tag.endswith("acc") or tag.endswith("acc_best"):
            assert all(0.0 <= v <= 1.0 for v in values), (tag, values)
    # One value per epoch for epoch metrics, one test value.
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best"):
        assert len(scalars[tag]) == 2, (tag, scalars[tag])
    assert len(scalars["test/acc"]) == 1 and len(scalars["test/loss"]) == 1
    val_acc = [v for _, v in scalars["val/acc"]]
    best_so_far = [max(val_acc[: i + 1]) for i in range(len(val_acc))]
    assert [v for _, v in scalars["val/acc_best"]] == best_so_far
    # The best checkpoint is the epoch with the highest val/acc (first one on ties).
    assert int(best.stem.split("_")[1]) == val_acc.index(max(val_acc))
    tb_test_acc = scalars["test/acc"][0][1]
    assert f"{tb_test_acc:.4f}" == f"{printed_acc:.4f}"

    # HPARAMS tab: metric names in the experiment, run's hparams, no placeholder metric.
    hp = _hparams(ea)
    experiments = [d.experiment for d in hp.values() if d.HasField("experiment")]
    starts = [d.session_start_info for d in hp.values() if d.HasField("session_start_info")]
    assert len(experiments) == 1 and len(starts) == 1
    metric_names = {m.name.tag for m in experiments[0].metric_infos}
    assert {"val/acc_best", "test/acc"} <= metric_names
    # Every metric the tab shows is a real scalar of this run (its values come from there).
    assert metric_names <= set(scalars)
    hparams = starts[0].hparams
    assert hparams["04 lr"].number_value == pytest.approx(0.05)
    assert hparams["08 hidden_sizes"].string_value == "[256, 128]"
    assert hparams["07 epochs"].number_value == 2
    assert "hp_metric" not in _all_tags(ea) and "hp_metric" not in scalars
    assert scalars["val/acc_best"][-1][1] > 0.5

    # The default diagnostics (callbacks=default): gradient norms every log_every_n_steps (50;
    # 38 steps an epoch), weight histograms, sample/confusion/misclassified images, the report.
    for i in (1, 2, 3):
        assert [s for s, _ in scalars[f"~diagnostics/grad_norm/layer_{i:02d}"]] == [0, 50]
    assert "~diagnostics/grad_norm/layer_04" not in scalars
    tags = ea.Tags()
    assert {"train/samples", "~diagnostics/grad_norm/by_depth", "test/confusion_matrix", "test/misclassified"} == set(
        tags["images"]
    )
    assert {f"~diagnostics/weights/layer_0{i}" for i in (1, 2, 3)} == set(tags["histograms"])
    assert "test/report/text_summary" in tags["tensors"]
    assert "macro avg" in (run_dir / "train.log").read_text()


def test_eval_reproduces_train_test_accuracy(digits_runs: dict) -> None:
    tmp = digits_runs["tmp"]
    train_proc = digits_runs["procs"][0]
    _check_ok(train_proc)
    [(train_acc, run_dir)] = _summaries(train_proc.stdout)
    m = re.search(r"Restoring states from the checkpoint path at (\S+\.ckpt)", train_proc.stderr)
    assert m, "train did not say which checkpoint it tested"
    best = Path(m.group(1))
    assert best.parent == run_dir / "checkpoints" and best.name.startswith("epoch_")

    eval_log_dir = tmp / "eval-logs"
    # trainer=cpu as in training: the same device, so the same float results.
    proc = run_cli(
        "eval", [f"ckpt_path={best}", "trainer=cpu", f"paths.log_dir={eval_log_dir}"], cwd=tmp, env=_env(tmp)
    )
    _check_ok(proc)
    [(eval_acc, eval_dir)] = _summaries(proc.stdout)
    assert eval_acc == train_acc
    assert eval_dir.relative_to(eval_log_dir).parts[0] == "eval"  # logs/eval/<date>/<time>_<uid>

    train_tb = _scalars(_accumulator(run_dir))
    eval_ea = _accumulator(eval_dir)
    eval_tb = _scalars(eval_ea)
    # Same weights, same test set, same batches: the same float32 values.
    assert eval_tb["test/acc"][-1][1] == train_tb["test/acc"][-1][1]
    assert eval_tb["test/loss"][-1][1] == pytest.approx(train_tb["test/loss"][-1][1], rel=1e-6)
    assert not any(tag.startswith(("train/", "val/")) for tag in eval_tb)
    metric_names = {
        m.name.tag for d in _hparams(eval_ea).values() if d.HasField("experiment") for m in d.experiment.metric_infos
    }
    assert "test/acc" in metric_names and "hp_metric" not in _all_tags(eval_ea)
    # The test-time diagnostics come with eval too (callbacks=default), and nothing of training.
    assert set(eval_ea.Tags()["images"]) == {"test/confusion_matrix", "test/misclassified"}
    assert "test/report/text_summary" in eval_ea.Tags()["tensors"] and not eval_ea.Tags()["histograms"]


# -- e. multirun ----------------------------------------------------------------------------
def test_multirun_over_models(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    models = ["simple_net", "sigmoid_net", "relu_mlp"]
    targets = {
        "simple_net": "mlplab.models.SimpleNet",
        "sigmoid_net": "mlplab.models.SigmoidNet",
        "relu_mlp": "mlplab.models.MLP",
    }
    hidden = {"simple_net": 120, "sigmoid_net": 120, "relu_mlp": 256}
    proc = run_cli(
        "train",
        ["-m", f"model={','.join(models)}", *_cli_args(log_dir, "trainer.max_epochs=1")],
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    _check_ok(proc)
    assert not (log_dir / "runs").exists()
    dated = list((log_dir / "multiruns").iterdir())
    assert len(dated) == 1 and DATE_RE.match(dated[0].name)
    sweeps = list(dated[0].iterdir())
    assert len(sweeps) == 1 and RUN_NAME_RE.match(sweeps[0].name)
    sweep = sweeps[0]
    # Job dirs are named <job number>_<its overrides> (Hydra's override_dirname, sorted by key).
    names = [
        f"{i}_callbacks.progress_bar.refresh_rate=0,model={m},trainer.enable_model_summary=False,"
        f"trainer.max_epochs=1,trainer=cpu"
        for i, m in enumerate(models)
    ]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == names
    assert _run_dirs(log_dir) == [sweep / n for n in names]

    summaries = _summaries(proc.stdout)
    assert [d for _, d in summaries] == [sweep / n for n in names]
    # The sweep summary: one ok row per job with the job's own numbers, printed at the end.
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == names and {r["status"] for r in rows} == {"ok"}
    assert [f"{float(r['test/acc']):.4f}" for r in rows] == [f"{acc:.4f}" for acc, _ in summaries]
    assert "| 2 | `model=relu_mlp` | " in proc.stdout and str(sweep / "summary.md") in proc.stdout
    for (printed_acc, job_dir), model in zip(summaries, models):
        assert f"model={model}" in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        assert OmegaConf.load(job_dir / ".hydra" / "config.yaml").model._target_ == targets[model]
        ckpt = job_dir / "checkpoints" / "last.ckpt"
        stored = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert stored["hyper_parameters"]["config"]["model"]["_target_"] == targets[model]
        first_weight = next(v for v in stored["state_dict"].values() if v.ndim == 2)
        assert tuple(first_weight.shape) == (hidden[model], 64)
        event_files = list(job_dir.glob("events.out.tfevents.*"))
        assert event_files
        scalars = _scalars(_accumulator(job_dir))
        assert len(scalars["val/acc"]) == 1, "each job logs only its own epoch"
        assert f"{scalars['test/acc'][0][1]:.4f}" == f"{printed_acc:.4f}"
    # Each job has its own event files.
    all_events = [f.name for d in names for f in (sweep / d).glob("events.out.tfevents.*")]
    assert len(all_events) == len(set(all_events))

    # TensorBoard's HPARAMS tab on the sweep compares all jobs: the experiment it builds has
    # the union of their hparams (SimpleNet's hidden_size and the MLP's hidden_sizes) and
    # all three models, because no job claims the experiment for itself.
    for job in names:
        assert set(_hparams(_accumulator(sweep / job))) == {
            "_hparams_/session_start_info",
            "_hparams_/session_end_info",
        }
    experiment = _tensorboard_hparams_experiment(sweep)
    infos = {h.name: h for h in experiment.hparam_infos}
    assert {"08 hidden_sizes", "09 activation", "04 lr"} <= set(infos)
    # SimpleNet's hidden_size and the MLP's hidden_sizes are one column, "[120]" beside "[256, 128]".
    assert {v.string_value for v in infos["08 hidden_sizes"].domain_discrete.values} == {"[120]", "[256, 128]"}
    assert {v.string_value for v in infos["01 model"].domain_discrete.values} == {"SimpleNet", "SigmoidNet", "MLP"}
    # Columns: the hparams that differ between the jobs first (TensorBoard's order), numbered.
    differ = [h.name for h in experiment.hparam_infos if h.differs]
    assert differ[:2] == ["01 model", "08 hidden_sizes"] and "02 data" not in differ
    assert {"val/acc_best", "test/acc"} <= {m.name.tag for m in experiment.metric_infos}


# -- f, h. reproducibility and the return value (Python API) --------------------------------
def _quick(overrides: tuple[str, ...]) -> list[str]:
    base = [o for o in QUICK if not o.startswith("trainer.max_epochs=")]
    return [*base, "trainer.max_epochs=2", *overrides]


def test_same_seed_is_bit_identical_and_train_returns_the_optimized_metric(tmp_path: Path) -> None:
    runs = {
        "a": ("seed=42",),
        "b": ("seed=42",),
        "other_seed": ("seed=7",),
        "test_metric": ("seed=42", "optimized_metric=test/acc"),
    }
    returned, scalars, last, best = {}, {}, {}, {}
    for name, overrides in runs.items():
        out = tmp_path / name
        returned[name] = train(compose_cfg(_quick(overrides), out))
        scalars[name] = _scalars(_accumulator(out))
        last[name] = _state_dict(out / "checkpoints" / "last.ckpt")
        [best_path] = list((out / "checkpoints").glob("epoch_*.ckpt"))
        best[name] = (best_path.name, _state_dict(best_path))

    # Same config and seed: identical metrics and bit-identical weights.
    for tag in METRIC_TAGS:
        assert scalars["a"][tag] == scalars["b"][tag], tag
    assert last["a"].keys() == last["b"].keys()
    for key in last["a"]:
        assert torch.equal(last["a"][key], last["b"][key]), key
    assert best["a"][0] == best["b"][0]
    for key in best["a"][1]:
        assert torch.equal(best["a"][1][key], best["b"][1][key]), key

    # Another seed: other weights.
    weights = [k for k, v in last["a"].items() if v.is_floating_point() and v.ndim == 2]
    assert weights
    assert not any(torch.equal(last["a"][k], last["other_seed"][k]) for k in weights)

    # train() returns cfg.optimized_metric: val/acc_best by default, test/acc on request.
    assert isinstance(returned["a"], float)
    assert returned["a"] == pytest.approx(scalars["a"]["val/acc_best"][-1][1], abs=1e-7)
    assert returned["a"] == pytest.approx(max(v for _, v in scalars["a"]["val/acc"]), abs=1e-7)
    assert returned["test_metric"] == pytest.approx(scalars["test_metric"]["test/acc"][-1][1], abs=1e-7)
    # The training itself is the same as run a (the metric choice changes nothing else).
    assert returned["test_metric"] == pytest.approx(scalars["a"]["test/acc"][-1][1], abs=1e-7)


# -- g. DDP on the CPU ----------------------------------------------------------------------
# Slow (~35 s): tests/test_ddp.py's sweep of DDP jobs checks the same per-job layout in the default suite.
@pytest.mark.slow
def test_ddp_cpu_writes_one_run_dir(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    run_dir = tmp_path / "ddp"
    proc = run_cli(
        "train",
        _cli_args(log_dir, "trainer=ddp_cpu", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"),
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    _check_ok(proc)
    summaries = _summaries(proc.stdout)
    assert len(summaries) == 1, proc.stdout  # rank 0 only
    assert summaries[0][1] == run_dir
    assert proc.stdout.count("test/acc=") == 1

    # Nothing under log_dir, nothing else under tmp_path: one job dir for both ranks.
    assert not log_dir.exists() or not any(p.is_file() for p in log_dir.rglob("*"))
    assert _run_dirs(tmp_path) == [run_dir]
    assert sorted({p.parent for p in tmp_path.rglob("events.out.tfevents.*")}) == [run_dir]
    assert [p for p in tmp_path.rglob("checkpoints") if p.is_dir()] == [run_dir / "checkpoints"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2  # last + best
    assert list(run_dir.rglob("config.yaml")) == [run_dir / ".hydra" / "config.yaml"]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_rank1.log").is_file()

    scalars = _scalars(_accumulator(run_dir))
    assert set(METRIC_TAGS) <= set(scalars)
    assert len(scalars["val/acc_best"]) == 2 and len(scalars["test/acc"]) == 1
    assert f"{scalars['test/acc'][0][1]:.4f}" == f"{summaries[0][0]:.4f}"
    # The two ranks split the training set: half the optimizer steps of one process.
    dm = DigitsDataModule()
    dm.setup()
    steps_per_epoch = math.ceil(math.ceil(len(dm.data_train) / 2) / dm.batch_size)
    assert [s for s, _ in scalars["val/acc"]] == [steps_per_epoch - 1, 2 * steps_per_epoch - 1]


def test_the_console_says_what_runs_where_and_nothing_else(digits_runs: dict) -> None:
    """The first line says what is trained on what, on which device, and where the run dir is;
    Lightning's accelerator report, tips and 'stopped' line are gone."""
    train_proc = digits_runs["procs"][0]
    _check_ok(train_proc)
    [(train_acc, run_dir)] = _summaries(train_proc.stdout)
    first = next(line for line in train_proc.stdout.splitlines() if line.strip())
    assert re.fullmatch(
        r"train: MLP \([\d,]+ parameters, [\d.]+ MB\) on data=digits \(1,213 train / 135 val / 449 test\) "
        rf"with engine=lightning on the cpu; run dir: {re.escape(str(run_dir))}",
        first,
    ), first
    console = train_proc.stdout + train_proc.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "`Trainer.fit` stopped", "| Name"):
        assert noise not in console, noise
    # Then the config tree, one line a group; the whole console (its progress bar aside:
    # refresh_rate=0 here, two lines on a terminal) fits on one screen.
    lines = [line for line in train_proc.stdout.splitlines() if line.strip()]
    assert lines[1] == "config (all of it: config_tree.log in the run dir)", lines[:3]
    tree = [line for line in lines[2:] if line.startswith(("├── ", "└── "))]
    assert len(tree) <= 12 and tree[-1].startswith("└── engine=lightning  seed=42  steps_per_call=16"), tree
    assert tree[3].startswith("├── optimizer: sgd  lr=0.05 momentum=0.9"), tree
    shown = [line for line in console.splitlines() if line.strip()]
    assert len(shown) + 2 <= 40, "\n".join(shown)
    assert "max_epochs: 2" in (run_dir / "config_tree.log").read_text()

    # eval.py takes the run dir and tests its best checkpoint, saying which file.
    tmp = digits_runs["tmp"]
    proc = run_cli(
        "eval", [f"ckpt_path={run_dir}", "trainer=cpu", f"paths.log_dir={tmp / 'eval-run-dir'}"], cwd=tmp, env=_env(tmp)
    )
    _check_ok(proc)
    first = next(line for line in proc.stdout.splitlines() if line.strip())
    best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    assert first.startswith(f"eval: {best} (the run's best checkpoint): MLP ("), first
    assert " on data=digits (1,213 train / 135 val / 449 test) on the cpu; run dir: " in first
    [(eval_acc, _)] = _summaries(proc.stdout)
    assert eval_acc == train_acc

"""hydra/launcher=population: the jobs of a sweep trained as populations, each member a complete job.

Tolerances as in tests/test_population.py: a member's weights against its sequential run's
to max |delta| <= 1e-4 * max |w|; its final test/acc within 0.3 points after a full
(default-length) digits run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUICK, REPO, compose_cfg, load_ckpt, run_cli
from mlplab.engines.eval import evaluate
from mlplab.engines.population import train_group, write_member
from mlplab.engines.run import fit
from mlplab.errors import DivergenceError
from mlplab.lightning_ext.checkpoint import epoch_end_loop_state
from mlplab.population.launcher import PopulationLauncher, _Job

COMMON = [*QUICK, "threads=1"]


def _net_weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_ckpt(path)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_the_loop_state_of_a_member_checkpoint_is_the_one_lightning_writes(tmp_path):
    """epoch_end_loop_state against the loops entry of a real two-epoch run's last.ckpt
    (one optimizer step per batch, an epoch-interval schedule): equal, record for record."""
    cfg = compose_cfg([*COMMON, "trainer.max_epochs=2", "steps_per_call=1", "logger=none", "test=false"], tmp_path)
    fit(cfg)
    ckpt = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * 38  # digits: 1,213 train samples, batches of 32
    assert ckpt["loops"] == epoch_end_loop_state(2, 38, 1, "epoch")


def _group(tmp_path: Path, members: list[list[str]], common: list[str]) -> tuple[list, object]:
    cfgs = [compose_cfg([*common, *m], tmp_path / f"member{i}") for i, m in enumerate(members)]
    return cfgs, train_group(cfgs)


def test_members_written_out_equal_their_sequential_runs(tmp_path):
    """A full digits run (default epochs, cosine schedule): each member's last checkpoint
    against its sequential run's, its test/acc within 0.3 points, its TensorBoard scalars at
    the sequential run's steps; eval of its best checkpoint gives its test/acc."""
    common = ["trainer=cpu", "callbacks.progress_bar.refresh_rate=0", "threads=1", "recipe=none"]
    members = [["seed=1", "optimizer.lr=0.02"], ["seed=2", "optimizer.lr=0.1"]]
    cfgs, run = _group(tmp_path, members, common)
    for i, cfg in enumerate(cfgs):
        metrics = write_member(cfg, run, i, figures=(i == 1))
        seq_cfg = compose_cfg([*common, *members[i]], tmp_path / f"sequential{i}")
        seq = fit(seq_cfg)
        member_dir, seq_dir = Path(cfg.paths.output_dir), Path(seq_cfg.paths.output_dir)
        gap = _relative_gap(
            _net_weights(member_dir / "checkpoints/last.ckpt"), _net_weights(seq_dir / "checkpoints/last.ckpt")
        )
        assert gap <= 1e-4, (i, gap)
        assert abs(metrics["test/acc"] - seq["test/acc"]) <= 0.003, (i, metrics, seq)
        assert metrics["val/acc_best"] == pytest.approx(seq["val/acc_best"], abs=0.003)
        assert metrics["epochs"] == seq["epochs"] == 10
        # The same best epoch file name, and the same scalars at the same steps.
        assert sorted(p.name for p in (member_dir / "checkpoints").iterdir()) == sorted(
            p.name for p in (seq_dir / "checkpoints").iterdir()
        )
        ours, theirs = _scalars(member_dir), _scalars(seq_dir)
        for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/loss"):
            assert [s for s, _ in ours[tag]] == [s for s, _ in theirs[tag]], tag
            assert [v for _, v in ours[tag]] == pytest.approx([v for _, v in theirs[tag]], abs=0.01), tag
        best = next((member_dir / "checkpoints").glob("epoch_*.ckpt"))
        eval_cfg = compose_cfg(
            [f"ckpt_path={best}", "trainer=cpu", "logger=none", "callbacks=none"], tmp_path / f"eval{i}", "eval"
        )
        assert evaluate(eval_cfg)["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    # Figures for the member that asked for them only.
    images = lambda d: EventAccumulator(str(d)).Reload().Tags()["images"]  # noqa: E731
    assert "test/confusion_matrix" in images(tmp_path / "member1")
    assert "test/confusion_matrix" not in images(tmp_path / "member0")


def test_a_member_checkpoint_resumes_as_its_single_run_would_continue(tmp_path):
    """Two epochs as a member, then one more with ckpt_path= (a single Lightning run): the
    weights of the sequential three-epoch run (no schedule, momentum state carried)."""
    common = [*COMMON, "scheduler=none", "logger=none", "test=false"]
    cfgs, run = _group(tmp_path, [["seed=5", "trainer.max_epochs=2"], ["seed=6", "trainer.max_epochs=2"]], common)
    write_member(cfgs[0], run, 0)
    last = tmp_path / "member0" / "checkpoints" / "last.ckpt"
    resumed = compose_cfg([*common, "seed=5", "trainer.max_epochs=3", f"ckpt_path={last}"], tmp_path / "resumed")
    assert fit(resumed)["epochs"] == 3
    sequential = compose_cfg([*common, "seed=5", "trainer.max_epochs=3"], tmp_path / "sequential")
    fit(sequential)
    gap = _relative_gap(
        _net_weights(tmp_path / "resumed/checkpoints/last.ckpt"),
        _net_weights(tmp_path / "sequential/checkpoints/last.ckpt"),
    )
    assert gap <= 1e-4, gap


def test_a_members_best_epoch_follows_the_checkpoint_monitor(tmp_path):
    """callbacks.model_checkpoint.monitor=val/loss (mode min): each member's best checkpoint is
    its epoch of least val/loss, the epoch its sequential run's ModelCheckpoint keeps."""
    monitor = ["callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min"]
    common = [*COMMON, "trainer.max_epochs=6", "logger=none", "test=false", "scheduler=none", *monitor]
    members = [["seed=1", "optimizer.lr=0.3"], ["seed=2", "optimizer.lr=0.02"]]
    cfgs, run = _group(tmp_path, members, common)
    for i, cfg in enumerate(cfgs):
        write_member(cfg, run, i)
        losses = [r["val/loss"] for r in run.results[i].history]
        best = losses.index(min(losses))
        ours = sorted(p.name for p in (tmp_path / f"member{i}" / "checkpoints").glob("epoch_*.ckpt"))
        assert ours == [f"epoch_{best:03d}.ckpt"], (i, losses)
        assert load_ckpt(tmp_path / f"member{i}" / "checkpoints" / ours[0])["epoch"] == best
        fit(compose_cfg([*common, *members[i]], tmp_path / f"sequential{i}"))
        theirs = sorted(p.name for p in (tmp_path / f"sequential{i}" / "checkpoints").glob("epoch_*.ckpt"))
        assert ours == theirs


def test_a_diverging_member_fails_alone_with_its_single_runs_message(tmp_path):
    common = [*COMMON, "trainer.max_epochs=2", "logger=none"]
    members = [["seed=1", "optimizer.lr=0.05"], ["seed=1", "optimizer.lr=1e6"]]
    cfgs, run = _group(tmp_path, members, common)
    assert write_member(cfgs[0], run, 0)["test/acc"] > 0.5
    with pytest.raises(DivergenceError) as ours:
        write_member(cfgs[1], run, 1)
    with pytest.raises(DivergenceError) as theirs:
        fit(compose_cfg([*common, *members[1]], tmp_path / "sequential"))
    assert str(ours.value) == str(theirs.value)
    assert not (tmp_path / "member1" / "checkpoints").exists()  # it diverged in its first epoch


def _jobs(tmp_path: Path, sweep: list[list[str]]) -> list[_Job]:
    from omegaconf import OmegaConf

    from mlplab.population.train import refusal, shared_settings

    jobs = []
    for idx, overrides in enumerate(sweep):
        plain = OmegaConf.to_container(compose_cfg([*QUICK, *overrides], tmp_path / str(idx)), resolve=True)
        jobs.append(_Job(idx, overrides, None, plain, shared_settings(plain), refusal(plain)))
    return jobs


def test_jobs_are_grouped_by_what_they_share_and_split_at_max_members(tmp_path):
    sweep = [
        ["seed=1", "model.activation=relu"],
        ["seed=1", "model.activation=sigmoid"],
        ["seed=2", "model.activation=relu", "optimizer.lr=0.2", "model.dropout=0.1"],
        ["seed=2", "model.activation=sigmoid"],
        ["seed=3", "model.activation=relu"],
        ["seed=3", "model.hidden_sizes=[8]"],
        ["seed=1", "augment=affine"],
        ["seed=4", "callbacks.model_checkpoint.monitor=val/acc_best"],
    ]
    groups, alone = PopulationLauncher().plan(_jobs(tmp_path, sweep), max_members=2)
    assert [[j.idx for j in g.jobs] for g in groups] == [[0, 2], [4], [1, 3]]
    assert [(j.idx, why) for j, why in alone] == [
        (5, "no other job has its model.hidden_sizes=[8]"),
        (6, "data.augment is not supported by population training; allowed: augment=none"),
        (
            7,
            "callbacks.model_checkpoint.monitor=val/acc_best is not supported by population training; "
            "allowed: val/acc, val/loss, train/acc, train/loss",
        ),
    ]


@pytest.mark.slow  # a CLI sweep, eval and resume (~50 s); the members' equivalence tests above are default
def test_a_population_sweep_from_the_command_line(tmp_path):
    """Members and lone jobs in one sweep: one line per group and per lone job, every member dir
    a complete run, the summary over seeds, eval of a member's checkpoint, resume= of a member."""
    proc = run_cli(
        "train",
        ["-m", "hydra/launcher=population", "seed=1,2", "engine=lightning,ignite", *QUICK, "trainer.max_epochs=2"],
        cwd=tmp_path,
        env={"MLPLAB_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "population 1/1: jobs 0,2, 2 members differing in seed, trained as one stacked model" in out
    assert "job 1 runs alone (seed=1 engine=ignite): engine=ignite is not supported by population training" in out
    assert "job 3 runs alone (seed=2 engine=ignite)" in out
    sweep = next((tmp_path / "logs" / "multiruns").glob("*/*"))
    rows = list((sweep / "summary.csv").read_text().splitlines())
    assert len(rows) == 5
    members = sorted(p for p in sweep.iterdir() if p.name.startswith(("0_", "2_")))
    for member in members:
        record = json.loads((member / "run.json").read_text())
        assert record["status"] == "ok" and record["epochs"] == 2 and 0.5 < record["metrics"]["test/acc"] <= 1
        assert (member / ".hydra" / "overrides.yaml").is_file() and (member / "hparams.yaml").is_file()
        assert {p.name for p in (member / "checkpoints").iterdir()} >= {"last.ckpt"}
        assert "val/acc_best" in _scalars(member)
    record = json.loads((members[0] / "run.json").read_text())
    best = next((members[0] / "checkpoints").glob("epoch_*.ckpt"))
    proc = run_cli("eval", [f"ckpt_path='{best}'"], cwd=tmp_path, env={"MLPLAB_ROOT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"test/acc={record['metrics']['test/acc']:.4f}" in proc.stdout
    proc = run_cli(
        "train", [f"resume='{members[0]}'", "trainer.max_epochs=3"], cwd=tmp_path, env={"MLPLAB_ROOT": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((members[0] / "run.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 3
    assert [s for s, _ in _scalars(members[0])["val/acc"]] == [37, 75, 113]  # continued, not restarted


SEEDS_PRESETS = {
    # preset: (quick overrides, (populations, members each), needs real data); all in the slow tier (15-60 s each)
    "moons_activations_seeds": (["trainer.max_epochs=2", "model.activation=identity,relu"], (2, 2), False),
    "dropout_seeds": (["trainer.max_epochs=2"], (1, 4), False),
    "lesson_d_models_seeds": (["trainer.max_epochs=1"], (3, 2), True),
    "batch_size_sweep_seeds": (["trainer.max_epochs=1", "data.batch_size=1024,8192"], (2, 2), True),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(SEEDS_PRESETS))
def test_seeds_presets_run_as_populations_and_report_over_seeds(tmp_path, preset, request):
    """Each lesson comparison's seeds variant, shortened to 2 seeds, as a population sweep: the
    populations it should make, and the summary's over-seeds table with one row per setting."""
    quick, (populations, members), real = SEEDS_PRESETS[preset]
    env = {"MLPLAB_ROOT": str(tmp_path)}
    if real:
        env["MLPLAB_DATA_DIR"] = str(request.getfixturevalue("real_data_dir"))
    args = ["-m", f"experiment={preset}", "seed=1,2", "trainer=cpu", "callbacks.progress_bar.refresh_rate=0", *quick]
    proc = run_cli("train", args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = re.findall(r"^population \d+/(\d+): jobs [\d,-]+, (\d+) members", proc.stdout, re.MULTILINE)
    assert groups == [(str(populations), str(members))] * populations, groups
    assert "runs alone" not in proc.stdout
    sweep = next((tmp_path / "logs" / "multiruns").glob("*/*"))
    settings = populations * members // 2
    assert len((sweep / "summary_seeds.csv").read_text().strip().splitlines()) == 1 + settings
    records = [json.loads(p.read_text()) for p in sweep.glob("*/run.json")]
    assert len(records) == populations * members
    assert all(r["status"] == "ok" and 0.0 < r["metrics"]["test/acc"] <= 1.0 for r in records), records


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_a_population_trains_stops_the_sweep_with_one_line(tmp_path, signum, code):
    """Two populations (max_members=2); the signal comes while the second trains: one line and
    130/143, no traceback, the first population's members whole, none of the second's dirs."""
    args = ["-m", "hydra/launcher=population", "seed=1,2,3,4", "population.max_members=2", *QUICK]
    errors = (tmp_path / "stderr.txt").open("w+")  # a file: a pipe nobody reads would block the sweep
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "src" / "train.py"), *args, "trainer.max_epochs=40"],
        cwd=tmp_path,
        env={**os.environ, "MLPLAB_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    starts = 0
    for line in proc.stdout:
        starts += line.startswith("population of 2: epoch 1/40")
        if starts == 2:
            proc.send_signal(signum)
            break
    proc.communicate(timeout=120)
    errors.seek(0)
    err = errors.read()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "while the population of jobs 2,3 trained (they leave no job dirs)" in lines[0], err
    sweep = next((tmp_path / "logs" / "multiruns").glob("*/*"))
    dirs = sorted(p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir())
    assert dirs == ["0", "1"]
    for member in sweep.iterdir():
        if member.is_dir():
            assert json.loads((member / "run.json").read_text())["status"] == "ok"
    assert (sweep / "summary.md").is_file()


def test_a_tampered_loop_state_is_refused_in_one_line_before_training(tmp_path):
    """A member's last.ckpt whose ``loops`` is not a mapping of loop records (tampered or
    foreign): resuming from it is one CheckpointError line, not a traceback inside Lightning."""
    from mlplab.errors import CheckpointError

    common = [*COMMON, "logger=none", "test=false"]
    cfgs, run = _group(tmp_path, [["seed=1"], ["seed=2"]], common)
    write_member(cfgs[0], run, 0)
    last = tmp_path / "member0" / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(last)
    ckpt["loops"] = "garbage"
    torch.save(ckpt, last)
    resumed = compose_cfg([*common, "seed=1", "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed")
    with pytest.raises(CheckpointError, match="has a malformed loop state"):
        fit(resumed)

"""Hydra's refusals of a command line are one line in mlplab's style, exit 2, before any output.

(``mlplab.commandline``: the overrides are composed once before ``@hydra.main`` runs.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import CONF, REPO, run_cli
from mlplab.commandline import check_command_line, command_overrides

CASES = {
    "model=relu_mpl": "error: model=relu_mpl is not an option; allowed: numpy_mlp, relu_mlp, relu_net, sigmoid_net, "
    "simple_net (did you mean relu_mlp?)",
    "recipe=digitz": "error: recipe=digitz is not an option; allowed: digits, moons, none (did you mean digits?)",
    "modle=relu_mlp": "error: modle is neither a config group nor a key; did you mean model=relu_mlp?",
    "optimizer.learning_rate=0.1": "error: optimizer.learning_rate is not a key of optimizer=sgd; allowed: lr, momentum, "
    "weight_decay, nesterov (did you mean lr?)",
    "data.data_dir=/x": "error: data.data_dir is not a key of data=digits; allowed: batch_size, test_size, val_size, "
    "train_size, split_seed, eval_batch_size, mean, std, augment; data.data_dir is a key of data=fashion_mnist, "
    "data=mnist",
    "model=simple_net model.hidden_sizes=[5]": "error: model.hidden_sizes is not a key of model=simple_net; allowed: "
    "hidden_size (did you mean hidden_size?); model.hidden_sizes is a key of model=relu_mlp, model=relu_net",
    "-m seed=1,2 model=simple_net,relu_mpl": "error: model=relu_mpl is not an option; allowed: numpy_mlp, relu_mlp, "
    "relu_net, sigmoid_net, simple_net (did you mean relu_mlp?)",
    "hydra/launcher=jobllib": "error: hydra/launcher=jobllib is not an option; allowed: basic, joblib, population, slurm, "
    "submitit_local, submitit_slurm (did you mean joblib?)",
    "-m hydra/launcher=population seed=1,2 population.max_members=0": "error: population.max_members=0 is invalid; "
    "allowed: a number of members per group (1, 2, ...)",
    "-m hydra/launcher=population population.figures=some": "error: population.figures=some is invalid; "
    "allowed: best, all",
}


@pytest.mark.parametrize("typed", sorted(CASES))
def test_hydras_refusals_are_one_line_with_what_is_allowed(typed, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as info:
        check_command_line(["train.py", *typed.split()], "train", CONF)
    assert info.value.code == 2
    assert capsys.readouterr().err == CASES[typed] + "\n"


def test_a_command_hydra_accepts_passes(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for args in (
        ["model=simple_net", "model.hidden_size=32", "+trainer.limit_train_batches=2"],
        ["-m", "model=simple_net,relu_mlp", "optimizer.lr=0.1,0.2"],
        ["hparams_search=digits_optuna", "hydra.sweeper.n_trials=2"],
        ["--cfg", "job", "data=mnist"],
        ["data=mnist", "recipe=digits"],
        [],
    ):
        check_command_line(["train.py", *args], "train", CONF)
    check_command_line(["eval.py", "ckpt_path=x.ckpt", "data.data_dir=/data"], "eval", CONF)


def test_flags_are_not_overrides():
    assert command_overrides(["-m", "--cfg", "job", "--info", "defaults", "model=x", "-cn", "train", "seed=1"]) == [
        "model=x",
        "seed=1",
    ]
    assert command_overrides(["--help", "model=x"]) is None


def test_the_cli_gives_the_line_and_leaves_nothing_and_hydra_full_error_gives_hydras_report(tmp_path):
    logs = tmp_path / "logs"
    proc = run_cli("train", ["optimizer.learning_rate=0.1", f"paths.log_dir={logs}"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [CASES["optimizer.learning_rate=0.1"]], (
        proc.stderr
    )
    assert not logs.exists()
    proc = run_cli("eval", ["ckpt_path=x.ckpt", "modle=x"], cwd=tmp_path)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == "error: modle is neither a config group nor a key; "
        "allowed: the groups callbacks, logger, paths, trainer; the keys ckpt_path, data, flush_denormal, task_name, threads"
    ), proc.stderr
    proc = run_cli("train", ["model=relu_mpl"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert (
        proc.returncode == 1
        and "MissingConfigException" in proc.stderr
        and "Could not find 'model/relu_mpl'" in proc.stderr
    )


@pytest.mark.parametrize(("script", "typed"), [("train", "modle=relu_mlp"), ("eval", "ckpt_path=x.ckpt modle=x")])
def test_a_refused_command_line_never_loads_torch(tmp_path, script, typed):
    """The refusal comes before torch and Lightning load (seconds on 2 cores): a typo costs
    the user about a second."""
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('loaded:', sorted({'torch', 'lightning'} & set(sys.modules))))\n"
        f"sys.argv = [{str(REPO / 'src' / f'{script}.py')!r}, *{typed.split()!r}]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: modle is neither"), proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"

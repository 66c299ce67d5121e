"""Population training (mlplab.population): M jobs as one stacked model, each member equal to its own run.

Tolerances: initial weights exactly; one optimizer's updates against torch.optim's on the
member alone to max |delta| <= 1e-6 * max |w| over a few steps; a member's weights after
training against the sequential mlplab run of the same job to max |delta| <= 1e-4 * max |w|
(batched matmuls sum in another order than the single net's).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from conftest import QUICK, compose_cfg, load_ckpt
from mlplab.engines.build import build_datamodule, build_net
from mlplab.engines.run import fit
from mlplab.errors import ConfigError, DivergenceError
from mlplab.models import MLP, SigmoidNet, SimpleNet
from mlplab.population import (
    PopulationOptimizer,
    StackedNets,
    build_population,
    check_members,
    evaluate,
    run_population,
)

COMMON = [*QUICK, "logger=none", "test=false", "threads=1"]


def _cfgs(tmp_path, members, common=COMMON):
    return [compose_cfg([*common, *m], tmp_path / f"member{i}") for i, m in enumerate(members)]


def _sequential_weights(cfg) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The net's weights in the sequential run's last checkpoint, and the run's metrics."""
    metrics = fit(cfg)
    ckpt = load_ckpt(f"{cfg.paths.output_dir}/checkpoints/last.ckpt")
    return {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}, metrics


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def test_members_start_from_their_sequential_runs_initial_weights(tmp_path):
    members = [["seed=3"], ["seed=4", "model.dropout=0.2", "model.init=normal", "model.init_std=0.05"], ["seed=3"]]
    cfgs = _cfgs(tmp_path, members)
    dm, population = build_population(cfgs)
    assert population.seeds == [3, 4, 3]
    for i, cfg in enumerate(cfgs):
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # as mlplab.engines.run.fit builds it
        net = build_net(cfg.model, build_datamodule(cfg.data))
        expected, got = net.state_dict(), population.nets.member_state_dict(i)
        assert list(got) == list(expected)  # the dropout member's keys are its own (layers.4 for layers.3)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (i, key)
    # A copy: training the population does not change what was handed out.
    before = population.nets.member_state_dict(0)
    with torch.no_grad():
        population.nets.parameters()[0].add_(1.0)
    assert not torch.equal(population.nets.member_state_dict(0)["layers.1.weight"], before["layers.1.weight"])


@pytest.mark.parametrize(
    "kind, members",
    [
        (
            torch.optim.SGD,
            [
                {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
                {"lr": 0.05},
                {"lr": 0.2, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01},
                {"lr": 0.1, "dampening": 0.5},  # dampening without momentum: ignored, as torch does
            ],
        ),
        (
            torch.optim.Adam,
            [
                {"lr": 1e-3},
                {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2},
                {"lr": 1e-2, "betas": (0.95, 0.9)},
            ],
        ),
    ],
)
def test_the_population_optimizer_is_torch_optim_on_each_member(kind, members):
    torch.manual_seed(0)
    m = len(members)
    weight, bias = torch.randn(m, 5, 4, requires_grad=True), torch.randn(m, 5, requires_grad=True)
    alone = [(weight[i].detach().clone().requires_grad_(), bias[i].detach().clone().requires_grad_()) for i in range(m)]
    references = [kind(list(params), **kw) for params, kw in zip(alone, members)]
    population = PopulationOptimizer.build([weight, bias], kind, members)
    for _ in range(6):
        grads = torch.randn(m, 5, 4), torch.randn(m, 5)
        weight.grad, bias.grad = grads[0].clone(), grads[1].clone()
        population.step()
        for i, (params, reference) in enumerate(zip(alone, references)):
            params[0].grad, params[1].grad = grads[0][i].clone(), grads[1][i].clone()
            reference.step()
    for i, (w, b) in enumerate(alone):
        scale = max(w.abs().max().item(), b.abs().max().item())
        gap = max((weight[i] - w).abs().max().item(), (bias[i] - b).abs().max().item())
        assert gap <= 1e-6 * scale, (i, gap, scale)
    # The members moved apart: each took its own update.
    assert not torch.allclose(weight[0], weight[1])


def test_the_population_optimizer_refuses_what_it_does_not_implement():
    params = [torch.zeros(2, 3, requires_grad=True)]
    with pytest.raises(ConfigError, match=r"optimizer.amsgrad=True is not supported by population training.*"):
        PopulationOptimizer.build(params, torch.optim.Adam, [{"amsgrad": True}, {}])
    with pytest.raises(ConfigError, match=r"optimizer._target_=torch.optim.*AdamW is not supported.*allowed: torch"):
        PopulationOptimizer.build(params, torch.optim.AdamW, [{}, {}])


@pytest.mark.parametrize(
    "common, members",
    [
        # SGD with momentum; nesterov, weight decay, label smoothing per member; cosine over 2 epochs.
        (
            [*COMMON, "trainer.max_epochs=2"],
            [
                ["seed=1", "optimizer.lr=0.05"],
                ["seed=2", "optimizer.lr=0.1", "optimizer.nesterov=true", "optimizer.weight_decay=0.001"],
                ["seed=1", "optimizer.lr=0.02", "loss.label_smoothing=0.1"],
            ],
        ),
        # Adam under a one-cycle schedule (stepped every batch, beta1 cycled), steps fused by 4.
        (
            [*COMMON, "optimizer=adam", "scheduler=onecycle", "steps_per_call=4", "model.hidden_sizes=[64]"],
            [["seed=5", "optimizer.lr=0.003"], ["seed=6", "optimizer.lr=0.001", "+optimizer.betas=[0.8,0.99]"]],
        ),
    ],
    ids=["sgd-cosine", "adam-onecycle"],
)
def test_without_dropout_each_member_ends_with_its_sequential_runs_weights(tmp_path, one_torch_thread, common, members):
    population, results = run_population(_cfgs(tmp_path / "population", members, common))
    assert [r.diverged for r in results] == [None] * len(members)
    for i, (cfg, result) in enumerate(zip(_cfgs(tmp_path / "sequential", members, common), results)):
        weights, metrics = _sequential_weights(cfg)
        assert _relative_gap(result.state_dict, weights) <= 1e-4, i
        last = result.history[-1]
        assert last["epoch"] == cfg.trainer.max_epochs - 1 and len(result.history) == cfg.trainer.max_epochs
        assert last["val/acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)  # the same predictions
        assert last["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-4)
        assert last["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-4)
    # The members learnt different things: equal weights would pass the checks above vacuously.
    assert _relative_gap(results[0].state_dict, results[1].state_dict) > 1e-2


def test_batch_norm_members_keep_their_own_running_statistics(tmp_path, one_torch_thread):
    """A net with BatchNorm runs under vmap (not the linear chain): each member's batch
    statistics, running averages and batch count are its sequential run's."""
    common = [*COMMON, "trainer.max_epochs=2", "model.batch_norm=true"]
    members = [["seed=1", "optimizer.lr=0.05"], ["seed=2", "optimizer.lr=0.02"]]
    population, results = run_population(_cfgs(tmp_path / "population", members, common))
    assert population.nets._chain is None
    for i, cfg in enumerate(_cfgs(tmp_path / "sequential", members, common)):
        expected, metrics = _sequential_weights(cfg)
        got = results[i].state_dict
        assert list(got) == list(expected) and any("running_mean" in k for k in got)
        counts = [k for k in expected if k.endswith("num_batches_tracked")]
        assert counts and all(torch.equal(got[k], expected[k]) for k in counts)
        floats = {k: v for k, v in expected.items() if v.is_floating_point()}
        assert _relative_gap({k: got[k] for k in floats}, floats) <= 1e-4, i
        assert results[i].history[-1]["val/acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)


def test_a_diverging_member_is_frozen_and_reported_while_the_others_train_on(tmp_path, one_torch_thread):
    good = [["seed=1", "optimizer.lr=0.05"], ["seed=2", "optimizer.lr=0.02"]]
    bad = ["seed=3", "optimizer.lr=1e6"]
    _, with_bad = run_population(_cfgs(tmp_path / "with", [good[0], bad, good[1]]))
    _, without = run_population(_cfgs(tmp_path / "without", good))
    diverged = with_bad[1].diverged
    assert diverged is not None and diverged.epoch == 0 and diverged.lr == 1e6
    assert with_bad[1].history == []
    assert [with_bad[0].diverged, with_bad[2].diverged] == [None, None]
    for got, expected in zip((with_bad[0], with_bad[2]), without):
        assert _relative_gap(got.state_dict, expected.state_dict) <= 1e-6
        assert [h["val/acc"] for h in got.history] == [h["val/acc"] for h in expected.history]
    # Frozen at the step where its loss first was not finite: the step the sequential run names.
    with pytest.raises(DivergenceError, match=rf"non-finite loss at step {diverged.step} \(epoch 0"):
        fit(_cfgs(tmp_path / "sequential", [bad])[0])
    # ... and kept there: the weights it reached are what it holds, not NaN from later updates.
    frozen = with_bad[1].state_dict
    assert all(not v.isnan().any() for v in frozen.values())


@pytest.mark.parametrize(
    "make, chain",
    [
        (lambda: MLP(64, 10, hidden_sizes=[32, 16]), True),
        (
            lambda: MLP(
                64, 2, hidden_sizes=[8], activation="tanh", bias=False, single_output=True, output_activation="sigmoid"
            ),
            True,
        ),
        (lambda: SimpleNet(64, 10), True),
        (lambda: SigmoidNet(64, 10), True),
        (lambda: MLP(64, 10, hidden_sizes=[32], batch_norm=True), False),
    ],
    ids=["relu-mlp", "tanh-no-bias-sigmoid-out", "simple-net", "sigmoid-net", "batch-norm"],
)
def test_stacked_nets_compute_each_members_own_outputs_and_gradients(make, chain):
    torch.manual_seed(0)
    nets = [make() for _ in range(3)]
    stacked = StackedNets(nets)
    assert (stacked._chain is not None) == chain  # batched matrix products, or vmap for other layers
    x = torch.randn(3, 5, 8, 8)
    out = stacked(x)
    out.square().sum().backward()
    for i, net in enumerate(nets):
        own = net.train()(x[i])
        own.square().sum().backward()
        assert torch.allclose(out[i], own, atol=1e-6), i
        for name, param in net.named_parameters():
            assert torch.allclose(stacked.params[name].grad[i], param.grad, atol=1e-5), (i, name)
    shared = torch.randn(4, 64)  # evaluation's input: one batch for every member
    with torch.no_grad():
        got = stacked.eval()(shared.unsqueeze(0).expand(3, *shared.shape))
    for i, net in enumerate(nets):
        assert torch.allclose(got[i], net.eval()(shared), atol=1e-6), i


def test_dropout_members_draw_their_own_masks_with_their_own_rates():
    torch.manual_seed(0)
    rates = [0.5, 0.5, 0.2, 0.0]
    nets = []
    for p in rates:
        layers = [nn.Linear(4, 4, bias=False)] + ([nn.Dropout(p)] if p else [])
        nets.append(nn.Sequential(*layers))
        nn.init.eye_(nets[-1][0].weight)
    stacked = StackedNets(nets)
    out = stacked(torch.ones(len(rates), 20_000, 4))
    for i, p in enumerate(rates):
        dropped = (out[i] == 0).float().mean().item()
        assert dropped == pytest.approx(p, abs=0.01), (i, dropped)
        kept = out[i][out[i] != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    assert not torch.equal(out[0] == 0, out[1] == 0)  # same rate, own masks
    assert torch.equal(stacked.eval()(torch.ones(len(rates), 3, 4)), torch.ones(len(rates), 3, 4))
    # Each member's state_dict keys are its own net's (the last has no dropout layer).
    assert list(stacked.member_state_dict(3)) == ["0.weight"]


def test_dropout_members_train_and_are_evaluated_without_dropout(tmp_path, one_torch_thread):
    members = [
        ["seed=7", "model.dropout=0.2", "optimizer.lr=0.05"],
        ["seed=7", "model.dropout=0.2", "optimizer.lr=0.05"],
        ["seed=7", "optimizer.lr=0.05"],
    ]
    dm, population = build_population(_cfgs(tmp_path / "population", members, [*COMMON, "trainer.max_epochs=2"]))
    from mlplab.population import train_population

    results = train_population(population, dm)
    # Same seed, same start, same batches: only their dropout masks differ, and they do.
    assert _relative_gap(results[0].state_dict, results[1].state_dict) > 1e-3
    for result in results:
        assert result.history[-1]["val/acc"] > 0.85
    # Evaluation has no dropout: the same numbers twice.
    first = evaluate(population.nets, population.loss, dm.data_val.tensors, dm.eval_batch_size)
    second = evaluate(population.nets, population.loss, dm.data_val.tensors, dm.eval_batch_size)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # The member without dropout is its own sequential run, dropout members beside it or not.
    weights, _ = _sequential_weights(_cfgs(tmp_path / "sequential", members[2:], [*COMMON, "trainer.max_epochs=2"])[0])
    assert _relative_gap(results[2].state_dict, weights) <= 1e-4


def test_jobs_that_cannot_share_a_population_are_refused_in_one_line(tmp_path):
    base = ["seed=1"]
    cases = [
        (["model.hidden_sizes=[32]"], r"^model.hidden_sizes=\[32\] in job 1 differs from job 0's \[256, 128\]"),
        (["optimizer=adam"], r"^optimizer._target_='torch.optim.Adam' in job 1 differs from job 0's 'torch.optim.SGD'"),
        (["trainer.max_epochs=2"], r"^trainer.max_epochs=2 in job 1 differs from job 0's 1"),
        (["data.batch_size=64"], r"^data.batch_size=64 in job 1 differs"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            check_members(_cfgs(tmp_path, [base, [*base, *extra]]))
        assert "\n" not in str(err.value) and "allowed: jobs that differ only in seed, optimizer.lr" in str(err.value)
    with pytest.raises(ConfigError, match=r"^trainer.gradient_clip_val=1.0 is not supported by population training"):
        check_members(_cfgs(tmp_path, [[*base, "+trainer.gradient_clip_val=1.0"]]))
    # What members may differ in passes.
    check_members(
        _cfgs(
            tmp_path,
            [
                base,
                ["seed=2", "optimizer.lr=0.3", "optimizer.momentum=0", "model.dropout=0.1", "loss.label_smoothing=0.2"],
            ],
        )
    )


@pytest.mark.slow
def test_dropout_population_accuracy_matches_sequential_runs_in_distribution(tmp_path, one_torch_thread):
    """8 seeds with dropout: the population's mean val/acc within 2 standard errors of the sequential runs'."""
    common = [*COMMON, "trainer.max_epochs=3", "model.dropout=0.3"]
    members = [[f"seed={s}"] for s in range(8)]
    _, results = run_population(_cfgs(tmp_path / "population", members, common))
    population_acc = torch.tensor([r.history[-1]["val/acc"] for r in results])
    sequential_acc = torch.tensor(
        [fit(cfg)["val/acc"] for cfg in _cfgs(tmp_path / "sequential", members, common)], dtype=torch.float32
    )
    se = math.sqrt(population_acc.var().item() / 8 + sequential_acc.var().item() / 8)
    gap = abs(population_acc.mean().item() - sequential_acc.mean().item())
    assert gap <= 2 * max(se, 1e-3), (population_acc, sequential_acc)

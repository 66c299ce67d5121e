"""Nets, the Classifier, and every model x dataset trained a few batches through train()."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import QUICK, compose_cfg, linears, write_tiny_mnist
from mlplab.engines import train
from mlplab.errors import ConfigError
from mlplab.models import MLP, Classifier, SigmoidNet, SimpleNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _is_affine(net: nn.Module, input_dim: int) -> bool:
    torch.manual_seed(0)
    x1, x2 = torch.randn(5, input_dim), torch.randn(5, input_dim)
    a = 0.3
    with torch.no_grad():
        lhs = net(a * x1 + (1 - a) * x2)
        rhs = a * net(x1) + (1 - a) * net(x2)
    return torch.allclose(lhs, rhs, atol=1e-5)


# -- nets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28)])
@pytest.mark.parametrize("make", [lambda d: SimpleNet(d, 10), lambda d: SigmoidNet(d, 10), lambda d: MLP(d, 10)])
def test_output_shapes(input_shape, make):
    input_dim = int(torch.Size(input_shape).numel())
    assert input_dim in (64, 784)
    net = make(input_dim)
    out = net(torch.rand(7, *input_shape))
    assert out.shape == (7, 10)
    assert linears(net)[0].in_features == input_dim


def test_simple_net_is_two_linear_layers_and_affine():
    net = SimpleNet(64, 10, hidden_size=20)
    lins = linears(net)
    assert [(lin.in_features, lin.out_features) for lin in lins] == [(64, 20), (20, 10)]
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh)) for m in net.modules())
    assert _is_affine(net, 64)
    # the check above can fail: nets with an activation are not affine
    assert not _is_affine(SigmoidNet(64, 10, hidden_size=20), 64)
    assert not _is_affine(MLP(64, 10, hidden_sizes=[20]), 64)


def test_sigmoid_net_outputs_in_unit_interval():
    net = SigmoidNet(784, 10, hidden_size=30)
    assert [(lin.in_features, lin.out_features) for lin in linears(net)] == [(784, 30), (30, 10)]
    torch.manual_seed(0)
    out = net(torch.randn(64, 1, 28, 28) * 10)
    assert out.min() > 0 and out.max() < 1
    assert isinstance(list(net.modules())[-1], nn.Sigmoid)


@pytest.mark.parametrize(
    ("hidden_sizes", "activation", "act_cls"),
    [
        ([256, 128], "relu", nn.ReLU),
        ([64, 32, 16], "tanh", nn.Tanh),
        ([5], "sigmoid", nn.Sigmoid),
        ([8, 8], "identity", nn.Identity),
    ],
)
def test_mlp_depth_width_activation(hidden_sizes, activation, act_cls):
    net = MLP(64, 10, hidden_sizes=hidden_sizes, activation=activation)
    dims = [64, *hidden_sizes, 10]
    assert [(lin.in_features, lin.out_features) for lin in linears(net)] == list(zip(dims[:-1], dims[1:]))
    acts = [m for m in net.modules() if isinstance(m, act_cls)]
    assert len(acts) == len(hidden_sizes)
    # no activation after the output layer: logits
    assert isinstance(net.layers[-1], nn.Linear)


def test_mlp_from_hydra_config_list():
    # Hydra passes hidden_sizes as a ListConfig
    net = instantiate({"_target_": "mlplab.models.MLP", "hidden_sizes": [12, 6]}, input_dim=64, num_classes=10)
    assert [lin.out_features for lin in linears(net)] == [12, 6, 10]


@pytest.mark.parametrize(
    ("hidden_sizes", "key"),
    [
        ([], "model.hidden_sizes="),
        ([0], "model.hidden_sizes[0]=0"),
        ([-3], "model.hidden_sizes[0]=-3"),
        ([4, 0], "model.hidden_sizes[1]=0"),
    ],
)
def test_mlp_bad_hidden_sizes(hidden_sizes, key):
    with pytest.raises(ConfigError) as info:
        MLP(64, 10, hidden_sizes=hidden_sizes)
    assert key in str(info.value) and "allowed" in str(info.value)


def test_mlp_dropout_after_each_hidden_layer_only_in_training():
    net = MLP(64, 10, hidden_sizes=[32, 16], dropout=0.5)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    x = torch.rand(8, 1, 8, 8)
    net.eval()
    assert torch.equal(net(x), net(x))  # no dropout at eval
    net.train()
    torch.manual_seed(0)
    assert not torch.equal(net(x), net(x))
    assert not any(isinstance(m, nn.Dropout) for m in MLP(64, 10, dropout=0.0).modules())


def test_mlp_batch_norm_after_each_hidden_linear_before_its_activation():
    net = MLP(64, 10, hidden_sizes=[32, 16], batch_norm=True, dropout=0.1)
    kinds = [type(m).__name__ for m in net.layers]
    assert kinds == [
        "Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"
    ]  # fmt: skip
    assert [m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm1d)] == [32, 16]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in MLP(64, 10).modules())  # off by default
    # Batch statistics in training (and the running averages updated), the running averages in eval.
    x = torch.rand(8, 1, 8, 8) * 5
    bn = net.layers[2]
    net.train()
    net(x)
    assert bn.num_batches_tracked == 1 and not torch.equal(bn.running_mean, torch.zeros(32))
    net.eval()
    h = net.layers[1](net.layers[0](x))
    expected = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(net.layers[2](h), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="model.batch_norm='yes' is invalid; allowed: true, false"):
        MLP(64, 10, batch_norm="yes")


def test_batch_norm_run_evaluates_to_its_test_accuracy_and_trains_with_ignite(tmp_path):
    """A batch_norm net's checkpoint (weights and running statistics) tests in eval.py to the
    run's own test/acc; the ignite engine trains the same net."""
    from mlplab.engines import evaluate

    acc = train(
        compose_cfg([*QUICK, "logger=none", "model.batch_norm=true", "optimized_metric=test/acc"], tmp_path / "run")
    )
    assert acc > 0.8  # one digits epoch
    best = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert "net.layers.2.running_mean" in state and int(state["net.layers.2.num_batches_tracked"]) == 38
    eval_cfg = compose_cfg([f"ckpt_path={best}", "trainer=cpu", "logger=none"], tmp_path / "eval", config_name="eval")
    assert evaluate(eval_cfg)["test/acc"] == pytest.approx(acc, abs=1e-6)

    ignite = train(
        compose_cfg(
            [*QUICK, "engine=ignite", "model.batch_norm=true", "optimized_metric=test/acc"], tmp_path / "ignite"
        )
    )
    assert ignite == pytest.approx(acc, abs=0.03)  # the same training in another loop


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_mlp_bad_dropout(p):
    with pytest.raises(ConfigError, match=f"model.dropout={p}"):
        MLP(64, 10, dropout=p)


def test_unknown_activation():
    with pytest.raises(ConfigError) as info:
        MLP(64, 10, activation="swish")
    msg = str(info.value)
    assert "model.activation='swish'" in msg and "relu" in msg and "sigmoid" in msg


@pytest.mark.parametrize("cls", [SimpleNet, SigmoidNet])
def test_bad_hidden_size(cls):
    with pytest.raises(ConfigError, match="model.hidden_size=0"):
        cls(64, 10, hidden_size=0)


# -- Classifier ----------------------------------------------------------------------------------


def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model = Classifier(
        net=MLP(64, 10, hidden_sizes=[32]),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    before = model.criterion(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.criterion(model(x), y)
    assert after.item() < before.item()


def test_classifier_with_scheduler_and_without_optimizer():
    model = Classifier(
        net=SimpleNet(64, 10),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1),
    )
    conf = model.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.SGD)
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    with pytest.raises(RuntimeError, match="without an optimizer"):
        Classifier(net=SimpleNet(64, 10), num_classes=10).configure_optimizers()


def test_digits_relu_mlp_learns(tmp_path):
    cfg = compose_cfg(
        QUICK + ["trainer.max_epochs=5", "optimized_metric=train/acc", "logger=none", "test=false"], tmp_path
    )
    train_acc = train(cfg)
    assert isinstance(train_acc, float) and train_acc > 0.9


# -- every model x dataset through train() -------------------------------------------------------

FEW_BATCHES = [
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize("data", ["digits", "mnist", "fashion_mnist"])
@pytest.mark.parametrize("model", ["simple_net", "sigmoid_net", "relu_mlp"])
def test_every_model_trains_on_every_dataset(tmp_path, model, data):
    overrides = QUICK + FEW_BATCHES + [f"model={model}", f"data={data}", "logger=csv"]
    if data != "digits":
        folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[data]
        write_tiny_mnist(tmp_path / "datasets", folder=folder)
        overrides += [
            f"data.data_dir={tmp_path / 'datasets'}",
            "data.val_size=10",
            "data.download=false",
            "data.batch_size=16",
        ]
    out = tmp_path / "run"
    cfg = compose_cfg(overrides, out)
    metric = train(cfg)
    assert isinstance(metric, float) and 0.0 <= metric <= 1.0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["epoch_000.ckpt", "last.ckpt"]
    # the checkpoint holds the run's config (eval rebuilds data and net from it)
    stored = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"][
        "config"
    ]
    assert stored["model"]["_target_"] == cfg.model._target_ and stored["data"]["_target_"] == cfg.data._target_
    # the CSV logger wrote validation and test metrics under the output dir
    metrics_csv = (out / "csv" / "metrics.csv").read_text()
    assert "val/acc" in metrics_csv and "test/acc" in metrics_csv


def test_epoch_accuracy_equals_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy

    from mlplab.models.metrics import EpochStats

    torch.manual_seed(0)
    ours, reference = EpochStats(), MulticlassAccuracy(10, average="micro")
    for n in (64, 64, 17):  # uneven last batch
        logits, target = torch.randn(n, 10), torch.randint(0, 10, (n,))
        ours.update(torch.tensor(0.5), logits, target)
        reference.update(logits, target)
    assert ours.compute()[1].item() == pytest.approx(reference.compute().item(), abs=1e-7)
    assert ours.total.item() == 145
    ours.reset()
    assert ours.correct.item() == 0 and ours.total.item() == 0


def test_epoch_loss_is_the_per_sample_mean():
    from torchmetrics import MeanMetric

    from mlplab.models.metrics import EpochStats

    losses = torch.rand(145, dtype=torch.float64)
    logits, target = torch.randn(145, 10), torch.randint(0, 10, (145,))
    ours, reference = EpochStats(), MeanMetric()
    for start, stop in ((0, 64), (64, 128), (128, 145)):  # uneven last batch
        batch = losses[start:stop].float()
        ours.update(batch.mean(), logits[start:stop], target[start:stop])
        reference.update(batch.mean(), weight=stop - start)
    assert ours.compute()[0].item() == pytest.approx(losses.mean().item(), rel=1e-6)
    assert ours.compute()[0].item() == pytest.approx(reference.compute().item(), rel=1e-6)
    # any batching gives the same values (so 1 process and 2 DDP ranks agree)
    other = EpochStats()
    for start, stop in ((0, 100), (100, 145)):
        other.update(losses[start:stop].float().mean(), logits[start:stop], target[start:stop])
    assert other.compute()[0].item() == pytest.approx(ours.compute()[0].item(), rel=1e-6)
    assert other.compute()[1].item() == ours.compute()[1].item()
    # a non-finite loss in any step stays visible in the sum (the divergence guard reads it)
    other.update(torch.tensor(float("nan")), logits[:3], target[:3])
    assert not other.loss_sum.isfinite()
    other.reset()
    assert other.total.item() == 0 and other.loss_sum.item() == 0


def test_one_update_for_a_fused_block_equals_one_update_per_minibatch():
    """Classifier's fused steps update once per block: the same sums, bit for bit."""
    from mlplab.models.metrics import EpochStats

    torch.manual_seed(0)
    sizes = [64, 64, 64, 17]
    losses = [torch.rand(()) for _ in sizes]
    logits, target = torch.randn(sum(sizes), 10), torch.randint(0, 10, (sum(sizes),))
    per_step, block = EpochStats(), EpochStats()
    for loss, x, y in zip(losses, logits.split(64), target.split(64)):
        per_step.update(loss, x, y)
    block.update(losses, logits, target, sizes)
    for state in ("loss_sum", "correct", "total"):
        assert torch.equal(getattr(block, state), getattr(per_step, state)), state
    assert block.total.item() == 209


def test_squared_error_smooths_its_targets_alone_and_in_a_population():
    """loss=mse with label_smoothing e: targets (1 - e) * onehot + e / K (one unit: K = 2),
    each population member with its own e."""
    from mlplab.models.losses import SquaredError
    from mlplab.population.stacked import PopulationLoss

    torch.manual_seed(0)
    out, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    target = 0.7 * nn.functional.one_hot(y, 3).float() + 0.1
    assert SquaredError(0.3)(out, y).item() == pytest.approx(0.5 * (out - target).pow(2).sum(1).mean().item())
    one, b = torch.rand(4, 1), torch.tensor([0, 1, 1, 0])
    expected = 0.5 * (one - (0.8 * b.float().unsqueeze(1) + 0.1)).pow(2).sum(1).mean()
    assert SquaredError(0.2)(one, b).item() == pytest.approx(expected.item())
    assert SquaredError()(out, y).item() == pytest.approx(SquaredError(0.0)(out, y).item())
    losses = [SquaredError(0.3), SquaredError(0.0)]
    stacked = PopulationLoss(losses)(torch.stack([out, out + 1]), torch.stack([y, y]))
    assert stacked.tolist() == pytest.approx([losses[0](out, y).item(), losses[1](out + 1, y).item()])
    with pytest.raises(ConfigError, match=r"loss.label_smoothing=1.0 is invalid; allowed: a number in \[0, 1\)"):
        SquaredError(1.0)

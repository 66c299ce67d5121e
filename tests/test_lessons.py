"""Issue 4: the lessons' data (xor, moons), model options, losses, augmentation and presets."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.datasets import make_moons
from torch import nn

from conftest import CONF, QUICK, compose_cfg, linears
from mlplab.config import validate_train_config
from mlplab.data import MoonsDataModule, XORDataModule
from mlplab.engines import train
from mlplab.engines.build import build_datamodule, build_loss, build_net
from mlplab.errors import ConfigError
from mlplab.models import MLP, CrossEntropy, SquaredError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- data: xor, moons ----------------------------------------------------------------------------


def test_xor_is_the_four_points_in_every_split(tmp_path):
    dm = build_datamodule(compose_cfg(["data=xor"], tmp_path).data)
    assert isinstance(dm, XORDataModule)
    assert (dm.input_dim, dm.num_classes, dm.class_names, dm.input_shape) == (2, 2, ("0", "1"), (2,))
    dm.setup()
    expected_x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    for ds in (dm.data_train, dm.data_val, dm.data_test):
        x, y = ds.tensors
        assert torch.equal(x, expected_x) and y.tolist() == [0, 1, 1, 0]
    assert len(dm.train_dataloader()) == 1  # batch 4: full batch


def test_moons_defaults_split_and_seed(tmp_path):
    cfg = compose_cfg(["data=moons"], tmp_path)
    assert (cfg.data.n_samples, cfg.data.noise, cfg.data.random_state) == (200, 0.15, 123)
    dm = build_datamodule(cfg.data)
    assert isinstance(dm, MoonsDataModule)
    assert (dm.input_dim, dm.num_classes, dm.input_shape) == (2, 2, (2,))
    dm.setup()
    splits = [ds.tensors for ds in (dm.data_train, dm.data_val, dm.data_test)]
    assert [len(y) for _, y in splits] == [120, 30, 50]  # test 25 % of 200, val 20 % of the rest
    # together they are exactly sklearn's make_moons(200, noise=0.15, random_state=123)
    x_ref, y_ref = make_moons(n_samples=200, noise=0.15, random_state=123)
    x_all = torch.cat([x for x, _ in splits]).double().numpy()
    y_all = torch.cat([y for _, y in splits]).numpy()
    order_ours, order_ref = np.lexsort(x_all.T), np.lexsort(x_ref.T)
    np.testing.assert_allclose(x_all[order_ours], x_ref[order_ref], atol=1e-6)
    np.testing.assert_array_equal(y_all[order_ours], y_ref[order_ref])
    # seeded: the same split again, another split_seed gives another test set
    again = MoonsDataModule()
    again.setup()
    assert torch.equal(again.data_test.tensors[0], dm.data_test.tensors[0])
    other = MoonsDataModule(split_seed=7)
    other.setup()
    assert not torch.equal(other.data_test.tensors[0], dm.data_test.tensors[0])
    # n, noise, seed are configurable
    small = MoonsDataModule(n_samples=40, noise=0.0, random_state=1, test_size=10, val_size=5)
    small.setup()
    assert [len(ds) for ds in (small.data_train, small.data_val, small.data_test)] == [25, 5, 10]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise": -0.1}, "data.noise=-0.1"),
        ({"n_samples": 0}, "data.n_samples=0"),
        ({"test_size": 199}, "data.test_size=199"),
    ],
)
def test_moons_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MoonsDataModule(**kwargs)


# -- model options --------------------------------------------------------------------------------


def test_mlp_output_activation_single_output_and_bias():
    torch.manual_seed(0)
    net = MLP(2, 2, hidden_sizes=[2], activation="sigmoid", output_activation="sigmoid", single_output=True, bias=False)
    assert [(m.in_features, m.out_features) for m in linears(net)] == [(2, 2), (2, 1)]
    assert all(m.bias is None for m in linears(net))
    assert isinstance(net.layers[-1], nn.Sigmoid)
    out = net(torch.randn(16, 2) * 10)
    assert out.shape == (16, 1) and out.min() > 0 and out.max() < 1
    assert isinstance(MLP(64, 10).layers[-1], nn.Linear)  # default: logits


@pytest.mark.parametrize(("activation", "factor"), [("sigmoid", 2.0), ("relu", 6.0), ("tanh", 6.0)])
def test_glorot_uniform_is_sklearns_bound(activation, factor):
    torch.manual_seed(0)
    net = MLP(20, 10, hidden_sizes=[500, 100], activation=activation, init="glorot_uniform")
    for lin in linears(net):
        bound = math.sqrt(factor / (lin.in_features + lin.out_features))
        for p in (lin.weight, lin.bias):
            assert p.abs().max() <= bound
            assert p.abs().max() > 0.9 * bound or p.numel() < 50  # fills the range
        # uniform on [-b, b]: std b / sqrt(3)
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_normal_init_and_default_init():
    torch.manual_seed(0)
    net = MLP(64, 10, hidden_sizes=[200, 200], init="normal", init_std=0.3)
    for lin in linears(net):
        assert lin.weight.std().item() == pytest.approx(0.3, rel=0.05)
        assert lin.weight.mean().abs().item() < 0.02
        assert torch.all(lin.bias == 0)
    # default: PyTorch's own init, weights within 1/sqrt(fan_in)
    torch.manual_seed(0)
    default = MLP(64, 10, hidden_sizes=[200])
    assert linears(default)[0].weight.abs().max() <= 1 / math.sqrt(64)
    assert linears(default)[0].bias.abs().max() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_activation": "softmax"}, "model.output_activation='softmax'"),
        ({"init": "xavier"}, "model.init='xavier'"),
        ({"init_std": 0.0}, "model.init_std=0.0"),
        ({"single_output": True}, "model.single_output=true needs 2 classes"),
    ],
)
def test_mlp_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        MLP(64, 10, **kwargs)
    assert "allowed" in str(info.value)


def test_losses():
    torch.manual_seed(0)
    out, y = torch.rand(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    # squared error: mean over samples of 1/2 sum_k (o_k - onehot_k)^2
    expected = 0.5 * ((out - torch.eye(3)[y]) ** 2).sum() / 6
    assert SquaredError()(out, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(SquaredError().scores(out), out)
    assert CrossEntropy()(out, y).item() == pytest.approx(nn.functional.cross_entropy(out, y).item())
    # one output unit: squared error against the 0/1 label, class = output > 0.5
    o1, y1 = torch.tensor([[0.2], [0.7], [0.6]]), torch.tensor([0, 1, 0])
    assert SquaredError()(o1, y1).item() == pytest.approx(0.5 * (0.04 + 0.09 + 0.36) / 3)
    assert SquaredError().scores(o1).argmax(1).tolist() == [0, 1, 1]
    # one logit: cross-entropy = binary cross-entropy with logits, class = logit > 0
    z = torch.tensor([[-1.0], [2.0], [0.5]])
    bce = nn.functional.binary_cross_entropy_with_logits(z[:, 0], y1.float())
    assert CrossEntropy()(z, y1).item() == pytest.approx(bce.item(), rel=1e-6)
    assert CrossEntropy().scores(z).argmax(1).tolist() == [0, 1, 1]


def test_loss_and_optimizer_groups(tmp_path):
    cfg = compose_cfg(["loss=mse", "optimizer=adam", "optimizer.lr=0.01"], tmp_path)
    assert isinstance(build_loss(cfg), SquaredError)
    assert isinstance(build_loss(compose_cfg([], tmp_path)), CrossEntropy)  # the default
    validate_train_config(cfg)
    net = build_net(cfg.model, build_datamodule(cfg.data))
    opt = instantiate(cfg.optimizer)(params=net.parameters())
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.01


def test_mse_run_reports_the_squared_error(tmp_path):
    """train() with loss=mse (sigmoid outputs) learns digits and reports the squared error."""
    cfg = compose_cfg(
        QUICK
        + [
            "loss=mse",
            "model.output_activation=sigmoid",
            "model.init=glorot_uniform",
            "optimizer=adam",
            "optimizer.lr=0.001",
            "trainer.max_epochs=3",
            "logger=none",
            "optimized_metric=test/loss",
        ],
        tmp_path,
    )
    test_loss = train(cfg)
    # untrained sigmoid outputs (~0.5 each) against one-hot targets cost ~1/2 * 10 * 0.25 = 1.25 a sample,
    # outputs stuck at 0 cost 0.5; a net that learnt digits is far below both
    assert 0.0 < test_loss < 0.2


# -- augmentation -----------------------------------------------------------------------------------


class _Grab(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append((batch[0].clone(), batch[1].clone()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch[0].clone())


def _fit_grab(tmp_path, overrides):
    from mlplab.models import Classifier

    cfg = compose_cfg(QUICK + overrides, tmp_path)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg.data)
    model = Classifier(build_net(cfg.model, dm), dm.num_classes, instantiate(cfg.optimizer))
    grab = _Grab()
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[grab],
        enable_checkpointing=False,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    return dm, grab


def test_affine_augmentation_changes_training_batches_only(tmp_path):
    dm, grab = _fit_grab(tmp_path, ["augment=affine"])
    assert type(dm.augment).__name__ == "RandomAffine"
    x_train, y_train = dm.data_train.tensors
    x0, y0 = grab.train[0]
    # the batch's labels are rows of the training set; reconstruct its un-augmented images
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(torch.initial_seed()))
    originals = x_train[order[: len(y0)]]
    assert torch.equal(y_train[order[: len(y0)]], y0)
    assert x0.shape == originals.shape
    changed = (x0 != originals).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # (almost) every image moved
    # per-image parameters: the same image drawn twice is transformed differently, and
    # nearest-neighbour resampling only produces pixel values of the original or 0 (fill)
    for img, orig in zip(x0[:8], originals[:8]):
        allowed = set(orig.unique().tolist()) | {0.0}
        assert set(img.unique().tolist()) <= allowed
    # validation batches are the stored validation images, untouched
    assert torch.equal(grab.val[0], dm.data_val.tensors[0][: len(grab.val[0])])
    # seeded: a second run draws the same augmented batches
    _, again = _fit_grab(tmp_path / "again", ["augment=affine"])
    assert torch.equal(again.train[0][0], x0)
    # off by default: training batches are the stored images
    dm_off, off = _fit_grab(tmp_path / "off", [])
    assert dm_off.augment is None
    assert torch.equal(off.train[0][0], x_train[order[: len(y0)]])


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` [C, H, W] moved by (dy, dx) pixels, zeros where nothing moved in."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_shift_augmentation_moves_each_image_by_whole_pixels_up_to_two():
    """augment=shift (experiment=mnist_fast's): every 28x28 image is its original moved by a
    whole number of pixels, at most 2 each way, drawn per image; nothing rotates or scales."""
    node = OmegaConf.load(CONF / "augment" / "shift.yaml")
    aug = instantiate(node.augment)
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = aug(x)
    moves = []
    for img, orig in zip(y, x):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4) if torch.equal(img, _shifted(orig, dy, dx))]
        assert len(found) == 1, "not a whole-pixel shift of its original"
        moves.append(found[0])
    assert max(max(abs(dy), abs(dx)) for dy, dx in moves) == 2
    assert len(set(moves)) >= 15  # drawn per image: most of the 25 moves occur among 64 images


def test_augment_on_non_image_data_is_a_config_error(tmp_path):
    cfg = compose_cfg(["data=moons", "augment=affine"], tmp_path)
    with pytest.raises(ConfigError, match="data.augment is set but MoonsDataModule is not image data"):
        build_datamodule(cfg.data)


# -- experiment presets -------------------------------------------------------------------------------

QUIET = ["trainer=cpu", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", "logger=none"]
LESSON_PRESETS = {
    # preset: (data target, linear layer sizes, sweep params or None)
    "xor": ("XORDataModule", [(2, 2), (2, 1)], None),
    "moons_activations": (
        "MoonsDataModule",
        [(2, 100), (100, 100), (100, 2)],
        {"model.activation": "identity,sigmoid,tanh,relu"},
    ),
    "vanishing_gradient": (
        "MoonsDataModule",
        [(2, 5)] + [(5, 5)] * 49 + [(5, 2)],
        {"model.activation": "sigmoid,tanh,relu"},
    ),
    "digits_sigmoid": ("DigitsDataModule", [(64, 32), (32, 16), (16, 10)], None),
    "digits_relu": ("DigitsDataModule", [(64, 32), (32, 16), (16, 10)], None),
    "digits_numpy": ("DigitsDataModule", None, None),
    "mnist_tp": ("MNISTDataModule", [(784, 32), (32, 10)], None),
    "batch_size_sweep": ("MNISTDataModule", [(784, 32), (32, 10)], {"data.batch_size": "16,128,1024,8192"}),
    "lesson_d_models": (
        "FashionMNISTDataModule",
        [(784, 120), (120, 10)],
        {"model": "simple_net,sigmoid_net,relu_net"},
    ),
    "dropout": ("DigitsDataModule", [(64, 512), (512, 512), (512, 10)], {"model.dropout": "0.0,0.5"}),
}


@pytest.mark.parametrize("preset", sorted(LESSON_PRESETS))
def test_lesson_presets_compose_and_build(tmp_path, preset):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF
    from mlplab.numpy_net import NumpyMLP

    data_cls, sizes, sweep = LESSON_PRESETS[preset]
    cfg = compose_cfg([f"experiment={preset}"], tmp_path)
    validate_train_config(cfg)
    dm = build_datamodule(cfg.data)
    assert type(dm).__name__ == data_cls
    net = build_net(cfg.model, dm)
    if isinstance(net, NumpyMLP):
        assert net.sizes == [64, 32, 16, 10] and cfg.data.batch_size == 1 and cfg.loss._target_.endswith("SquaredError")
    else:
        assert [(m.in_features, m.out_features) for m in linears(net)] == sizes
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    params = hydra_cfg.hydra.sweeper.params
    assert (dict(params) if params else None) == sweep


def test_xor_preset_learns_xor_and_eval_reproduces_it(tmp_path):
    """Lesson A: the 2-2-1 sigmoid net with squared error classifies all four points; eval.py
    rebuilds net *and loss* from the checkpoint (same test/loss, a squared error)."""
    from mlplab.engines import evaluate, fit

    cfg = compose_cfg([*QUIET, "experiment=xor"], tmp_path / "run")
    assert cfg.model.single_output and cfg.model.output_activation == "sigmoid"
    metrics = fit(cfg)
    assert metrics["test/acc"] == 1.0 and metrics["epochs"] == 200
    assert 0.0 < metrics["test/loss"] < 0.02  # mean 1/2 (o - d)^2 with every o on the right side of 0.5
    ckpt = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    ev = evaluate(
        compose_cfg(["trainer=cpu", "logger=none", f"ckpt_path={ckpt}"], tmp_path / "eval", config_name="eval")
    )
    assert ev["test/acc"] == 1.0 and ev["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)


def test_numpy_mlp_refuses_settings_it_would_ignore(tmp_path):
    cfg = compose_cfg([*QUIET, "model=numpy_mlp"], tmp_path)
    with pytest.raises(
        ConfigError, match="model=numpy_mlp trains with squared error and plain gradient descent"
    ) as info:
        train(cfg)
    assert "allowed: loss=mse loss.label_smoothing=0 scheduler=none" in str(info.value)
    assert "recipe=none drops a dataset's recipe" in str(info.value)
    # Everything else right, but the digits recipe's label smoothing: refused, not ignored.
    plain = ["loss=mse", "scheduler=none", "optimizer.momentum=0"]
    with pytest.raises(ConfigError, match="model=numpy_mlp trains with squared error"):
        train(compose_cfg([*QUIET, "model=numpy_mlp", *plain], tmp_path))
    with pytest.raises(ConfigError, match="model.activation='relu' is invalid for model=numpy_mlp"):
        build_net(compose_cfg(["model=numpy_mlp", "+model.activation=relu"], tmp_path).model, XORDataModule())


def test_digits_numpy_preset_passes_the_lessons_target(tmp_path):
    cfg = compose_cfg([*QUIET, "experiment=digits_numpy", "optimized_metric=test/acc"], tmp_path)
    assert train(cfg) > 0.90
    assert (tmp_path / "numpy_net_best.npz").is_file()


@pytest.mark.parametrize(("activation", "low", "high"), [("identity", 0.6, 0.85), ("relu", 0.9, 1.0)])
def test_moons_activations_preset(tmp_path, activation, low, high):
    """Lesson B.3: a linear net cannot separate the moons, ReLU can (two of the four sweep jobs)."""
    cfg = compose_cfg(
        [*QUIET, "experiment=moons_activations", f"model.activation={activation}", "optimized_metric=test/acc"],
        tmp_path,
    )
    assert low <= train(cfg) <= high


def test_vanishing_gradient_preset(tmp_path):
    """Lesson B.1 on the preset's untrained 50-layer chain: per-layer weight-gradient norms."""
    norms = {}
    for activation in ("sigmoid", "tanh", "relu"):
        cfg = compose_cfg(["experiment=vanishing_gradient", f"model.activation={activation}"], tmp_path)
        L.seed_everything(cfg.seed, verbose=False)
        dm = build_datamodule(cfg.data)
        dm.setup()
        net = build_net(cfg.model, dm)
        x, y = dm.data_train.tensors
        build_loss(cfg)(net(x), y).backward()
        norms[activation] = [m.weight.grad.norm().item() for m in linears(net)]
    sigmoid, tanh, relu = norms["sigmoid"], norms["tanh"], norms["relu"]
    assert len(sigmoid) == 51
    assert sigmoid[-1] > 1e-3 and sigmoid[0] < 1e-12 * sigmoid[-1]  # vanishes with depth
    assert all(a <= b * 10 for a, b in zip(sigmoid[:-1], sigmoid[1:]))  # roughly monotone
    assert tanh[0] > 1e-6 * tanh[-1]  # far less vanishing
    assert max(relu) == 0.0  # width 5, depth 50: dead at initialisation


# -- slow: presets on real MNIST / Fashion-MNIST and the long digits recipes ---------------------------


def _real(real_data_dir) -> list[str]:
    return [f"data.data_dir={real_data_dir}", "data.download=false"]


@pytest.mark.slow
def test_mnist_tp_preset(tmp_path, real_data_dir):
    """Lesson C in torch: 32 sigmoid units, squared error, batch 512, 10 epochs."""
    cfg = compose_cfg([*QUIET, "experiment=mnist_tp", *_real(real_data_dir)], tmp_path)
    from mlplab.engines import fit

    metrics = fit(cfg)
    assert metrics["test/acc"] >= 0.92 and metrics["epochs"] == 10


@pytest.mark.slow
def test_lesson_d_models_preset(tmp_path, real_data_dir):
    """Lesson D's three nets at its small lr: SimpleNet and ReLU learn, SigmoidNet stays near chance."""
    from mlplab.engines import fit

    acc = {}
    for model in ("simple_net", "sigmoid_net", "relu_net"):
        cfg = compose_cfg(
            [*QUIET, "experiment=lesson_d_models", f"model={model}", *_real(real_data_dir)], tmp_path / model
        )
        acc[model] = fit(cfg)["test/acc"]
    assert acc["simple_net"] >= 0.65 and acc["relu_net"] >= 0.6
    assert acc["sigmoid_net"] < 0.3


@pytest.mark.slow
def test_dropout_preset_shows_overfitting(tmp_path):
    from mlplab.engines import fit

    runs = {
        p: fit(compose_cfg([*QUIET, "experiment=dropout", f"model.dropout={p}"], tmp_path / str(p))) for p in (0.0, 0.5)
    }
    plain, dropout = runs[0.0], runs[0.5]
    assert plain["train/acc"] == 1.0 and plain["train/loss"] < 0.01  # the 200 training digits are memorised
    assert plain["val/acc"] < 0.97  # ... the validation digits are not
    assert dropout["val/loss"] < plain["val/loss"]


@pytest.mark.slow
def test_digits_keras_presets(tmp_path):
    """Lesson A.4: at the Keras settings (SGD 0.01, 300 epochs) ReLU beats sigmoid, with the
    presets' seed (42). Over seeds 1-5 the ranking holds but ReLU's mean is 0.926 (docs/lessons.md)."""
    acc = {
        p: train(compose_cfg([*QUIET, f"experiment={p}", "optimized_metric=test/acc"], tmp_path / p))
        for p in ("digits_relu", "digits_sigmoid")
    }
    assert acc["digits_relu"] >= 0.93
    assert acc["digits_sigmoid"] < acc["digits_relu"]


def test_ignite_engine_uses_the_configured_loss_and_single_output(tmp_path):
    """engine=ignite trains the xor preset's one-output net with squared error."""
    from mlplab.engines import fit

    metrics = fit(compose_cfg([*QUIET, "experiment=xor", "engine=ignite"], tmp_path))
    assert metrics["test/acc"] == 1.0 and 0.0 < metrics["test/loss"] < 0.1

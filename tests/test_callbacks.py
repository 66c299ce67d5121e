"""Diagnostics callbacks: what each one writes to TensorBoard (or the log), checked with numbers.

The runs are tiny (digits or a 2-D toy set, 1-3 epochs) and go through a plain Lightning
Trainer, so the tests hold the callback objects and can compare what they logged with
values computed here independently (sklearn's per-class report, torch norms).
"""

from __future__ import annotations

import csv
import io
import logging
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli
from mlplab.callbacks import (
    DecisionBoundary,
    GradientNorms,
    MisclassifiedImages,
    SampleInputs,
    TestReport,
    WeightHistograms,
)
from mlplab.callbacks.decision_boundary import predict_grid
from mlplab.callbacks.gradients import gradient_norms, layer_weights
from mlplab.data import DigitsDataModule
from mlplab.data.tensor import TensorDataModule
from mlplab.models import MLP, Classifier


class Halves2D(TensorDataModule):
    """Tiny 2-D data: class "right" iff x > 0 (a boundary the net must find)."""

    input_shape = (2,)
    class_names = ("left", "right")

    def load(self):
        g = torch.Generator().manual_seed(0)
        x, x_test = torch.randn(300, 2, generator=g), torch.randn(100, 2, generator=g)
        return x, (x[:, 0] > 0).long(), x_test, (x_test[:, 0] > 0).long()


def _fit(
    dm, net, callbacks, logger, epochs: int, lr: float = 0.1, log_every_n_steps: int = 50
) -> tuple[L.Trainer, Classifier]:
    L.seed_everything(0, verbose=False)
    model = Classifier(net, dm.num_classes, optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return trainer, model


def _events(tb_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def _image(ea: EventAccumulator, tag: str, i: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ea.Images(tag)[i].encoded_image_string)))


def test_gradient_norms_are_the_norms_of_the_weight_matrices_in_order():
    net = MLP(64, 10, hidden_sizes=[16, 8], activation="tanh")
    net(torch.randn(5, 64)).pow(2).sum().backward()
    names = [n for n, _ in layer_weights(net)]
    assert names == ["layers.1.weight", "layers.3.weight", "layers.5.weight"]  # biases left out
    expected = [net.layers[i].weight.grad.norm().item() for i in (1, 3, 5)]
    assert gradient_norms(net).tolist() == pytest.approx(expected, rel=1e-6)
    net.layers[3].weight.grad = None
    assert gradient_norms(net)[1].item() == 0.0


def test_sigmoid_gradients_vanish_towards_the_input(tmp_path: Path) -> None:
    """Lesson B's picture at initialisation: through sigmoids, each layer nearer the input
    gets a gradient several times smaller (the sigmoid's slope is at most 1/4)."""
    dm = DigitsDataModule(batch_size=64)
    grads = {}
    for activation in ("sigmoid", "relu"):
        net = MLP(dm.input_dim, dm.num_classes, hidden_sizes=[32] * 5, activation=activation)
        grads[activation] = GradientNorms(every_n_steps=1)
        L.seed_everything(0, verbose=False)
        model = Classifier(net, dm.num_classes, optimizer=partial(torch.optim.SGD, lr=0.1))
        L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            callbacks=[grads[activation]],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        ).fit(model, datamodule=dm)
    [(step, sigmoid)] = grads["sigmoid"].history
    [(_, relu)] = grads["relu"].history
    assert step == 0 and len(sigmoid) == len(relu) == 6
    assert all(a < b for a, b in zip(sigmoid, sigmoid[1:]))
    assert sigmoid[-1] / sigmoid[0] > 1000  # orders of magnitude across 6 layers
    assert relu[-1] / relu[0] < 100 and relu[0] > 100 * sigmoid[0]


def test_diagnostics_on_digits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = DigitsDataModule(batch_size=32)
    torch.manual_seed(0)  # the initial weights, not whatever earlier code left in the global RNG
    net = MLP(dm.input_dim, dm.num_classes, hidden_sizes=[64, 32, 32])
    grads = GradientNorms(every_n_steps=5)
    report, wrong, hist = TestReport(), MisclassifiedImages(max_images=8, ncols=4), WeightHistograms(1, gradients=True)
    callbacks = [grads, hist, SampleInputs(num_images=16), report, wrong, DecisionBoundary()]
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    with caplog.at_level(logging.INFO, logger="mlplab.callbacks.test_report"):
        trainer, model = _fit(dm, net, callbacks, logger, epochs=2)
    total_steps = trainer.global_step
    steps_per_epoch = total_steps // 2
    assert steps_per_epoch == 38  # 1,212 training images in batches of 32
    ea = _events(tmp_path / "tb")

    # Gradient norms: 4 weight matrices, logged on steps 0, 5, 10, ... and nowhere else.
    logged_steps = list(range(0, total_steps, 5))
    assert [s for s, _ in grads.history] == logged_steps
    for i in range(1, 5):
        events = ea.Scalars(f"~diagnostics/grad_norm/layer_{i:02d}")
        assert [e.step for e in events] == logged_steps
        assert [e.value for e in events] == pytest.approx([v[i - 1] for _, v in grads.history], rel=1e-6)
    assert "~diagnostics/grad_norm/layer_05" not in ea.Tags()["scalars"]
    assert all(v > 0 for _, norms in grads.history for v in norms)
    # The depth figure: at step 0, and at the end of training (mean of what was logged since).
    assert [e.step for e in ea.Images("~diagnostics/grad_norm/by_depth")] == [0, total_steps]

    # Weight histograms at the start and after each epoch; gradient histograms after each epoch.
    for i in range(1, 5):
        w = ea.Histograms(f"~diagnostics/weights/layer_{i:02d}")
        assert [e.step for e in w] == [0, steps_per_epoch, total_steps]
        n_weights = model.net.layers[2 * i - 1].weight.numel()
        assert all(e.histogram_value.num == n_weights for e in w)
        assert [e.step for e in ea.Histograms(f"~diagnostics/gradients/layer_{i:02d}")] == [
            steps_per_epoch,
            total_steps,
        ]
    # The first histogram is the initialisation: PyTorch's Linear init, uniform in +-1/sqrt(fan_in).
    first = ea.Histograms("~diagnostics/weights/layer_01")[0].histogram_value
    assert -1 / 8 <= first.min < first.max <= 1 / 8

    # Test report: the confusion matrix and per-class scores equal sklearn's on the same predictions.
    x_test, y_test = dm.data_test.tensors
    with torch.no_grad():
        preds = model(x_test).argmax(dim=1).numpy()
    assert report.confusion.sum() == len(y_test) == 449
    np.testing.assert_array_equal(report.confusion.numpy(), confusion_matrix(y_test.numpy(), preds, labels=range(10)))
    p, r, f, s = precision_recall_fscore_support(y_test.numpy(), preds, labels=range(10), zero_division=0)
    assert [row[0] for row in report.rows] == [str(i) for i in range(10)] + ["macro avg"]
    assert [row[1] for row in report.rows[:10]] == pytest.approx(p, abs=1e-6)
    assert [row[2] for row in report.rows[:10]] == pytest.approx(r, abs=1e-6)
    assert [row[3] for row in report.rows[:10]] == pytest.approx(f, abs=1e-6)
    assert [row[4] for row in report.rows[:10]] == s.tolist()
    assert report.rows[-1][3] == pytest.approx(f.mean(), abs=1e-6)
    accuracy = float(trainer.callback_metrics["test/acc"])
    assert report.confusion.diag().sum().item() / 449 == pytest.approx(accuracy, abs=1e-6)
    [text] = ea.Tensors("test/report/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "| 7 |" in markdown and "| macro avg |" in markdown and f"accuracy: {accuracy:.4f}" in markdown
    assert f"accuracy  {accuracy:.4f}" in caplog.text and "macro avg" in caplog.text  # the log has it too

    # Misclassified: the first 8 wrong test predictions (there are more than 8 after 2 epochs).
    n_wrong = int((preds != y_test.numpy()).sum())
    assert 8 < n_wrong < 449 * 0.3 and wrong.num_logged == 8  # it learned, but not everything
    # Images: one each, RGB, non-blank; none for the decision boundary (64-dimensional inputs).
    images = set(ea.Tags()["images"])
    assert images == {"train/samples", "~diagnostics/grad_norm/by_depth", "test/confusion_matrix", "test/misclassified"}
    for tag in ("train/samples", "test/confusion_matrix", "test/misclassified"):
        [event] = ea.Images(tag)
        pixels = _image(ea, tag)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 10, tag
    assert ea.Images("train/samples")[0].step == 0
    # 16 samples in 8 columns is twice as wide as tall-ish; 8 misclassified in 4 columns likewise.
    h, w = _image(ea, "train/samples").shape[:2]
    assert 1.5 < w / h < 3.5


def test_decision_boundary_on_two_dimensional_data(tmp_path: Path) -> None:
    dm = Halves2D(batch_size=32, val_size=50)
    net = MLP(dm.input_dim, dm.num_classes, hidden_sizes=[16], activation="tanh")
    boundary = DecisionBoundary(every_n_epochs=2, resolution=60)
    callbacks = [boundary, SampleInputs(), MisclassifiedImages(), GradientNorms(every_n_steps=4), WeightHistograms()]
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer, model = _fit(dm, net, callbacks, logger, epochs=3, lr=0.2)
    steps_per_epoch = trainer.global_step // 3
    ea = _events(tmp_path / "tb")

    # After epoch 1 (every 2 epochs), at the end of training, and once for the test set.
    assert [e.step for e in ea.Images("train/decision_boundary")] == [2 * steps_per_epoch, 3 * steps_per_epoch]
    assert len(ea.Images("test/decision_boundary")) == 1
    # Weight histograms by default: the initialisation and the end of training only.
    assert [e.step for e in ea.Histograms("~diagnostics/weights/layer_01")] == [0, 3 * steps_per_epoch]
    # Not pictures: no sample or misclassified grids for 2-D points.
    assert "train/samples" not in ea.Tags()["images"] and "test/misclassified" not in ea.Tags()["images"]

    # The regions drawn are the model's: left of x = 0 is "left", right of it "right".
    xx, yy, classes = predict_grid(model, dm.data_train.tensors[0], resolution=60)
    assert classes.shape == (60, 60) and xx.shape == (60, 60)
    assert xx.min() < dm.data_train.tensors[0][:, 0].min() and xx.max() > dm.data_train.tensors[0][:, 0].max()
    assert (classes[xx < -0.5] == 0).mean() > 0.95 and (classes[xx > 0.5] == 1).mean() > 0.95
    # Both classes' colours are in the picture (two filled regions).
    pixels = _image(ea, "test/decision_boundary").reshape(-1, 3).astype(int)
    blueish = ((pixels[:, 2] - pixels[:, 0]) > 40).mean()
    orangeish = ((pixels[:, 0] - pixels[:, 2]) > 40).mean()
    assert blueish > 0.1 and orangeish > 0.1


def test_diagnostics_without_tensorboard(tmp_path: Path) -> None:
    """A CSV logger only: scalars go there, images are skipped, the report is still computed."""
    dm = DigitsDataModule(batch_size=128)
    net = MLP(dm.input_dim, dm.num_classes, hidden_sizes=[16])
    report, grads = TestReport(), GradientNorms(every_n_steps=3)
    callbacks = [grads, WeightHistograms(1), SampleInputs(), report, MisclassifiedImages(), DecisionBoundary()]
    _fit(dm, net, callbacks, CSVLogger(str(tmp_path), name="csv", version=""), epochs=1)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [
        (int(r["step"]), float(r["~diagnostics/grad_norm/layer_01"]))
        for r in rows
        if r.get("~diagnostics/grad_norm/layer_01")
    ]
    assert logged == [(s, pytest.approx(v[0], rel=1e-6)) for s, v in grads.history]
    assert [s for s, _ in logged] == [0, 3, 6, 9]  # 10 steps of 128
    assert report.confusion.sum() == 449 and len(report.rows) == 11
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (GradientNorms, {"every_n_steps": 0}, "callbacks.gradient_norms.every_n_steps=0"),
        (GradientNorms, {"figure_every_n_epochs": -1}, "callbacks.gradient_norms.figure_every_n_epochs=-1"),
        (WeightHistograms, {"every_n_epochs": 0}, "callbacks.weight_histograms.every_n_epochs=0"),
        (MisclassifiedImages, {"max_images": "many"}, "callbacks.misclassified.max_images='many'"),
        (SampleInputs, {"num_images": 0}, "callbacks.sample_inputs.num_images=0"),
        (DecisionBoundary, {"resolution": 1.5}, "callbacks.decision_boundary.resolution=1.5"),
    ],
)
def test_bad_callback_settings(cls, kwargs, expected):
    from mlplab.errors import ConfigError

    with pytest.raises(ConfigError, match="allowed: a positive integer") as info:
        cls(**kwargs)
    assert str(info.value).startswith(expected + " is invalid")


def test_the_progress_bar_counts_optimizer_steps_under_fused_steps(tmp_path):
    """A digits epoch is 38 optimizer steps (1,213 samples, batch 32): the bar shows 38/38, not
    the 3 blocks of 16 steps that fused steps hand to Lightning's loop."""
    args = ["trainer=cpu", "trainer.max_epochs=1", "logger=none", "test=false", "callbacks.progress_bar.refresh_rate=1"]
    proc = run_cli(
        "train",
        [*args, "steps_per_call=16", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={"MLPLAB_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    epoch_lines = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines() if "Epoch 0:" in line]
    assert epoch_lines and "38/38" in epoch_lines[-1], epoch_lines[-3:]
    assert not any(" 3/3 " in line for line in epoch_lines)

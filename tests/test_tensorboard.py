"""What TensorBoard shows, read from a real ``tensorboard`` server over its HTTP data API.

One digits run (one epoch) under ``<tmp>/logs`` and one server on it for the whole
module: run names, scalar tags, the custom-scalars layout, the HPARAMS experiment and
the images' sizes are what TensorBoard's own pages fetch. The figures' fonts and sizes
are checked on the figures themselves.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from PIL import Image

from conftest import QUICK, compose_cfg
from mlplab.callbacks.plotting import DPI, FIGURE_WIDTH, FONT_SIZE, figure_to_array, image_grid
from mlplab.callbacks.test_report import confusion_figure
from mlplab.engines import train
from mlplab.tensorboard_view import DIAGNOSTICS

RUN = "runs/2026-01-02/03-04-05_abcdef"  # a run dir as Hydra names it, relative to the logdir
KEY_HPARAMS = [
    "model",
    "data",
    "optimizer",
    "lr",
    "batch_size",
    "seed",
    "epochs",
    "hidden_sizes",
    "activation",
    "dropout",
]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Board:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **query: str) -> bytes:
        q = f"?{urllib.parse.urlencode(query)}" if query else ""
        with urllib.request.urlopen(f"{self.url}{path}{q}", timeout=30) as r:
            return r.read()

    def json(self, path: str, **query: str):
        return json.loads(self.get(path, **query))

    def post(self, path: str, body: dict):
        req = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("board")
    logdir = tmp / "logs"
    train(compose_cfg([*QUICK, "threads=1"], logdir / RUN))
    port = _free_port()
    log = (tmp / "tensorboard.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
        + ["--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    b = Board(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:  # up, and the run's scalars loaded
            try:
                if RUN in b.json("/data/plugin/scalars/tags"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp / "tensorboard.log").read_text()
            time.sleep(0.3)
        yield b
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_runs_are_named_by_their_run_dirs(board: Board) -> None:
    assert board.json("/data/runs") == [RUN]


def test_diagnostics_come_after_the_results(board: Board) -> None:
    scalars = set(board.json("/data/plugin/scalars/tags")[RUN])
    images = set(board.json("/data/plugin/images/tags")[RUN])
    histograms = set(board.json("/data/plugin/histograms/tags")[RUN])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"} <= scalars
    assert "epoch" not in scalars and f"{DIAGNOSTICS}/epoch" in scalars
    assert {f"{DIAGNOSTICS}/grad_norm/layer_0{i}" for i in (1, 2, 3)} <= scalars
    assert images == {
        "train/samples",
        "test/confusion_matrix",
        "test/misclassified",
        f"{DIAGNOSTICS}/grad_norm/by_depth",
    }
    assert histograms == {f"{DIAGNOSTICS}/weights/layer_0{i}" for i in (1, 2, 3)}
    groups = {tag.split("/", 1)[0] for tag in scalars | images | histograms}
    assert groups == {"test", "train", "val", DIAGNOSTICS}
    # The Time Series tab groups tags by their first part, sorted by character, and opens the
    # first two groups only: results, not diagnostics.
    assert sorted(groups)[:2] == ["test", "train"] and sorted(groups)[-1] == DIAGNOSTICS


def test_custom_scalars_put_train_and_val_on_one_chart_first(board: Board) -> None:
    def series(chart: dict) -> dict[str, list]:
        """What the Custom Scalars tab draws in ``chart``: the tags its regexes match, with their points."""
        out = {}
        for regex in chart["multiline"]["tag"]:
            out.update(board.json("/data/plugin/custom_scalars/scalars", run=RUN, tag=regex)["tag_to_events"])
        return out

    first, *rest = board.json("/data/plugin/custom_scalars/layout")["category"]
    assert first["title"] == "loss and accuracy" and not first.get("closed")
    charts = {c["title"]: series(c) for c in first["chart"]}
    assert {title: sorted(tags) for title, tags in charts.items()} == {
        "loss": ["train/loss", "val/loss"],
        "acc": ["train/acc", "val/acc"],
    }
    assert all(len(points) == 1 for tags in charts.values() for points in tags.values())  # one epoch
    [diagnostics] = rest
    assert diagnostics["closed"] is True
    [grad] = diagnostics["chart"]
    assert sorted(series(grad)) == [f"{DIAGNOSTICS}/grad_norm/layer_0{i}" for i in (1, 2, 3)]


def test_hparams_columns_start_with_the_short_names(board: Board) -> None:
    experiment = board.post("/data/plugin/hparams/experiment", {"experimentName": "", "hparamsLimit": 1000})
    infos = experiment["hparamInfos"]
    shown = [i.get("displayName") or i["name"] for i in infos]
    assert shown[: len(KEY_HPARAMS)] == KEY_HPARAMS  # the tab shows the first five, ticks the rest
    assert [i["name"] for i in infos[:3]] == ["01 model", "02 data", "03 optimizer"]
    # The run's values, as the tab's table fetches them.
    groups = board.post(
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": i["name"]} for i in infos],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )
    [group] = groups["sessionGroups"]
    values = {name.split(" ", 1)[1]: group["hparams"][name] for name in [i["name"] for i in infos[:10]]}
    assert values == {
        "model": "MLP",
        "data": "Digits",
        "optimizer": "SGD",
        "lr": 0.05,
        "batch_size": 32,
        "seed": 42,
        "epochs": 1,
        "hidden_sizes": "[256, 128]",
        "activation": "relu",
        "dropout": 0.0,
    }
    # The rest under their config paths, nothing twice.
    assert "data.augment" in shown and "optimizer.momentum" in shown
    assert not {"model._target_", "optimizer.lr", "data.batch_size", "model.hidden_sizes"} & set(shown)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]][:2] == ["val/acc_best", "val/acc"]


def test_images_fit_a_card(board: Board) -> None:
    for tag in board.json("/data/plugin/images/tags")[RUN]:
        [entry] = board.json("/data/plugin/images/images", run=RUN, tag=tag, sample="0")[-1:]
        png = board.get("/data/plugin/images/individualImage?" + entry["query"])
        width, height = Image.open(io.BytesIO(png)).size
        assert width <= FIGURE_WIDTH * DPI <= 500, (tag, width)
        assert 100 <= height <= 600, (tag, height)


# -- the figures themselves ------------------------------------------------------------------
def _texts(fig) -> list:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]


def test_confusion_matrix_counts_are_legible() -> None:
    counts = torch.full((10, 10), 7) + torch.diag(torch.full((10,), 180))
    fig = confusion_figure(counts, [str(i) for i in range(10)])
    pixels = figure_to_array(fig)
    assert pixels.shape[1] == FIGURE_WIDTH * DPI == 480 and pixels.shape[0] <= 480
    texts = _texts(fig)
    assert sum(t.get_text() == "187" for t in texts) == 10
    assert min(t.get_fontsize() for t in texts) >= FONT_SIZE - 1 >= 9  # 9 pt: the colour bar's ticks
    assert all(t.get_fontsize() == FONT_SIZE for t in texts if t.get_text() in ("187", "7", "3", "predicted"))
    # Each count lies inside its cell.
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    cell = ax.get_window_extent(renderer).width / 10
    assert max(t.get_window_extent(renderer).width for t in texts if t.get_text() == "187") < cell


@pytest.mark.parametrize(("names", "cols"), [([str(i) for i in range(10)], 6), (FASHION, 4)])
def test_image_grid_titles_fit_their_tiles(names: list[str], cols: int) -> None:
    images = torch.rand(24, 64)
    titles = [f"{names[i % 10]}\n({names[(i + 3) % 10]})" for i in range(24)]
    fig = image_grid(images, titles, (1, 8, 8), colors=["red"] * 24)
    pixels = figure_to_array(fig)
    assert pixels.shape[1] <= FIGURE_WIDTH * DPI
    renderer = fig.canvas.get_renderer()
    tiles = _texts(fig)
    assert len(tiles) == 24 and {t.get_fontsize() for t in tiles} == {FONT_SIZE}
    xs = sorted({round(t.get_window_extent(renderer).x0 + t.get_window_extent(renderer).width / 2) for t in tiles})
    assert len(xs) == cols  # long class names: fewer columns, the font stays
    tile = pixels.shape[1] / cols
    assert max(t.get_window_extent(renderer).width for t in tiles) < tile

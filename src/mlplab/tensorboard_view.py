"""What TensorBoard shows first: the run's own dir as its name, results before diagnostics.

- A run's event files lie in its run dir itself (no ``tensorboard/`` subfolder), so with
  ``tensorboard --logdir logs`` a run is named by its run dir (``runs/<date>/<time>_<uid>``,
  a sweep job's ``multiruns/.../<n>_<overrides>``).
- Diagnostics (gradient norms, weight histograms, epoch times, Lightning's ``epoch``)
  are tagged ``~diagnostics/...``. TensorBoard sorts tag groups by name and opens only the
  first two in its Time Series tab; ``~`` sorts after every letter, so ``test/``,
  ``train/`` and ``val/`` come first and the diagnostics last, and the HPARAMS tab of a
  sweep (every scalar a metric, by name) shows the results' columns first.
- The custom-scalars layout (the *Custom Scalars* tab) puts train and val on one chart:
  ``loss`` (``train/loss``, ``val/loss``) and ``acc`` (``train/acc``, ``val/acc``),
  then the diagnostics in a closed category. Written once, when a run starts.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2

#: The prefix of every diagnostic tag (TensorBoard lists it after test/, train/, val/).
DIAGNOSTICS = "~diagnostics"


def diagnostic(name: str) -> str:
    """``"grad_norm/layer_01"`` -> ``"~diagnostics/grad_norm/layer_01"``."""
    return f"{DIAGNOSTICS}/{name}"


def _exactly(*tags: str) -> list[str]:
    return [f"^{re.escape(tag)}$" for tag in tags]


#: ``(category, closed, [(chart title, [tag regexes])])``, in the order the tab shows them.
LAYOUT: list[tuple[str, bool, list[tuple[str, list[str]]]]] = [
    (
        "loss and accuracy",
        False,
        [("loss", _exactly("train/loss", "val/loss")), ("acc", _exactly("train/acc", "val/acc"))],
    ),
    (
        "diagnostics",
        True,
        [
            ("gradient norm per layer", [f"^{re.escape(diagnostic('grad_norm/layer_'))}\\d+$"]),
        ],
    ),
]


def layout_summary() -> Summary:
    """The custom-scalars plugin's layout summary (tag ``custom_scalars__config__``)."""
    layout = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=title,
                closed=closed,
                chart=[
                    layout_pb2.Chart(title=chart, multiline=layout_pb2.MultilineChartContent(tag=tags))
                    for chart, tags in charts
                ],
            )
            for title, closed, charts in LAYOUT
        ]
    )
    return Summary(
        value=[
            Summary.Value(
                tag="custom_scalars__config__",
                tensor=TensorProto(
                    dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto()
                ),
                metadata=SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars")),
            )
        ]
    )


def write_layout(writer: Any) -> None:
    """Write :func:`layout_summary` with a ``SummaryWriter`` (once per run: TensorBoard reads the first)."""
    writer._get_file_writer().add_summary(layout_summary())


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, with the ``epoch`` Lightning adds to every logged
    step filed under the diagnostics (``~diagnostics/epoch``)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {(diagnostic("epoch") if k == "epoch" else k): v for k, v in metrics.items()}
        super().log_metrics(metrics, step)

"""For notebooks and scripts: compose a config as ``src/train.py`` does, train, read the logs back.

    from mlplab import notebook as nb
    run = nb.train(["model.activation=sigmoid", "trainer.max_epochs=5"])
    run.metrics["test/acc"], nb.scalars(run.output_dir)["val/acc"]

Runs write where the CLI's do, under ``paths.log_dir`` (``<repo>/logs``, or
``$MLPLAB_ROOT/logs``), in a fresh ``notebooks/<date>/<time>_<uid>`` dir each time, so
``tensorboard --logdir logs`` shows them next to the CLI's runs and nothing is
overwritten. TensorBoard event files are read with TensorBoard's own ``EventAccumulator``.
"""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, open_dict

from mlplab import runs

#: The checkout this package runs from (``conf/`` and ``src/train.py`` live there).
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def compose(
    overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None, config_name: str = "train"
) -> DictConfig:
    """The config that ``python src/<config_name>.py <overrides>`` would run.

    Its ``paths.output_dir`` is ``output_dir`` or a new
    ``<paths.log_dir>/notebooks/<date>/<time>_<uid>`` (created when the run starts).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    os.environ.setdefault("MLPLAB_ROOT", str(REPO_ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    with open_dict(cfg):
        if output_dir is None:
            now = datetime.now()
            output_dir = (
                Path(cfg.paths.log_dir) / "notebooks" / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}_{secrets.token_hex(3)}"
            )
        cfg.paths.output_dir = str(output_dir)
    return cfg


@dataclass
class Run:
    """A finished training run: its dir (TensorBoard logs, checkpoints, run.json) and final metrics."""

    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)


def train(overrides: Sequence[str] | DictConfig = ()) -> Run:
    """Train (and test) like ``python src/train.py <overrides>``; returns the run.

    Takes overrides or a config from :func:`compose`. A bad value raises
    :class:`~mlplab.errors.ConfigError` before anything is trained.
    """
    from mlplab.engines import fit

    cfg = overrides if isinstance(overrides, DictConfig) else compose(overrides)
    out = Path(cfg.paths.output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; a run never writes into an earlier run's dir")
    metrics = fit(cfg)
    metrics.pop("epochs", None)
    return Run(out, metrics)


# -- reading TensorBoard logs back ----------------------------------------------------------
def _events(run_dir: str | os.PathLike):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir)
    if not list(tb.glob("events.out.tfevents.*")) and list((tb / "tensorboard").glob("events.out.tfevents.*")):
        tb = tb / "tensorboard"  # a run made when event files had a subfolder of their own
    if not list(tb.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event file in {tb}")
    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    return ea


def scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run: ``{tag: [(step, value), ...]}`` (e.g. ``"val/acc"``, ``"~diagnostics/grad_norm/layer_01"``)."""
    ea = _events(run_dir)
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def images(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every image of a run, decoded: ``{tag: [(step, H x W x 3 uint8 array), ...]}``."""
    from PIL import Image

    ea = _events(run_dir)
    return {
        tag: [
            (e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))) for e in ea.Images(tag)
        ]
        for tag in ea.Tags()["images"]
    }


def texts(run_dir: str | os.PathLike) -> dict[str, str]:
    """The last text logged under each tag (e.g. ``"test/report"``, a Markdown table)."""
    ea = _events(run_dir)
    out = {}
    for tag in ea.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            out[tag.removesuffix("/text_summary")] = ea.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    return out


def sweep_jobs(sweep_dir: str | os.PathLike) -> list[dict]:
    """The run record (``run.json``) of every job of a multirun, in job order, with ``job_dir`` added."""
    from mlplab.sweeps import find_job_dirs  # job dirs are <number>_<overrides>

    jobs = []
    for job_dir in find_job_dirs(Path(sweep_dir)):
        record = runs.read_run_record(job_dir)
        if record is not None:
            jobs.append({**record, "job_dir": job_dir})
    return jobs

"""``src/train.py``'s run: one pipeline, whichever engine trains.

    validate -> seed -> build (data, net) -> engine.fit -> report

Data flows one way: config -> DataModule (knows ``input_dim``, ``num_classes``,
``class_names``; its data is read and checked here, before any output exists) -> net
sized from it -> the engine. An engine (``engine=lightning|ignite|numpy``) is a module of
this package with ``fit(cfg, dm, net, ckpt_path) -> metrics``; ``model=numpy_mlp`` sets
``engine=numpy``, the only engine that trains it. The run record (``run.json``) is written
around this by :func:`mlplab.cli.run_job`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mlplab.config import validate_hardware, validate_train_config
from mlplab.data import TensorDataModule
from mlplab.engines.build import build_datamodule, build_net
from mlplab.errors import ConfigError
from mlplab.groups import CONF_DIR, group_options
from mlplab.lean import denormals_flushed, reuse_freed_memory
from mlplab.numpy_net import NumpyMLP
from mlplab.rundir import resume_checkpoint
from mlplab.validation import positive_int

log = logging.getLogger(__name__)

#: ``engine=`` options: each a module ``mlplab.engines.<name>`` with ``fit(cfg, dm, net, ckpt_path)``.
ENGINES = ("lightning", "ignite", "numpy")


def train(cfg: DictConfig) -> float | None:
    """Train, test the best checkpoint, and return ``cfg.optimized_metric`` (for sweepers)."""
    metrics = fit(cfg)
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train, test the best checkpoint; returns every final metric and ``epochs`` (epochs completed)."""
    with threads(cfg), denormals(cfg):
        validate_train_config(cfg)
        validate_hardware(cfg)
        engine = engine_name(cfg)
        ckpt_path = resume_checkpoint(cfg)
        reuse_freed_memory()
        L.seed_everything(cfg.seed, workers=True, verbose=False)

        dm = build_datamodule(cfg.data)
        dm.check_available()
        net = build_net(cfg.model, dm)
        log.debug("net: %s", net)
        check_engine_trains(engine, net)
        load_data(dm)
        announce("train", f"{describe_net(net)} on {describe_data(cfg, dm)} with engine={engine}", cfg)
        show_config(cfg)
        metrics = importlib.import_module(f"mlplab.engines.{engine}").fit(cfg, dm, net, ckpt_path)
        report(metrics, cfg)
        return metrics


def engine_name(cfg: DictConfig) -> str:
    engine = cfg.get("engine", "lightning")
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is invalid; allowed: {', '.join(ENGINES)}")
    return engine


def check_engine_trains(engine: str, net: object) -> None:
    """The NumPy net trains with the NumPy engine only, and that engine trains nothing else."""
    if isinstance(net, NumpyMLP) != (engine == "numpy"):
        raise ConfigError(
            f"engine={engine} cannot train {type(net).__name__}; allowed: model=numpy_mlp with engine=numpy "
            "(which that model sets), any other model with engine=lightning or engine=ignite"
        )


def describe_net(net: object) -> str:
    """``MLP (50,570 parameters, 0.2 MB)``."""
    params = sum(p.numel() for p in net.parameters()) if isinstance(net, torch.nn.Module) else None
    if params is None and isinstance(net, NumpyMLP):
        params = sum(w.size + (b.size if b is not None else 0) for w, b in zip(net.weights, net.biases))
    size = f", {params * 4 / 1e6:.1f} MB" if isinstance(net, torch.nn.Module) else ""
    return f"{type(net).__name__} ({params:,} parameters{size})" if params is not None else type(net).__name__


def describe_data(cfg: DictConfig, dm: TensorDataModule) -> str:
    """``data=digits (1,213 train / 135 val / 449 test)``."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.data", default=None)
    if choice is None:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    if choice is None:  # a stored config (eval.py): the data option whose class it names
        target = OmegaConf.select(cfg, "data._target_", default=None)
        choice = next((o for o in group_options("data") if _option_target("data", o) == target), None)
    name = f"data={choice}" if choice else type(dm).__name__
    sizes = [len(ds) if ds is not None else 0 for ds in (dm.data_train, dm.data_val, dm.data_test)]
    return f"{name} ({sizes[0]:,} train / {sizes[1]:,} val / {sizes[2]:,} test)"


def _option_target(group: str, option: str) -> str | None:
    try:
        return OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("_target_")
    except Exception:
        return None


def device_words(cfg: DictConfig) -> str:
    """``the cpu``, ``cuda x 4 (ddp)``: where ``trainer`` runs."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    many = devices not in (1, "1", None)
    return f"{accelerator} x {devices}" if many else ("the cpu" if accelerator == "cpu" else accelerator)


@rank_zero_only
def announce(task: str, what: str, cfg: DictConfig) -> None:
    """The run's first line: what is trained (or tested) on what, on which device, and where it writes."""
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    print(f"{task}: {what} on {device_words(cfg)}" + (f"; run dir: {out}" if out else ""), flush=True)


@rank_zero_only
def show_config(cfg: DictConfig) -> None:
    """``print_config=true`` (the default): the config tree after the first line, in full in the run dir."""
    flag = cfg.get("print_config", True)
    if not isinstance(flag, bool):
        raise ConfigError(f"print_config={flag!r} is invalid; allowed: true, false")
    if flag:
        from mlplab.config_tree import print_config_tree

        print_config_tree(cfg)


def load_data(dm: TensorDataModule) -> None:
    """Read, check and split the data before any logger or output exists: bad data leaves nothing.

    (A Trainer's own ``setup`` call then only moves the tensors to its device.)
    """
    dm.prepare_data()
    dm.setup("fit")


@contextlib.contextmanager
def threads(cfg: DictConfig) -> Iterator[None]:
    """``threads=N``: torch's intra-op threads for the run (null: torch's choice, one per core).

    On a busy or shared machine one thread per core oversubscribes the cores and a small
    net's run can be many times slower; the caller's setting is restored afterwards.
    """
    wanted = cfg.get("threads")
    if wanted is None:
        yield
        return
    n = positive_int("threads", wanted)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def denormals(cfg: DictConfig) -> Iterator[None]:
    """``flush_denormal=true`` (the default): denormal floats flushed to zero on the CPU for
    the run (:func:`mlplab.lean.denormals_flushed`), from before its first torch computation."""
    flush = cfg.get("flush_denormal", True)
    if not isinstance(flush, bool):
        raise ConfigError(f"flush_denormal={flush!r} is invalid; allowed: true, false")
    with denormals_flushed(flush) as everywhere:
        if everywhere is False:
            log.info(
                "flush_denormal: only the main thread flushes denormal floats; torch's worker threads were started "
                "before this run (by an earlier computation in this process) and keep them, which can slow CPU "
                "training (docs: Speed); call mlplab.lean.flush_denormals() before any torch computation to "
                "cover them"
            )
        yield


def _summary(metrics: dict[str, float], output_dir: str | None) -> str:
    shown = [f"{k}={metrics[k]:.4f}" for k in ("test/acc", "val/acc_best", "test/loss") if k in metrics]
    return "  ".join(shown) + (f"  (output: {output_dir})" if output_dir else "")


@rank_zero_only
def report(metrics: dict[str, float], cfg: DictConfig) -> None:
    """The run's one result line: ``test/acc=...  val/acc_best=...  test/loss=...  (output: <dir>)``."""
    print(_summary(metrics, OmegaConf.select(cfg, "paths.output_dir", default=None)), flush=True)

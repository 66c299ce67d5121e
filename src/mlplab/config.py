"""Checks on a composed config, run before anything expensive is built.

Group options Hydra cannot find are Hydra's to report (its message lists the choices).
Values are ours: every bad one raises :class:`~mlplab.errors.ConfigError` naming the
key, the value and what is allowed. DataModule and net constructors check their own
arguments the same way, and they are built before the Trainer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from omegaconf import DictConfig, OmegaConf

from mlplab.errors import CheckpointError, ConfigError
from mlplab.groups import choices
from mlplab.validation import int_in, non_negative_number, positive_int, positive_number

log = logging.getLogger(__name__)


def validate_optimizer(cfg: DictConfig) -> None:
    opt = cfg.get("optimizer")
    if opt is None:
        raise ConfigError(f"optimizer is missing; allowed: {choices('optimizer')}")
    positive_number("optimizer.lr", opt.get("lr"))
    if "momentum" in opt:
        non_negative_number("optimizer.momentum", opt.momentum, below=1.0)
    if "weight_decay" in opt:
        non_negative_number("optimizer.weight_decay", opt.weight_decay)
    if opt.get("nesterov") and not opt.get("momentum"):
        raise ConfigError(
            f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {opt.get('momentum')}); "
            "allowed: set a momentum or nesterov=false"
        )
    # Its keys are checked against its signature by mlplab.engines.build.check_targets, its other
    # values by a trial build on the net's parameters (mlplab.engines.build.build_optimizer).


def validate_trainer(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer")
    if trainer is None:
        raise ConfigError(f"trainer is missing; allowed: {choices('trainer')}")
    positive_int("trainer.max_epochs", trainer.get("max_epochs"))
    if trainer.get("min_epochs") is not None:
        int_in("trainer.min_epochs", trainer.min_epochs, low=0)
    if trainer.get("num_nodes") is not None:
        positive_int("trainer.num_nodes", trainer.num_nodes)
    if trainer.get("use_distributed_sampler"):
        raise ConfigError(
            "trainer.use_distributed_sampler=true is invalid; allowed: false (mlplab's DataModules shard "
            "batches across DDP ranks themselves, evaluating every sample exactly once)"
        )
    # Counts that Lightning's Trainer takes without checking, to fail on when fit runs
    # (check_val_every_n_epoch=0: a ZeroDivisionError in the fit loop).
    for key, low in TRAINER_COUNTS.items():
        if trainer.get(key) is not None:
            int_in(f"trainer.{key}", trainer[key], low=low)
    if trainer.get("gradient_clip_val") is not None:
        non_negative_number("trainer.gradient_clip_val", trainer.gradient_clip_val)
    devices = trainer.get("devices")
    if not _valid_devices(devices):
        raise ConfigError(
            f"trainer.devices={devices!r} is invalid; allowed: a count >= 1, -1 (all), 'auto', or device ids like '0,1'"
        )


#: Trainer counts Lightning does not range-check in its constructor, with their lowest value.
TRAINER_COUNTS = {
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": 1,
    "accumulate_grad_batches": 1,
    "num_sanity_val_steps": -1,
    "min_steps": 0,
}

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def validate_hardware(cfg: DictConfig) -> None:
    """``trainer.accelerator`` exists on this machine with ``trainer.devices`` devices.

    Separate from :func:`validate_trainer` (the values): a ``trainer=gpu`` config is valid
    anywhere, it only cannot run here. Lightning's own errors for this are tracebacks.
    """
    accelerator, devices = cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices")
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is invalid; allowed: {', '.join(ACCELERATORS)}")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no usable GPU (CUDA); "
            "allowed: trainer=cpu, trainer=default (auto: the CPU here) or trainer=ddp_cpu"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "trainer.accelerator=mps but this machine has no usable Apple GPU (MPS); "
            "allowed: trainer=cpu, or trainer=default (auto: the CPU here)"
        )
    if accelerator == "mps" or devices in ("auto", -1, "-1"):
        return
    if isinstance(devices, str) and "," not in devices:  # "2" is a count, "0,1" ids (Lightning's reading)
        devices = int(devices)
    available = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    what = "GPUs" if gpu else "CPU cores"
    if isinstance(devices, int):
        if devices > available:
            raise ConfigError(
                f"trainer.devices={devices} but this machine has {available} {what}; allowed: 1..{available} or -1 (all)"
            )
        return
    ids = [int(d) for d in (devices.split(",") if isinstance(devices, str) else devices) if str(d).strip()]
    if gpu and ids and max(ids) >= available:
        raise ConfigError(
            f"trainer.devices={devices!r} names GPU {max(ids)} but this machine has {available} {what} "
            f"(ids 0..{available - 1}); allowed: ids below {available}, a count, or -1 (all)"
        )


def _valid_devices(devices: Any) -> bool:
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        return devices == "auto" or all(part.strip().isdigit() for part in devices.split(",") if part.strip())
    return OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices)


def validate_ckpt_path(key: str, path: Any) -> Path:
    """An existing, readable file; returns it as a Path."""
    if path is None or str(path).strip() == "":
        raise CheckpointError(
            f"{key} is not set; allowed: the path of a .ckpt file, e.g. {key}=logs/runs/.../checkpoints/last.ckpt"
        )
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise CheckpointError(
            f"{key}={path} does not exist or is not a file; allowed: the path of a readable .ckpt file"
        )
    try:
        with p.open("rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"{key}={path} cannot be read ({err.strerror}); allowed: a readable .ckpt file") from None
    return p


def validate_train_config(cfg: DictConfig) -> None:
    """Everything train() can check before building data, net or Trainer.

    Includes :func:`mlplab.engines.build.check_targets` (unknown keys, keys a ``_target_`` does
    not take).
    """
    from mlplab.engines.build import check_targets

    int_in("seed", cfg.get("seed"), low=min_seed_value, high=max_seed_value)  # seed_everything's range
    if cfg.get("data") is None or cfg.get("model") is None:
        raise ConfigError(f"data and model must be chosen; allowed: {choices('data')}, {choices('model')}")
    check_targets(cfg)
    validate_optimizer(cfg)
    validate_trainer(cfg)
    if cfg.get("ckpt_path") is not None:
        validate_ckpt_path("ckpt_path", cfg.ckpt_path)
    if cfg.get("resume") is not None:
        validate_resume(cfg)
    metric = cfg.get("optimized_metric")
    allowed = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
    if metric is not None and metric not in allowed:
        raise ConfigError(f"optimized_metric={metric!r} is invalid; allowed: {', '.join(allowed)} or null")
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if (
        out is not None
        and cfg.get("ckpt_path") is None
        and cfg.get("resume") is None
        and (Path(out) / "checkpoints").is_dir()
        and any((Path(out) / "checkpoints").iterdir())
    ):
        raise ConfigError(
            f"paths.output_dir={out} already holds checkpoints of an earlier run; allowed: a new output dir "
            "(leave hydra.run.dir at its default, which is unique per run)"
        )


def validate_resume(cfg: DictConfig) -> None:
    """``resume=<run dir>`` continues that run in that dir (the CLI sets hydra.run.dir to it)."""
    run_dir = Path(str(cfg.resume)).expanduser()
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ConfigError(
            f"resume={cfg.resume} is not a run dir (no .hydra/config.yaml); allowed: the output dir of an "
            "earlier train run, e.g. resume=logs/runs/<date>/<time>_<uid>"
        )
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if out is None or Path(out).resolve() != run_dir.resolve():
        raise ConfigError(
            f"resume={cfg.resume} but this run writes to {out}; allowed: python src/train.py resume={cfg.resume} "
            "(which runs in that dir)"
        )
    if cfg.get("ckpt_path") is not None:
        raise ConfigError(f"resume={cfg.resume} and ckpt_path={cfg.ckpt_path} together; allowed: one of them")

"""Checks on a composed config, run before anything expensive is built.

Group options Hydra cannot find are Hydra's to report (its message lists the choices).
Values are ours: every bad one raises :class:`~mlplab.errors.ConfigError` naming the
key, the value and what is allowed. DataModule and net constructors check their own
arguments the same way, and they are built before the Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlplab.errors import CheckpointError, ConfigError
from mlplab.validation import int_in, non_negative_number, positive_int, positive_number


def validate_optimizer(cfg: DictConfig) -> None:
    opt = cfg.get("optimizer")
    if opt is None:
        raise ConfigError("optimizer is missing; allowed: optimizer=sgd|adam")
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


def validate_trainer(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer")
    if trainer is None:
        raise ConfigError("trainer is missing; allowed: trainer=default|cpu|gpu|ddp|ddp_cpu")
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
    devices = trainer.get("devices")
    if not _valid_devices(devices):
        raise ConfigError(
            f"trainer.devices={devices!r} is invalid; allowed: a count >= 1, -1 (all), 'auto', or device ids like '0,1'"
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
        raise CheckpointError(f"{key} is not set; allowed: the path of a .ckpt file, e.g. {key}=logs/runs/.../checkpoints/last.ckpt")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{key}={path} does not exist or is not a file; allowed: the path of a readable .ckpt file")
    try:
        with p.open("rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"{key}={path} cannot be read ({err.strerror}); allowed: a readable .ckpt file") from None
    return p


def validate_train_config(cfg: DictConfig) -> None:
    """Everything train() can check before building data, net or Trainer."""
    int_in("seed", cfg.get("seed"))
    if cfg.get("data") is None or cfg.get("model") is None:
        raise ConfigError("data and model must be chosen; allowed: data=digits|mnist|fashion_mnist|xor|moons, model=simple_net|sigmoid_net|relu_mlp|numpy_mlp")
    validate_optimizer(cfg)
    validate_trainer(cfg)
    if cfg.get("ckpt_path") is not None:
        validate_ckpt_path("ckpt_path", cfg.ckpt_path)
    metric = cfg.get("optimized_metric")
    allowed = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
    if metric is not None and metric not in allowed:
        raise ConfigError(f"optimized_metric={metric!r} is invalid; allowed: {', '.join(allowed)} or null")
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if out is not None and cfg.get("ckpt_path") is None and (Path(out) / "checkpoints").is_dir() and any((Path(out) / "checkpoints").iterdir()):
        raise ConfigError(
            f"paths.output_dir={out} already holds checkpoints of an earlier run; allowed: a new output dir "
            "(leave hydra.run.dir at its default, which is unique per run)"
        )

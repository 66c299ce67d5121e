"""Reading checkpoints mlplab did not just write: loaded without pickles, checked before use.

A checkpoint is loaded with ``torch.load(weights_only=True)`` (tensors and plain values,
never pickled objects); its stored run config is only built after
:func:`mlplab.trust.check_stored_config`; its weights must fit the net they go into and be
finite. Each failure is one :class:`~mlplab.errors.CheckpointError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mlplab.errors import CheckpointError, ConfigError
from mlplab.trust import check_stored_config


def _torch_load(ckpt_path: Path) -> Any:
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in first.lower():  # torch's text goes on to suggest weights_only=False
            first = "not a PyTorch checkpoint of tensors and plain values; pickled objects are never loaded"
        raise CheckpointError(f"ckpt_path={ckpt_path} cannot be loaded as a checkpoint ({first})") from None


def stored_config(ckpt: Any) -> dict | None:
    """The run config a checkpoint stores (``hyper_parameters.config``), or None; never raises."""
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    config = hparams.get("config") if isinstance(hparams, dict) else None
    return config if isinstance(config, dict) else None


def load_checkpoint(ckpt_path: Path) -> dict:
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"ckpt_path={ckpt_path} is not a Lightning checkpoint (no state_dict)")
    loops = ckpt.get("loops")
    if loops is not None and not (isinstance(loops, dict) and all(isinstance(v, dict) for v in loops.values())):
        raise CheckpointError(
            f"ckpt_path={ckpt_path} has a malformed loop state (loops is not a mapping of loop records); "
            "allowed: a checkpoint as Lightning or mlplab wrote it"
        )
    return ckpt


def check_checkpoint_fits(ckpt_path: Path, model: torch.nn.Module, ckpt: dict | None = None) -> None:
    """Refuse a checkpoint whose net has other parameter names or shapes than ``model``'s, or non-finite weights."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(ckpt_path)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    theirs = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("net.")}
    if theirs != ours:
        diff = next((k for k in ours if theirs.get(k) != ours[k]), None) or next(k for k in theirs if k not in ours)
        config = stored_config(ckpt) or {}
        trained = f"model {_stored_target(config, 'model')} on {_stored_target(config, 'data')}"
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not fit this model and data: {diff} is "
            f"{list(theirs[diff]) if theirs.get(diff) is not None else 'not a tensor' if diff in theirs else 'absent'} there, "
            f"{list(ours[diff]) if diff in ours else 'absent'} here (the checkpoint has {trained}); "
            "allowed: a checkpoint of the same model and data"
        )
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if bad is not None:
        raise CheckpointError(
            f"ckpt_path={ckpt_path} holds non-finite weights ({bad} has NaN or inf), so its results would be "
            "meaningless; allowed: a checkpoint of a run that did not diverge"
        )


def _stored_target(config: dict, section: str) -> str:
    node = config.get(section)
    return str(node.get("_target_", "?")) if isinstance(node, dict) else "?"


def check_schedule_plan(ckpt_path: Path, ckpt: dict, cfg: DictConfig) -> None:
    """A one-cycle schedule spans the run it was planned for: continuing it for another length is refused.

    (A cosine schedule is re-planned instead: :meth:`mlplab.models.Classifier._replan_schedule`.)
    """
    target = str(OmegaConf.select(cfg, "scheduler._target_", default="") or "")
    if not target.endswith("OneCycleLR"):
        return
    stored = stored_config(ckpt)
    planned = (
        OmegaConf.select(OmegaConf.create(stored), "trainer.max_epochs", default=None)
        if isinstance(stored, dict)
        else None
    )
    wanted = cfg.trainer.max_epochs
    if isinstance(planned, int) and planned != wanted:
        raise ConfigError(
            f"trainer.max_epochs={wanted} but ckpt_path={ckpt_path} holds a one-cycle schedule (scheduler=onecycle) "
            f"planned for {planned} epochs, which cannot be stretched mid-cycle; allowed: trainer.max_epochs={planned} "
            "to continue it, or a new run (a cosine schedule, scheduler=cosine, is re-planned when resumed for longer)"
        )


def load_checkpoint_config(ckpt_path: Path, ckpt: dict | None = None) -> dict:
    """The training config stored in an mlplab checkpoint, checked before anything is built from it
    (:func:`mlplab.trust.check_stored_config`: only mlplab's own config-group classes)."""
    ckpt = ckpt if ckpt is not None else _torch_load(ckpt_path)
    config = stored_config(ckpt)
    if not isinstance(config, dict) or "data" not in config or "model" not in config:
        raise CheckpointError(f"ckpt_path={ckpt_path} is not an mlplab checkpoint (no stored run config)")
    check_stored_config(config, f"ckpt_path={ckpt_path}")
    return config


def best_checkpoint_of(run_dir: Path) -> Path | None:
    """The best checkpoint of a run dir: the file its ModelCheckpoint recorded as best (read from
    ``last.ckpt``, a name inside ``checkpoints/`` only), else its one ``epoch_*.ckpt``, else ``last.ckpt``."""
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        return None
    last = checkpoints / "last.ckpt"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    except Exception:
        state = {}
    for key, value in state.items() if isinstance(state, dict) else ():
        best = (
            value.get("best_model_path") if str(key).startswith("ModelCheckpoint") and isinstance(value, dict) else None
        )
        name = Path(best).name if isinstance(best, str) and best else ""
        if name.endswith(".ckpt") and not name.startswith(".") and (checkpoints / name).is_file():
            return checkpoints / name
    epochs = sorted(checkpoints.glob("epoch_*.ckpt"))
    if len(epochs) == 1:
        return epochs[0]
    return last if last.is_file() else None

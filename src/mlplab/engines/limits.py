"""Trainer settings only Lightning's loop implements, for the engines that run their own loop.

``engine=ignite`` and ``engine=numpy`` refuse a ``trainer.*`` setting they would silently
ignore, and both honour ``trainer.fast_dev_run`` as Lightning reads it. ``engine=ignite``
honours ``trainer.detect_anomaly`` (torch's anomaly detection around its loop); the NumPy
net has no autograd to watch and refuses it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from mlplab.errors import ConfigError

#: Lightning Trainer settings that change training and that the ignite loop does not
#: implement, with the values that mean "off": any other value is refused, not ignored.
#: (``check_val_every_n_epoch`` only saves time: the ignite loop validates every epoch.)
_LIGHTNING_ONLY = {
    "gradient_clip_val": (None, 0, 0.0),
    "accumulate_grad_batches": (None, 1),
    "precision": (None, 32, "32", "32-true"),
    "max_steps": (None, -1),
    "limit_train_batches": (None, 1, 1.0),
    "limit_val_batches": (None, 1, 1.0),
    "limit_test_batches": (None, 1, 1.0),
    "overfit_batches": (None, 0, 0.0),
    "val_check_interval": (None, 1, 1.0),
    # debug=profiler: Lightning's profilers time Lightning's hooks.
    "profiler": (None,),
}
#: ... and those only some loops implement: ``{setting: (values meaning off, engines honouring it)}``.
_SOME_ENGINES = {
    "detect_anomaly": ((None, False), ("engine=ignite",)),
}


def check_trainer(cfg: DictConfig, engine: str) -> None:
    """Refuse a ``trainer.*`` setting a non-Lightning loop (``engine``) would silently ignore."""
    settings = {**_LIGHTNING_ONLY, **{k: off for k, (off, honoured) in _SOME_ENGINES.items() if engine not in honoured}}
    for key, off in settings.items():
        value = OmegaConf.select(cfg, f"trainer.{key}", default=None)
        if not any(_same(value, v) for v in off):
            if OmegaConf.is_dict(value) and "_target_" in value:  # a profiler: its class
                value = value["_target_"]
            raise ConfigError(
                f"{engine} does not implement trainer.{key}={value}; allowed: engine=lightning, "
                f"or trainer.{key} left at {off[min(1, len(off) - 1)]!r}"
            )
    fast_dev_batches(cfg)


def _same(value: object, off: object) -> bool:
    """``value`` is ``off`` (True is not 1, nor 1.0 True)."""
    if value is None or off is None or isinstance(value, bool) or isinstance(off, bool):
        return value is off
    return value == off


def fast_dev_batches(cfg: DictConfig) -> int:
    """``trainer.fast_dev_run`` as Lightning reads it: a number of batches, 0 when off (true: 1)."""
    value = OmegaConf.select(cfg, "trainer.fast_dev_run", default=None)
    if value is None or value is False:
        return 0
    if value is True:
        return 1
    if isinstance(value, int) and value >= 0:
        return value
    raise ConfigError(f"trainer.fast_dev_run={value} is invalid; allowed: true, false or a number of batches >= 0")

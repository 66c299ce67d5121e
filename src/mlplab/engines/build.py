"""Config -> objects: data, net, loss, optimizer and schedule, Trainer, callbacks, loggers.

Every object of a run is built here from a ``_target_`` node, and every way a user can get
such a node wrong is one :class:`~mlplab.errors.ConfigError` line, not a traceback:

- :func:`check_targets`, the pre-flight (before anything is built or written): a top-level
  key the config does not define, and a key a ``_target_``'s signature does not take
  (``trainer.max_epoch=3``: "did you mean max_epochs?");
- a third-party constructor's own refusal (``ValueError``, ``TypeError``, Lightning's
  ``MisconfigurationException``) names the group, its target and the values it was given;
- the optimizer and its schedule, which the LightningModule only calls when training
  starts, are built once on the net's parameters by :func:`build_optimizer`, before the
  Trainer exists (and the schedule stepped twice: some values fail only when stepped);
- a net too large for this machine says how many parameters and bytes it asked for.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import logging
import os
import re
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from mlplab.data import TensorDataModule
from mlplab.errors import ConfigError, MlplabError
from mlplab.groups import choices, group_options
from mlplab.models import ClassificationLoss, CrossEntropy
from mlplab.models.classifier import build_scheduler

#: What a third-party constructor raises for a value it refuses (ZeroDivisionError: a
#: schedule's zero period, found when it is stepped; AttributeError: a value of the wrong
#: type, e.g. ``trainer.max_time=5``). Raised in mlplab's own code, they stay tracebacks.
USER_ERRORS = (ValueError, TypeError, ArithmeticError, AttributeError, MisconfigurationException)

#: Arguments the builders pass themselves: a config may not set them.
SUPPLIED = {
    "model": {"input_dim": "from the data", "num_classes": "from the data"},
    "optimizer": {"params": "the net's parameters"},
    "scheduler": {"optimizer": "the optimizer"},
    "trainer": {"callbacks": "from callbacks=", "logger": "from logger=", "plugins": "mlplab's checkpoint writer"},
}

_MLPLAB_DIR = str(Path(__file__).resolve().parent)
# A stand-in run length for the schedule's trial build (the run passes its own).
_TRIAL_TOTAL_STEPS = 100


# -- the pre-flight -----------------------------------------------------------------------------


def check_targets(cfg: DictConfig) -> None:
    """Refuse, before anything is built or written, what no constructor would take.

    - a top-level key that the primary config (``train.yaml``) and its config groups do not
      define (``+foo=1``): the known keys come from composing the primary config with the
      run's group choices but without its added keys;
    - a key of a ``_target_`` node that its target's signature does not take (a target
      with ``**kwargs`` takes any), or one the builders set themselves (``SUPPLIED``);
    - a ``_target_`` that cannot be imported.
    """
    _check_top_level_keys(cfg)
    for path, node in _target_nodes(cfg, ""):
        target = node.get("_target_")
        _check_optional_package(path, str(target))
        try:
            obj = _locate(str(target))
        except Exception as err:
            why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ConfigError(
                f"{path}._target_={target!r} cannot be imported ({why}); allowed: an importable class or function"
            ) from None
        params = _parameters(obj)
        if params is None:
            continue
        for key in node:
            key = str(key)
            if key.startswith("_"):  # Hydra's own (_partial_, _convert_, ...)
                continue
            if key in SUPPLIED.get(path, {}):
                raise ConfigError(
                    f"{path}.{key}={_show(node, key)} is invalid: mlplab sets it ({SUPPLIED[path][key]}); "
                    f"allowed keys: {', '.join(_allowed_keys(params, SUPPLIED.get(path, {})))}"
                )
            if key not in params and not _takes_any_keyword(params):
                raise _unknown_key(path, node, key, params, SUPPLIED.get(path, {}))


#: ``_target_`` -> (the package it needs, the pyproject extra that installs it).
OPTIONAL_PACKAGES = {"lightning.pytorch.loggers.MLFlowLogger": ("mlflow", "mlflow")}


def _check_optional_package(path: str, target: str) -> None:
    """A target that needs an optional package which is not installed: one line naming the extra."""
    if target not in OPTIONAL_PACKAGES:
        return
    package, extra = OPTIONAL_PACKAGES[target]
    try:
        installed = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or one blocked by sys.modules[name] = None
        installed = False
    if not installed:
        group = path.split(".", 1)[0]
        label = _label(group)
        others = [o for o in group_options(group) if f"{group}={o}" != label]
        raise ConfigError(
            f'{label} needs the {package} package; install it with pip install -e ".[{extra}]"; '
            f"allowed without it: {group}={'|'.join(others)}"
        )


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    """(dotted path, node) of every ``_target_`` node under ``node`` (not under ``hydra``)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if not path and key == "hydra":
                continue
            child = node._get_node(key)  # the node itself: interpolations stay unresolved
            yield from _target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _target_nodes(node._get_node(i), f"{path}[{i}]")


def _check_top_level_keys(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # composed outside Hydra: no record of the primary config
        return
    hc = HydraConfig.get()
    config_name = hc.job.get("config_name")
    if not config_name:
        return
    # Cheap first: the group choices and the primary file's own keys; compose only when a key is in neither.
    quick = set(hc.runtime.choices) | _primary_file_keys(hc, config_name)
    if all(key == "hydra" or key in quick for key in cfg):
        return
    known = _reference_keys(hc, config_name)
    if known is None:
        return
    for key in cfg:
        if key == "hydra" or key in known:
            continue
        hint = difflib.get_close_matches(str(key), sorted(known), n=1)
        raise ConfigError(
            f"{key}={_show(cfg, str(key))} is invalid: {config_name}.yaml and its config groups define no such "
            f"top-level key; allowed keys: {', '.join(sorted(known))}" + (f" (did you mean {hint[0]}?)" if hint else "")
        )


def _main_config_dir(hc: Any) -> str | None:
    main = next((s for s in hc.runtime.config_sources if s.provider == "main" and s.schema == "file"), None)
    return str(main.path) if main is not None else None


def _primary_file_keys(hc: Any, config_name: str) -> set[str]:
    config_dir = _main_config_dir(hc)
    try:
        primary = OmegaConf.load(Path(config_dir) / f"{config_name}.yaml") if config_dir else None
    except Exception:
        return set()
    return {str(k) for k in primary if k != "defaults"} if isinstance(primary, DictConfig) else set()


def _reference_keys(hc: Any, config_name: str) -> set[str] | None:
    """The top-level keys of the primary config composed with the run's group choices but
    without the keys its overrides add; None if that cannot be composed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [str(o) for o in hc.overrides.task]

    def reference(groups: set[str]) -> set[str]:
        kept = [o for o in overrides if not _adds_top_level_key(o, groups)]
        return {str(k) for k in compose(config_name, overrides=kept) if k != "hydra"}

    try:
        if GlobalHydra.instance().is_initialized():  # inside @hydra.main
            return reference(_top_level_groups())
        config_dir = _main_config_dir(hc)
        if config_dir is None:
            return None
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return reference(_top_level_groups())
    except Exception:  # the check is a courtesy: a config Hydra composed is not refused for it
        return None


def _top_level_groups() -> set[str]:
    from hydra.core.global_hydra import GlobalHydra

    return set(GlobalHydra.instance().config_loader().list_groups(""))


def _adds_top_level_key(override: str, groups: set[str]) -> bool:
    """``+foo=1``, ``++foo.bar=2``: an override that may add a key the config lacks
    (``+group=option`` selects a config group: kept)."""
    if not override.startswith("+"):
        return False
    key = override.lstrip("+").split("=", 1)[0].split("@", 1)[0]
    return key.split("/", 1)[0] not in groups or "." in key


# -- signatures and messages --------------------------------------------------------------------


def _locate(target: str) -> Any:
    """The object a ``_target_`` names (Hydra's lookup, without its log line on failure)."""
    hydra_log = logging.getLogger("hydra.utils")
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(target)
    finally:
        hydra_log.disabled = disabled


def _parameters(obj: Any) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return None


def _takes_any_keyword(params: dict[str, inspect.Parameter]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _allowed_keys(params: dict[str, inspect.Parameter], supplied: Any = ()) -> list[str]:
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in params.items() if p.kind in named and n != "self" and n not in supplied]


def _unknown_key(
    path: str, node: DictConfig, key: str, params: dict[str, inspect.Parameter], supplied: Any
) -> ConfigError:
    allowed = _allowed_keys(params, supplied)
    hint = difflib.get_close_matches(key, allowed, n=1)
    return ConfigError(
        f"{path}.{key}={_show(node, key)} is invalid: {node.get('_target_')} has no such option; "
        f"allowed keys: {', '.join(allowed)}" + (f" (did you mean {hint[0]}?)" if hint else "")
    )


def _show(node: DictConfig, key: str) -> str:
    """``node[key]`` as a message shows it: strings quoted, containers as plain lists/dicts."""
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception:  # an interpolation that cannot be resolved here
        value = node._get_node(key)._value()
    return repr(value) if isinstance(value, str) else str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _label(path: str) -> str:
    """``scheduler=onecycle`` for a config group's node (the option chosen), else its path."""
    from hydra.core.hydra_config import HydraConfig

    if "." not in path and HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(path)
        if choice:
            return f"{path}={choice}"
    return path


def _overridden_keys(path: str) -> list[str]:
    """Keys of the node at ``path`` that this run's command line sets (``scheduler.T_max=0``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = []
    for override in HydraConfig.get().overrides.task:
        key = str(override).lstrip("+~").split("=", 1)[0]
        if key.startswith(f"{path}."):
            keys.append(key[len(path) + 1 :].split(".", 1)[0])
    return keys


def _culprits(path: str, node: DictConfig, text: str) -> list[str]:
    """The node's keys to name: those the message mentions and the command line sets, else
    those it mentions, else those the command line sets, else all of them."""
    keys = [str(k) for k in node if not str(k).startswith("_")]
    keys = [k for k in keys if not (isinstance(node._get_node(k), DictConfig) and "_target_" in node._get_node(k))]
    mentioned = [k for k in keys if re.search(rf"(?<![A-Za-z0-9_]){re.escape(k)}(?![A-Za-z0-9_])", text, re.IGNORECASE)]
    overridden = [k for k in keys if k in _overridden_keys(path)]
    return [k for k in mentioned if k in overridden] or mentioned or overridden or keys


def _default(params: dict[str, inspect.Parameter] | None, key: str) -> str | None:
    if not params or key not in params:
        return None
    default = params[key].default
    return f"{key} has no default" if default is inspect.Parameter.empty else f"default {key}={default!r}"


def rejected(path: str, node: DictConfig, err: BaseException, when: str = "") -> ConfigError:
    """A third-party constructor's refusal as one line: the group, its target, the values."""
    text = _first_line(err)
    target = str(node.get("_target_"))
    try:
        params = _parameters(_locate(target))
    except Exception:
        params = None
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", text) if isinstance(err, TypeError) else None
    if unexpected and params is not None and unexpected.group(1) in node:
        return _unknown_key(path, node, unexpected.group(1), params, SUPPLIED.get(path, {}))
    keys = _culprits(path, node, text)
    shown = ", ".join(f"{path}.{k}={_show(node, k)}" for k in keys)
    if not isinstance(err, (ValueError, MisconfigurationException)):
        text = f"{type(err).__name__}: {text}"
    defaults = [d for d in (_default(params, k) for k in keys) if d]
    short = target.rsplit(".", 1)[-1]
    allowed = f"values {short} accepts" + (f" ({', '.join(defaults)})" if defaults else "")
    return ConfigError(f"{_label(path)}: {target} rejected the config ({shown}){when}: {text}; allowed: {allowed}")


def _refusal(err: BaseException) -> bool:
    """Whether a :data:`USER_ERRORS` exception is a constructor refusing the config: Lightning's
    MisconfigurationException, a keyword it does not take, or one raised outside mlplab's own
    code (raised in mlplab, it is a bug there: kept as a traceback)."""
    if isinstance(err, MisconfigurationException) or "unexpected keyword argument" in str(err):
        return True
    tb: TracebackType | None = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is None or not last.tb_frame.f_code.co_filename.startswith(_MLPLAB_DIR)


# -- building -----------------------------------------------------------------------------------


def _instantiate_checked(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``instantiate``, with a constructor's user error as one ConfigError line.

    Hydra wraps any exception raised by a ``_target_`` in an ``InstantiationException``;
    unwrapped, our own MlplabError comes through as itself, and a third-party refusal
    (:data:`USER_ERRORS`, a key the target does not take) becomes :func:`rejected`'s line,
    naming the (nested) node that failed.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        innermost, cause = err, err.__cause__
        while isinstance(cause, InstantiationException):
            innermost, cause = cause, cause.__cause__
        if isinstance(cause, MlplabError):
            raise cause from None
        if isinstance(cause, USER_ERRORS) and _refusal(cause):
            path, failed = _failed_node(group, node, str(innermost))
            raise rejected(path, failed, cause) from None
        raise


def _failed_node(group: str, node: DictConfig, message: str) -> tuple[str, DictConfig]:
    """The (path, node) Hydra's message names (``full_key: data.augment``), else ``node``."""
    found = re.search(r"full_key: (\S+)", message)
    full_key = found.group(1) if found else ""
    if full_key.startswith(f"{group}."):
        sub = OmegaConf.select(node, full_key[len(group) + 1 :])
        if isinstance(sub, DictConfig):
            return full_key, sub
    return group, node


def _construct(path: str, node: DictConfig, build: Callable[[], Any], when: str = "") -> Any:
    """``build()``, a third-party constructor's refusal as :func:`rejected`'s line."""
    try:
        return build()
    except MlplabError:
        raise
    except USER_ERRORS as err:
        if not _refusal(err):
            raise
        raise rejected(path, node, err, when) from None


def _instantiate_group(group: DictConfig | None, name: str = "") -> list[Any]:
    """Every ``_target_`` entry of a dict-of-objects group (callbacks, logger)."""
    if not group:
        return []
    return [
        _instantiate_checked(node, f"{name}.{key}" if name else str(key))
        for key, node in group.items()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The ``callbacks`` group's objects."""
    return _instantiate_group(cfg.get("callbacks"), "callbacks")


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group's objects."""
    return _instantiate_group(cfg.get("logger"), "logger")


def build_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> Any:
    """The Lightning Trainer; ``kwargs`` are what the run passes (callbacks, logger, plugins)."""
    return _instantiate_checked(trainer_cfg, "trainer", **kwargs)


def build_datamodule(data_cfg: DictConfig) -> TensorDataModule:
    dm = _instantiate_checked(data_cfg, "data")
    if not isinstance(dm, TensorDataModule):
        raise ConfigError(f"data._target_={data_cfg.get('_target_')} is not an mlplab DataModule")
    return dm


def build_net(model_cfg: DictConfig, dm: TensorDataModule) -> Any:
    """The net sized from the data; one that this machine cannot hold is a ConfigError
    saying how many parameters and bytes it asked for (checked before allocating, where the
    net is an ``nn.Module``: built on the meta device first, which allocates nothing)."""
    sizes = {"input_dim": dm.input_dim, "num_classes": dm.num_classes}
    needed = _net_size(model_cfg, sizes)
    memory = _physical_memory()
    if needed is not None and memory is not None and needed[1] > memory:
        raise _too_large(model_cfg, needed, f"more than this machine's {_bytes(memory)} of memory")
    try:
        return _instantiate_checked(model_cfg, "model", **sizes)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if cause is not None and _is_allocation_error(cause):
            why = (
                "which this machine cannot allocate"
                if needed
                else "asked for more memory than this machine can allocate"
            )
            raise _too_large(model_cfg, needed, f"{why} ({_first_line(cause)})") from None
        raise


def _net_size(model_cfg: DictConfig, sizes: dict[str, int]) -> tuple[int, int] | None:
    """(parameters, bytes) of the net, built on the meta device; None if that cannot be done."""
    try:
        if not (inspect.isclass(obj := _locate(str(model_cfg.get("_target_")))) and issubclass(obj, torch.nn.Module)):
            return None
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = instantiate(model_cfg, **sizes)
    except Exception:  # the real build reports it
        return None
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _is_allocation_error(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and re.search(r"allocate|out of memory", str(err), re.IGNORECASE) is not None
    )


def _too_large(model_cfg: DictConfig, needed: tuple[int, int] | None, why: str) -> ConfigError:
    keys = _culprits("model", model_cfg, "")
    shown = ", ".join(f"model.{k}={_show(model_cfg, k)}" for k in keys)
    target = model_cfg.get("_target_")
    asked = (
        f"{target} would have {needed[0]:,} parameters ({_bytes(needed[1])}), {why}" if needed else f"{target} {why}"
    )
    return ConfigError(f"{shown} is too large: {asked}; allowed: a net that fits in memory (smaller sizes)")


def _bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError


def build_loss(cfg: DictConfig) -> ClassificationLoss:
    """The ``loss`` group's object (cross-entropy when the config has none, e.g. older checkpoints)."""
    node = cfg.get("loss")
    loss = _instantiate_checked(node, "loss") if node else CrossEntropy()
    if not isinstance(loss, ClassificationLoss):
        raise ConfigError(f"loss._target_={node.get('_target_')} is not an mlplab loss; allowed: {choices('loss')}")
    return loss


def build_optimizer(cfg: DictConfig, net: torch.nn.Module) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """(optimizer factory, schedule factory or None), as the LightningModule takes them.

    Both are built once here on ``net``'s parameters and thrown away (the schedule stepped
    twice, without stepping the optimizer: the parameters are untouched), so that a value
    their constructors refuse is a ConfigError now, not a traceback when training starts.
    """
    optimizer_factory = _instantiate_checked(cfg.optimizer, "optimizer")
    optimizer = _construct("optimizer", cfg.optimizer, lambda: optimizer_factory(params=net.parameters()))
    if not cfg.get("scheduler"):
        return optimizer_factory, None
    scheduler_factory = _instantiate_checked(cfg.scheduler, "scheduler")

    scheduler, _ = _construct(
        "scheduler",
        cfg.scheduler,
        lambda: build_scheduler(scheduler_factory, optimizer, total_steps=lambda: _TRIAL_TOTAL_STEPS),
    )

    def step_twice() -> None:
        with warnings.catch_warnings():  # "scheduler stepped before the optimizer": on purpose
            warnings.simplefilter("ignore")
            for _ in range(2):
                scheduler.step()

    _construct("scheduler", cfg.scheduler, step_twice, when=" when stepped")
    return optimizer_factory, scheduler_factory


def build_classifier(cfg: DictConfig, net: torch.nn.Module, num_classes: int) -> Any:
    """The run's :class:`~mlplab.models.Classifier` around ``net``: its optimizer and schedule
    (tried on the net first: a refused value fails here, before any Trainer), its loss, and
    the resolved config it stores in its checkpoints."""
    from mlplab.models import Classifier

    optimizer, scheduler = build_optimizer(cfg, net)
    return Classifier(
        net=net,
        num_classes=num_classes,
        optimizer=optimizer,
        scheduler=scheduler,
        config=OmegaConf.to_container(cfg, resolve=True),
        loss=build_loss(cfg),
    )

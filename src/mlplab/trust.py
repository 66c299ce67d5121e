"""What mlplab accepts from files it did not just write: a checkpoint's config, a run dir's overrides.

A checkpoint carries the run's config so that ``eval.py`` can rebuild data and net from
it, and ``resume=<dir>`` recomposes a run from ``<dir>/.hydra/overrides.yaml``. Both are
files people share, so both are read as untrusted:

- :func:`check_stored_config`: every ``_target_`` in a checkpoint's ``data``, ``model``
  and ``loss`` sections (nested ones included, e.g. ``data.augment``) must be one that
  the shipped config groups name (``conf/{data,model,loss,augment,optimizer,scheduler}``,
  read from the checkout, which is trusted); no other Hydra instantiation key
  (``_args_``, ``_recursive_`` ...) is accepted, and ``_partial_`` only where the shipped
  groups use it. Checked before anything is imported or built.
- :func:`check_stored_overrides`: a stored override may choose a config group option
  (the options are the shipped files) or set a plain value; it may not set a
  ``_target_`` or another instantiation key, touch ``hydra.*``, or point a path-like key
  (``*dir``, ``*file``, ``*path`` ...) anywhere but the data and log folders -- unless the
  user repeats that override on the ``resume=`` command line.

Anything else is one :class:`~mlplab.errors.CheckpointError` / :class:`ConfigError` line
before anything runs.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from mlplab.errors import CheckpointError, ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: The config groups whose objects a stored config may build (eval.py, resume=).
BUILT_GROUPS = ("data", "model", "loss", "augment", "optimizer", "scheduler")
#: Hydra's instantiation keys a stored config may hold (``_partial_`` only where the groups use it).
_PLAIN_SPECIAL = {"_target_", "_convert_"}
#: Path-like keys a stored override may set: data is read (and checked), logs go to the run dir.
_ALLOWED_PATH_KEYS = {"paths.log_dir", "paths.data_dir", "data.data_dir"}
_PATH_LIKE = re.compile(r"(dir|dirpath|file|filename|path|root)$", re.IGNORECASE)


def _targets_in(node: Any, partial: set[str]) -> Iterable[str]:
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            yield target
            if node.get("_partial_") is True:
                partial.add(target)
        for value in node.values():
            yield from _targets_in(value, partial)
    elif isinstance(node, list):
        for value in node:
            yield from _targets_in(value, partial)


@functools.cache
def _shipped_targets(conf_dir: Path = CONF_DIR) -> tuple[frozenset[str], frozenset[str]]:
    """(every ``_target_`` the built groups' yaml files name, those used with ``_partial_: true``)."""
    targets: set[str] = set()
    partial: set[str] = set()
    for group in BUILT_GROUPS:
        for path in sorted((conf_dir / group).glob("*.yaml")):
            targets.update(_targets_in(yaml.safe_load(path.read_text()) or {}, partial))
    return frozenset(targets), frozenset(partial)


def allowed_targets() -> frozenset[str]:
    return _shipped_targets()[0]


def _check_node(node: Any, where: str, source: str, partial_ok: bool) -> None:
    targets, partial_targets = _shipped_targets()
    if isinstance(node, list):
        for i, value in enumerate(node):
            _check_node(value, f"{where}[{i}]", source, partial_ok)
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if "_target_" in node and target not in targets:
        raise CheckpointError(
            f"{source} holds {where}._target_={target!r}, which is not one of mlplab's config-group classes, "
            f"so it is not built (nothing was run); allowed: {', '.join(sorted(targets))}"
        )
    for key in node:
        if not isinstance(key, str):
            raise CheckpointError(
                f"{source} holds a config with a non-text key at {where}; allowed: an mlplab run config"
            )
        special = key.startswith("_") and key.endswith("_")
        if special and key not in _PLAIN_SPECIAL and not (key == "_partial_" and partial_ok):
            raise CheckpointError(
                f"{source} holds {where}.{key}, which mlplab never builds from a stored config; "
                "allowed: the keys of mlplab's own config groups (_target_ of a shipped class)"
            )
    if node.get("_partial_") not in (None, False) and target not in partial_targets:
        raise CheckpointError(
            f"{source} holds {where}._partial_ for {target!r}; allowed: only for {', '.join(sorted(partial_targets))}"
        )
    for key, value in node.items():
        if not (key.startswith("_") and key.endswith("_")):
            _check_node(value, f"{where}.{key}", source, partial_ok)


def check_stored_config(config: Any, source: str, sections: Iterable[str] = ("data", "model", "loss")) -> None:
    """Refuse a stored config whose ``sections`` would build anything but mlplab's shipped classes."""
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source} holds no run config (found {type(config).__name__}); allowed: an mlplab checkpoint"
        )
    for section in sections:
        node = config.get(section)
        if node is None and section == "loss":
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise CheckpointError(f"{source} holds no buildable {section} config; allowed: an mlplab checkpoint")
        _check_node(node, section, source, partial_ok=section in ("optimizer", "scheduler"))


def _has_special_key(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if str(key).startswith("_") and str(key).endswith("_"):
                return str(key)
            found = _has_special_key(inner)
            if found:
                return found
    elif isinstance(value, list):
        for inner in value:
            found = _has_special_key(inner)
            if found:
                return found
    return None


def untrusted_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """(override, why) for each override that ``resume=`` applies only when the user repeats it.

    Raises :class:`ConfigError` if ``overrides`` is not a list of overrides Hydra can parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("something other than a list of overrides")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"an override Hydra cannot parse ({first})") from None
    found = []
    for override, text in zip(parsed, overrides):
        key = override.key_or_group
        segments = re.split(r"[./]", key)
        why = None
        if segments[0] == "hydra":
            why = "it changes Hydra itself (launcher, callbacks, dirs)"
        elif any(s.startswith("_") and s.endswith("_") for s in segments):
            why = "it sets an instantiation key"
        elif override.is_sweep_override():
            why = "it is a sweep"
        elif "/" not in key and _PATH_LIKE.search(segments[-1]) and key not in _ALLOWED_PATH_KEYS:
            why = "it points a path outside the run"
        else:
            try:
                value = override.value()
            except Exception:
                value = None
            special = _has_special_key(value)
            if special:
                why = f"its value holds {special}"
            elif ".." in segments or (
                isinstance(value, str)
                and key not in _ALLOWED_PATH_KEYS
                and (".." in value.split("/") or value.startswith(("/", "~")))
            ):
                # model=../../elsewhere/evil would compose a yaml file from outside conf/
                why = "it names a file outside the config groups"
        if why:
            found.append((text, why))
    return found


def check_stored_overrides(overrides: list[str], source: str, confirmed: Iterable[str] = ()) -> None:
    """Refuse stored overrides that could build or write anything a plain run of mlplab would not.

    An override the user repeats on the command line (``confirmed``) is theirs and passes:
    resuming a run that used ``+callbacks.mine._target_=my.Callback`` takes that override again
    (the ``resume with:`` line a run prints repeats them).
    """
    try:
        found = untrusted_overrides(overrides)
    except ConfigError as err:
        raise ConfigError(f"{source} holds {err}; allowed: the overrides.yaml Hydra wrote for a run") from None
    for text, why in found:
        if text not in set(confirmed):
            raise ConfigError(
                f"{source} holds the override {text!r}, which resume= does not apply: {why}; allowed: group choices "
                "and plain values, or that override repeated on the command line if you trust it"
            )

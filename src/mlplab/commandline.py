"""Hydra's own refusals of a command line, as mlplab's one line.

Before ``@hydra.main`` runs, the command line's overrides are composed once with Hydra's
compose API. Where Hydra would refuse them -- an option a config group does not have, a
key that does not exist -- the user gets one line in mlplab's style (what was wrong, what
is allowed, a "did you mean" where one is close) and exit code 2, before any output dir
exists::

    error: model=relu_mpl is not an option; allowed: numpy_mlp, relu_mlp, ... (did you mean relu_mlp?)
    error: modle is neither a config group nor a key; did you mean model=relu_mlp?
    error: optimizer.learning_rate is not a key of optimizer=sgd; allowed: lr, ... (did you mean lr?)

A sweep (``-m model=a,b``) has each of its values checked. ``HYDRA_FULL_ERROR=1`` skips
this and shows Hydra's full report, as Hydra users expect.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlplab.groups import group_options

EXIT_USER_ERROR = 2
#: Hydra's flags that take a value (``--cfg job``); ``--info`` takes one of these optionally.
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
#: Flags after which Hydra runs nothing of mlplab's (help, completion): nothing to check.
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


#: Groups the defaults list marks optional: Hydra skips a missing option of them without a word.
OPTIONAL_GROUPS = ("recipe",)


def command_overrides(args: list[str]) -> list[str] | None:
    """The overrides of a Hydra command line (its positional arguments); None where it runs no job."""
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in _NO_RUN_FLAGS:
            return None
        if arg in _VALUE_FLAGS:
            i += 2
            continue
        if arg in ("--info", "-i"):
            i += 2 if i + 1 < len(args) and args[i + 1] in _INFO_VALUES else 1
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return overrides


def _did_you_mean(word: str, candidates: list[str]) -> str | None:
    """The closest candidate by spelling, or by initials (``learning_rate`` -> ``lr``)."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    initials = "".join(part[0] for part in word.split("_") if part)
    return initials if len(initials) > 1 and initials in candidates else None


def _hint(word: str, candidates: list[str]) -> str:
    close = _did_you_mean(word, candidates)
    return f" (did you mean {close}?)" if close else ""


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name, overrides=overrides, return_hydra_config=True)


def _choices(cfg: DictConfig) -> dict[str, str]:
    return {str(k): str(v) for k, v in (OmegaConf.select(cfg, "hydra.runtime.choices", default={}) or {}).items()}


def _missing_option(message: str, overrides: list[str]) -> str | None:
    """``Could not find 'model/relu_mpl'`` -> the one line for ``model=relu_mpl``."""
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if not found:
        return None
    group, option = found.groups()
    return _not_an_option(group, option, group_options(group))


def _not_an_option(group: str, option: str, options: list[str]) -> str:
    """The one line for ``group=option`` where ``option`` is not one of the group's ``options``."""
    return f"{group}={option} is not an option; allowed: {', '.join(options)}{_hint(option, options)}"


def _unknown_key(key: str, value: Any, config_name: str, others: list[str], conf_dir: Path) -> str:
    """The one line for ``key=value`` where ``key`` is not in the config."""
    cfg = _compose(config_name, others)
    choices = _choices(cfg)
    groups = sorted({g for g in choices if not g.startswith("hydra")})
    if "." not in key:
        top_keys = sorted(k for k in cfg if k != "hydra" and k not in groups)
        close = _did_you_mean(key, groups + top_keys)
        if close in groups:
            shown = value if isinstance(value, str) and value in group_options(close) else "..."
            return f"{key} is neither a config group nor a key; did you mean {close}={shown}?"
        if close is not None:
            return f"{key} is neither a config group nor a key; did you mean {close}={value}?"
        return f"{key} is neither a config group nor a key; allowed: the groups {', '.join(groups)}; the keys {', '.join(top_keys)}"
    parent, leaf = key.rsplit(".", 1)
    node = OmegaConf.select(cfg, parent, default=None)
    if not isinstance(node, DictConfig):
        return f"{key} is not a key: {parent} holds no keys; allowed: a key of the composed config (python src/train.py --cfg job)"
    keys = [str(k) for k in node if not (str(k).startswith("_") and str(k).endswith("_"))]
    top = parent.split(".")[0]
    owner = f"{top}={choices[top]}" if top in choices and parent == top else parent
    where_else = [
        f"{top}={option}"
        for option in group_options(top)
        if top in choices
        and parent == top
        and option != choices[top]
        and leaf in _yaml_keys(conf_dir / top / f"{option}.yaml")
    ]
    elsewhere = f"; {key} is a key of {', '.join(where_else)}" if where_else else ""
    return f"{key} is not a key of {owner}; allowed: {', '.join(keys)}{_hint(leaf, keys)}{elsewhere}"


def _yaml_keys(path: Path) -> set[str]:
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        return set()
    return {str(k) for k in loaded} if isinstance(loaded, dict) else set()


def _first_values(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the overrides with each sweep replaced by its first value, the sweeps of group options to check).

    Sweeps Hydra's own sweeper cannot list (an Optuna ``interval(...)``) are left to the sweeper.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    plain, sweeps = [], []
    for override, text in zip(parsed, overrides):
        if not override.is_sweep_override():
            plain.append(text)
            continue
        try:
            values = [str(v) for v in override.sweep_string_iterator()]
        except Exception:
            continue  # a sweeper's own distribution: the sweeper checks it
        if not values:
            continue
        prefix = text.split("=", 1)[0]
        plain.append(f"{prefix}={values[0]}")
        sweeps.append((prefix, values))
    return plain, sweeps


def check(overrides: list[str], config_name: str, conf_dir: Path) -> None:
    """Raise :class:`_Refused` with one line if Hydra would refuse ``overrides``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    try:
        plain, sweeps = _first_values(overrides)
    except OverrideParseException as err:
        raise _Refused(f"{_first_line(err)}; allowed: key=value overrides (Hydra's grammar)") from None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            for prefix, values in sweeps:  # each option of a swept group exists
                group = prefix.lstrip("+~")
                options = group_options(group) if "." not in group else []
                for value in values if options else []:
                    if value not in options:
                        raise _Refused(_not_an_option(group, value, options))
            for override in plain:  # an optional group (recipe: ${data}) skips a missing option silently
                key, _, value = override.partition("=")
                options = group_options(key) if key in OPTIONAL_GROUPS else None
                if options is not None and value not in options:
                    raise _Refused(_not_an_option(key, value, options))
            try:
                composed = _compose(config_name, plain)
            except MissingConfigException as err:
                line = _missing_option(str(err), plain)
                raise _Refused(line or _first_line(err)) from None
            except ConfigCompositionException as err:
                found = re.search(r"Could not override '([^']+)'", str(err))
                cause = str(err.__cause__ or "")
                if not found or "not in struct" not in cause:
                    raise _Refused(_first_line(err)) from None
                key = found.group(1)
                index = next(i for i, o in enumerate(plain) if o.lstrip("+~").split("=", 1)[0] == key)
                value = plain[index].split("=", 1)[1] if "=" in plain[index] else None
                raise _Refused(
                    _unknown_key(key, value, config_name, plain[:index] + plain[index + 1 :], conf_dir)
                ) from None
            from mlplab.population.launcher import options_refusal

            refused = options_refusal(composed)
            if refused is not None:
                raise _Refused(refused)
    finally:
        GlobalHydra.instance().clear()


def check_command_line(argv: list[str], config_name: str, conf_dir: str | os.PathLike) -> None:
    """One line and exit 2 where Hydra would refuse ``argv``'s overrides (not with ``HYDRA_FULL_ERROR=1``)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    overrides = command_overrides(argv[1:])
    if not overrides:
        return
    try:
        check(overrides, config_name, Path(conf_dir))
    except _Refused as refused:
        print(f"error: {refused}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

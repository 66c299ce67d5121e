"""The options of a config group, read from the config repository, for "allowed:" messages.

Error messages list a group's options from where Hydra finds them (``conf/<group>/*.yaml``),
so the lists are never written twice.
"""

from __future__ import annotations

from pathlib import Path

#: conf/ beside the package (src/mlplab -> the repository root).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def group_options(group: str) -> list[str]:
    """The sorted options of config group ``group`` (e.g. ``"data"``).

    Inside a running Hydra app, from its config repository (which includes any
    ``--config-dir`` or ``hydra.searchpath``); otherwise from ``conf/`` beside the package.
    """
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if gh.is_initialized():
        names = gh.config_loader().get_group_options(group)
    else:
        names = [p.stem for p in (CONF_DIR / group).glob("*.yaml")]
    return sorted(names)


def choices(group: str) -> str:
    """``group=a|b|c``, as an "allowed:" message writes a group's options."""
    options = group_options(group)
    return f"{group}={'|'.join(options)}" if options else f"{group}=<an option of conf/{group}/>"

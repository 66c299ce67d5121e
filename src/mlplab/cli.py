"""Entry-point plumbing shared by ``src/train.py`` and ``src/eval.py``."""

from __future__ import annotations

import os
import secrets
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from mlplab.errors import MlplabError

EXIT_USER_ERROR = 2


def register_resolvers() -> None:
    """``${uid:}``: a short random token, the same for every use within one process.

    Run and sweep dirs end in ``<time>_<uid>``, so two jobs started in the same second
    never share a dir. DDP child ranks receive the parent's resolved dir explicitly.
    """
    token = secrets.token_hex(3)
    OmegaConf.register_new_resolver("uid", lambda: token, replace=True)


def set_project_root(entry_file: str) -> None:
    """``paths.root_dir`` defaults to the checkout holding ``src/<entry>.py``."""
    os.environ.setdefault("MLPLAB_ROOT", str(Path(entry_file).resolve().parents[1]))


def user_errors_exit(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn an :class:`MlplabError` into one line on stderr and exit code 2."""

    @wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except MlplabError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper

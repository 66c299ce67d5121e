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


_UID = secrets.token_hex(3)


def register_resolvers() -> None:
    """The resolvers our configs use; idempotent, and already done when this module is imported.

    - ``${uid:}``: a short random token, the same for every use within one process. Run
      and sweep dirs end in ``<time>_<uid>``, so two runs started in the same second never
      share a dir. Like Hydra's ``${now:}`` it is cached in the config, and Hydra copies
      the launching process's cache into every job's config: a sweep dir is resolved once
      and all its jobs land in it, also when a launcher (joblib, submitit) runs them in
      other processes. DDP child ranks receive the parent's resolved dir explicitly.
    - ``${job_dirname:num,overrides}``: a sweep job's dir name, ``<num>_<its overrides>``
      made filesystem-safe (:func:`mlplab.sweeps.job_dirname`).

    Launcher workers unpickle the job function, which imports this module: the resolvers
    exist there before Hydra resolves the job's output dir.
    """
    from mlplab.sweeps import job_dirname

    OmegaConf.register_new_resolver("uid", lambda: _UID, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


register_resolvers()


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

"""Entry-point plumbing shared by ``src/train.py`` and ``src/eval.py``."""

from __future__ import annotations

import os
import secrets
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from mlplab.distributed import ddp_job, external_rank_argv
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
    """``paths.root_dir`` defaults to the checkout holding ``src/<entry>.py``.

    The entry script is recorded too (``MLPLAB_ENTRY``): DDP child ranks re-run it, also
    from sweep launchers whose workers are not started from the script.
    """
    os.environ.setdefault("MLPLAB_ROOT", str(Path(entry_file).resolve().parents[1]))
    os.environ["MLPLAB_ENTRY"] = str(Path(entry_file).resolve())


def prepare_argv() -> None:
    """Adjust ``sys.argv`` before Hydra parses it, for ranks started by torchrun/srun.

    See :func:`mlplab.distributed.external_rank_argv`; a bad launch is one line on
    stderr and exit code 2, before any output dir exists.
    """
    try:
        sys.argv = external_rank_argv(sys.argv)
    except MlplabError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def user_errors_exit(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn an :class:`MlplabError` into one line on stderr and exit code 2.

    The task runs inside :func:`~mlplab.distributed.ddp_job`, so the DDP ranks of one job
    of a sweep are gone before the next job starts.
    """

    @wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            with ddp_job():
                return task(cfg)
        except MlplabError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper

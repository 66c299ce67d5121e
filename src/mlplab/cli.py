"""Entry-point plumbing shared by ``src/train.py`` and ``src/eval.py``."""

from __future__ import annotations

import os
import secrets
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from mlplab.errors import MlplabError, RunInterrupted

EXIT_USER_ERROR = 2
#: Exit codes of a run stopped by a signal: the shell's 128 + signal number.
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


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
        except RunInterrupted as err:
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED.get(err.signal_name, 130))
        except MlplabError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def expand_resume(argv: list[str]) -> list[str]:
    """``train.py resume=DIR [overrides]`` -> the run's own overrides, then these, in DIR.

    The config is recomposed from ``DIR/.hydra/overrides.yaml`` (so it is the run's
    config), ``hydra.run.dir`` is DIR (same checkpoints, same TensorBoard run, ``train.log``
    appended) and Hydra does not rewrite ``DIR/.hydra``. Extra overrides apply on top,
    e.g. ``trainer.max_epochs=20`` to train longer. A bad DIR is one line and exit 2.
    """
    args = argv[1:]
    resumes = [a for a in args if a.startswith("resume=")]
    if not resumes or resumes[-1] == "resume=null":
        return argv
    value = resumes[-1].split("=", 1)[1]
    run_dir = Path(value).expanduser().resolve()
    stored = run_dir / ".hydra" / "overrides.yaml"

    def fail(why: str) -> None:
        print(f"error: resume={value} {why}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

    if any(a in ("-m", "--multirun") for a in args):
        fail("cannot be combined with --multirun; allowed: resume one run dir at a time")
    if not stored.is_file():
        fail("is not a run dir (no .hydra/overrides.yaml); allowed: the output dir of an earlier train run, "
             "e.g. resume=logs/runs/<date>/<time>_<uid>")
    overrides = [str(o) for o in OmegaConf.load(stored) if not str(o).startswith(("resume=", "ckpt_path="))]
    rest = [a for a in args if not a.startswith("resume=")]
    return [argv[0], *overrides, *rest, f"resume={run_dir}", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]

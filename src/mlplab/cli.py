"""Entry-point plumbing shared by ``src/train.py`` and ``src/eval.py``.

:func:`run_job` runs a task (``fit`` or ``evaluate``) under the rules every job follows:

- it ends by writing ``<output_dir>/run.json`` (:mod:`mlplab.runs`) on rank 0;
- a user error (:class:`~mlplab.errors.MlplabError`) is one line on stderr, never a traceback;
- a single run that fails before training started leaves nothing in ``logs/`` (its dir
  holds only Hydra's own files, which are removed) and exits 2; after training started the
  dir is kept, marked failed;
- in a multirun a failing job is recorded and the sweep goes on, unless ``fail_fast``;
- under DDP (:mod:`mlplab.distributed`) the job's child ranks, process group and launch
  environment end with the job.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mlplab import runs
from mlplab.distributed import ddp_job, external_rank_argv
from mlplab.errors import MlplabError

EXIT_USER_ERROR = 2
log = logging.getLogger("mlplab")


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


def _hydra_job() -> tuple[bool, list[str]]:
    """(is this job part of a multirun, the job's own overrides); (False, []) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, []
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN, list(hc.overrides.task)


def _only_hydra_files(out: Path) -> bool:
    """True if ``out`` holds nothing but Hydra's ``.hydra/`` and ``*.log`` files."""
    return all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log") for p in out.iterdir())


def _remove_run_dir(out: Path, log_dir: Path | None) -> None:
    """Remove a dir of Hydra's own files and the parents it leaves empty, up to ``log_dir``."""
    shutil.rmtree(out, ignore_errors=True)
    parent = out.resolve().parent
    while log_dir is not None and parent != log_dir and log_dir in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_job(cfg: DictConfig, task: Callable[[DictConfig], dict[str, float]]) -> Any:
    """Run ``task(cfg)`` and record its outcome; returns ``cfg.optimized_metric``'s value (or None)."""
    multirun, overrides = _hydra_job()
    out_value = OmegaConf.select(cfg, "paths.output_dir", default=None)
    out = Path(out_value) if out_value else None
    log_value = OmegaConf.select(cfg, "paths.log_dir", default=None)
    log_dir = Path(log_value).resolve() if log_value else None
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    runs.reset_training_started()

    def record(status: str, error: str | None, metrics: dict[str, float]) -> None:
        if out is None or rank_zero_only.rank != 0:
            return
        epochs = metrics.pop("epochs", None)
        runs.write_run_record(out, {
            "status": status,
            "error": error,
            "metrics": metrics,
            "epochs": None if epochs is None else int(epochs),
            "wall_s": round(time.perf_counter() - t0, 3),
            "overrides": overrides,
            "output_dir": str(out),
            "task_name": cfg.get("task_name"),
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })

    try:
        # The job's DDP ranks end with it: a sweep's next job starts from scratch.
        with ddp_job():
            metrics = dict(task(cfg))
    except MlplabError as err:
        message = _one_line(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if rank_zero_only.rank == 0 and out is not None and out.is_dir():
            if not multirun and not runs.training_started() and _only_hydra_files(out):
                _remove_run_dir(out, log_dir)
            else:
                record("failed", message, {})
        if not multirun or cfg.get("fail_fast", False):
            sys.exit(EXIT_USER_ERROR)
        return None
    except Exception as err:  # a bug, or the machine (out of memory ...): keep the traceback
        record("failed", f"{type(err).__name__}: {_one_line(err)}", {})
        if not multirun or cfg.get("fail_fast", False):
            raise
        log.exception("job failed; the sweep goes on (fail_fast=false)")
        return None
    record("ok", None, dict(metrics))
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None

"""The run record: ``<output_dir>/run.json``, one per train or eval job.

Every job ends by writing it (rank 0 only), whatever happened::

    {"status": "ok" | "failed" | "interrupted", "error": "one line" | null,
     "metrics": {"val/acc_best": 0.96, "test/acc": 0.95, ...}, "epochs": 10,
     "wall_s": 7.3, "overrides": ["model=simple_net"], "output_dir": "...",
     "task_name": "train", "started": "2026-11-23T14:00:00+00:00", "finished": "..."}

It is the single source of a job's outcome for anything that looks at runs afterwards
(the sweep summary, notebooks, scripts), whichever launcher ran the job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlplab.atomic import atomic_write_text, storage_error

RUN_FILE = "run.json"

_started = False


def mark_training_started() -> None:
    """Called just before the first training step is set up: from here on a failed run keeps its dir."""
    global _started
    _started = True


def training_started() -> bool:
    return _started


def reset_training_started() -> None:
    global _started
    _started = False


def write_run_record(output_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<output_dir>/run.json`` atomically (a reader never sees half a file).

    Through :func:`mlplab.atomic.atomic_write_text`: no planted symlink is written through,
    and a full disk or read-only folder is one :class:`~mlplab.errors.StorageError` line.
    """
    path = Path(output_dir) / RUN_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, path) from None
    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_run_record(job_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job's record, or None if it has none (never finished) or it is not a record (unparsable, not an object)."""
    path = Path(job_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None

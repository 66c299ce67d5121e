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
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlplab import rundir, runs, signals
from mlplab.atomic import remove_stale_partials
from mlplab.errors import ConfigError, MlplabError, RunInterrupted

EXIT_USER_ERROR = 2
#: Exit codes of a run stopped by a signal: the shell's 128 + signal number.
EXIT_INTERRUPTED = signals.EXIT_CODES
log = logging.getLogger("mlplab")


def register_resolvers() -> None:
    """The resolvers our configs use.

    - ``${uid:}``: a short random token, the same for every use within one process. Run
      and sweep dirs end in ``<time>_<uid>``, so two runs started in the same second never
      share a dir. DDP child ranks receive the parent's resolved dir explicitly. Launchers
      that run sweep jobs in other processes (joblib, submitit) hand them the launching
      process's resolvers with Hydra's singleton state, token included, so all jobs of a
      sweep land in one sweep dir (tested with both).
    - ``${job_dirname:num,overrides}``: a sweep job's dir name, ``<num>_<its overrides>``
      made filesystem-safe (:func:`mlplab.sweeps.job_dirname`).
    - ``${basename:path}``: the last part of a path (``logger=mlflow`` names its run after the run dir).
    """
    from mlplab.sweeps import job_dirname

    token = secrets.token_hex(3)
    OmegaConf.register_new_resolver("uid", lambda: token, replace=True)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    OmegaConf.register_new_resolver("basename", lambda path: Path(str(path)).name, replace=True)


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
    if "TORCHELASTIC_RUN_ID" not in os.environ and "SLURM_NTASKS" not in os.environ:
        return  # neither torchrun nor srun (what Lightning detects them by): torch need not load yet
    from mlplab.distributed import external_rank_argv

    try:
        sys.argv = external_rank_argv(sys.argv)
    except MlplabError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


#: What marks a dir as holding a run (a sweep dir holds job dirs: any entry at all); TensorBoard's
#: event files lie in the run dir itself (``tensorboard/`` in runs made before that).
RUN_ARTIFACTS = (".hydra", runs.RUN_FILE, "checkpoints", "tensorboard", "csv")
EVENT_FILES = "events.out.tfevents.*"


class CheckOutputDir(Callback):
    """A Hydra callback, before Hydra makes the run (or sweep) dir and writes into it.

    - a dir that already holds an earlier run is refused: nothing of it is overwritten
      (``resume=<dir>`` continues a run; the default dirs are unique per run);
    - a dir that cannot be created or written is one line on stderr, not Hydra's traceback.

    Both are one line and exit 2. DDP's extra ranks and ``resume=`` run with
    ``hydra.output_subdir=null`` in an existing dir on purpose, so they skip the first check.
    """

    def _check(self, key: str, directory: Any, fresh: bool) -> None:
        path = Path(str(directory))

        def fail(why: str, allowed: str) -> None:
            print(f"error: {key}={directory} {why}; allowed: {allowed}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

        # A run's own files (not logs: DDP ranks may already be writing theirs).
        if (
            fresh
            and path.is_dir()
            and (any((path / name).exists() for name in RUN_ARTIFACTS) or any(path.glob(EVENT_FILES)))
        ):
            fail(
                "already holds an earlier run, which is never overwritten",
                f"a new dir (leave {key} at its default, unique per run), or resume=<run dir> to continue a run",
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            fail(f"cannot be written ({err.strerror or err})", "a writable folder (set paths.log_dir, or " + key + ")")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        fresh = config.hydra.output_subdir is not None
        if fresh:  # what is there before this run, so that a failed run removes only what it made
            rundir.note_birth(str(config.hydra.run.dir))
        self._check("hydra.run.dir", config.hydra.run.dir, fresh=fresh)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        if sweep.is_dir() and any(sweep.iterdir()):
            print(
                f"error: hydra.sweep.dir={sweep} already holds an earlier sweep, which is never overwritten; "
                "allowed: a new dir (leave hydra.sweep.dir at its default, unique per sweep)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(EXIT_USER_ERROR)
        self._check("hydra.sweep.dir", sweep, fresh=False)


def _hydra_job() -> tuple[bool, list[str]]:
    """(is this job part of a multirun, the job's own overrides); (False, []) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, []
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN, list(hc.overrides.task)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_job(cfg: DictConfig, task: Callable[[DictConfig], dict[str, float]]) -> Any:
    """Run ``task(cfg)`` and record its outcome; returns ``cfg.optimized_metric``'s value (or None).

    The run dir is held by this process for the job (:func:`mlplab.rundir.hold`). Its
    ``run.json`` is a record: a command refused before training never touches an existing
    one, and a resumed run keeps the metrics its earlier part recorded unless it measures
    them again. A run that fails before training removes exactly what it created.
    """
    from lightning.pytorch.utilities import rank_zero_only

    from mlplab.distributed import ddp_job

    multirun, overrides = _hydra_job()
    out_value = OmegaConf.select(cfg, "paths.output_dir", default=None)
    out = Path(out_value) if out_value else None
    rank0 = rank_zero_only.rank == 0
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    runs.reset_training_started()
    previous = runs.read_run_record(out) if out is not None else None

    def record(status: str, error: str | None, metrics: dict[str, float]) -> None:
        if out is None or not rank0:
            return
        if not runs.training_started() and (previous is not None or cfg.get("resume") is not None):
            return  # a refused resume (or one stopped before training) leaves the dir's record as it was
        epochs = metrics.pop("epochs", None)
        if previous is not None and isinstance(previous.get("metrics"), dict):  # a resumed run's earlier part
            kept = {
                k: v for k, v in previous["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            metrics = {**kept, **metrics}
        try:
            runs.write_run_record(
                out,
                {
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
                },
            )
        except MlplabError as err:  # a full disk: say so, the exit code still tells the outcome
            print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)

    def fail(message: str, code: int) -> None:
        """A user error: one line; before training, remove what this run made; else mark it failed."""
        print(f"error: {message}", file=sys.stderr, flush=True)
        birth = rundir.birth_of(out) if out is not None else None
        if rank0 and not multirun and not runs.training_started() and birth is not None:
            rundir.remove_what_the_run_made(birth)
        else:
            record("failed", message, {})
        if not multirun or cfg.get("fail_fast", False):
            sys.exit(code)

    sweep_dir = _sweep_dir() if multirun else None
    # Between the jobs of a sweep the handler stays, in the process Hydra's launcher runs
    # them in (the entry script's); anywhere else (a test, a notebook) it goes with the job.
    between_jobs = sweep_dir is not None and _is_entry_process()
    signals.JOB.install()
    if between_jobs:
        signals.JOB.between_jobs = signals.stop_sweep_between_jobs(
            sweep_dir, cfg.get("optimized_metric") or "val/acc_best"
        )
    signals.JOB.start_job()
    try:
        # One process per run dir; the job's DDP ranks end with it.
        with _held(out, cfg, rank0), ddp_job():
            check_resumable(cfg, previous)
            metrics = dict(task(cfg))
            if signals.JOB.received:  # a signal the task finished through
                raise RunInterrupted(f"stopped by {signals.JOB.received}", signals.JOB.received)
    except (RunInterrupted, KeyboardInterrupt) as err:  # SIGINT/SIGTERM: last.ckpt is good; a sweep stops
        name = getattr(err, "signal_name", "SIGINT")
        message = _one_line(err) if isinstance(err, RunInterrupted) else "stopped by SIGINT"
        if (
            "resume with:" not in message
            and out is not None
            and cfg.get("task_name") == "train"
            and runs.training_started()
        ):
            message += f"; resume with: {rundir.resume_command(out, overrides)}"
        print(f"interrupted: {message}", file=sys.stderr, flush=True)
        record("interrupted", message, dict(getattr(err, "metrics", {})))
        if sweep_dir is not None:
            _summarise_stopped_sweep(sweep_dir, cfg)
        sys.exit(signals.EXIT_CODES.get(name, 130))
    except MlplabError as err:
        fail(_one_line(err), EXIT_USER_ERROR)
        return None
    except Exception as err:  # a bug, or the machine (out of memory ...): keep the traceback
        record("failed", f"{type(err).__name__}: {_one_line(err)}", {})
        if not multirun or cfg.get("fail_fast", False):
            raise
        log.exception("job failed; the sweep goes on (fail_fast=false)")
        return None
    finally:
        signals.JOB.end_job()
        if not between_jobs:
            signals.JOB.between_jobs = None
            signals.JOB.uninstall()
    record("ok", None, dict(metrics))
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


@contextmanager
def _held(out: Path | None, cfg: DictConfig, rank0: bool) -> Iterator[None]:
    """Hold the run dir (rank 0 of a job with an output dir); DDP's other ranks share their parent's."""
    if out is None or not rank0 or not out.is_dir():
        yield
        return
    with rundir.hold(out, "resume" if cfg.get("resume") is not None else "hydra.run.dir"):
        checkpoints = out / "checkpoints"  # not followed if it is a link: only the run's own folder is cleaned
        removed = [] if checkpoints.is_symlink() else remove_stale_partials(checkpoints, suffix=".ckpt")
        if removed:
            log.info("removed %d partial file(s) a killed run left in %s", len(removed), out / "checkpoints")
        yield


def check_resumable(cfg: DictConfig, previous: dict | None) -> None:
    """``resume=`` of a run that completed: refused unless it trains longer (its record stays whole)."""
    if cfg.get("resume") is None or previous is None or previous.get("status") != "ok":
        return
    done = previous.get("epochs")
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if isinstance(done, int) and isinstance(max_epochs, int) and max_epochs <= done:
        raise ConfigError(
            f"resume={cfg.resume} completed its {done} epochs (run.json status ok), so there is nothing to resume; "
            f"allowed: resume={cfg.resume} trainer.max_epochs=N with N > {done} to train longer, "
            f"or python src/eval.py ckpt_path={Path(str(cfg.resume)) / 'checkpoints' / 'last.ckpt'} to test it"
        )


def _is_entry_process() -> bool:
    """Whether this process runs ``src/train.py`` itself (not a test or notebook calling run_job)."""
    entry = os.environ.get("MLPLAB_ENTRY")
    return bool(entry) and Path(sys.argv[0]).resolve() == Path(entry).resolve()


def _sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(str(HydraConfig.get().sweep.dir))
    except Exception:
        return None


def _summarise_stopped_sweep(sweep_dir: Path, cfg: DictConfig) -> None:
    from mlplab.sweeps import write_summary

    try:
        write_summary(sweep_dir, cfg.get("optimized_metric") or "val/acc_best")
        print(
            f"interrupted: the sweep stopped; the summary of its jobs so far is in {sweep_dir / 'summary.md'}",
            file=sys.stderr,
            flush=True,
        )
    except Exception as err:  # the exit must not turn into a traceback
        print(
            f"interrupted: the sweep stopped; its summary could not be written ({_one_line(err)})",
            file=sys.stderr,
            flush=True,
        )


def expand_resume(argv: list[str]) -> list[str]:
    """``train.py resume=DIR [overrides]`` -> the run's own overrides, then these, in DIR.

    The config is recomposed from ``DIR/.hydra/overrides.yaml`` (so it is the run's
    config), ``hydra.run.dir`` is DIR (same checkpoints, same TensorBoard run, ``train.log``
    appended) and Hydra does not rewrite ``DIR/.hydra``. Extra overrides apply on top,
    e.g. ``trainer.max_epochs=20`` to train longer. The stored overrides are untrusted
    (:func:`mlplab.trust.check_stored_overrides`). DIR may be quoted as Hydra quotes values
    (sweep job dirs hold ``=`` and ``,``). A bad DIR is one line and exit 2.
    """
    from mlplab.trust import check_stored_overrides

    args = argv[1:]
    resumes = [a for a in args if a.startswith("resume=")]
    if not resumes or resumes[-1] == "resume=null":
        return argv
    value = resumes[-1].split("=", 1)[1]
    run_dir = Path(rundir.unquote_hydra_value(value)).expanduser().resolve()
    stored = run_dir / ".hydra" / "overrides.yaml"

    def fail(why: str) -> None:
        print(f"error: resume={value} {why}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

    if any(a in ("-m", "--multirun") for a in args):
        fail("cannot be combined with --multirun; allowed: resume one run dir at a time")
    if not stored.is_file():
        fail(
            "is not a run dir (no .hydra/overrides.yaml); allowed: the output dir of an earlier train run, "
            "e.g. resume=logs/runs/<date>/<time>_<uid>"
        )
    rest = [a for a in args if not a.startswith("resume=")]
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(stored))
        if isinstance(loaded, list):  # the run's own resume= and ckpt_path= are not taken again
            loaded = [o for o in loaded if not (isinstance(o, str) and o.startswith(("resume=", "ckpt_path=")))]
        check_stored_overrides(loaded, f"resume={value}: {stored}", confirmed=rest)
    except MlplabError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Exception as err:
        fail(f"has an unreadable .hydra/overrides.yaml ({_one_line(err)}); allowed: a run dir as mlplab wrote it")
    overrides = [o for o in loaded if o not in rest]
    where = rundir.hydra_value(str(run_dir))
    return [argv[0], *overrides, *rest, f"resume={where}", f"hydra.run.dir={where}", "hydra.output_subdir=null"]

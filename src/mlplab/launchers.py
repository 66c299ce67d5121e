"""The ``hydra/launcher=joblib`` preset: sweep jobs in parallel, each in a process of its own.

``python src/train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=4 model=simple_net,relu_mlp``
runs up to ``n_jobs`` jobs at a time on this machine (``-1``: one per CPU core, ``-2``: all
but one). It replaces hydra-joblib-launcher's pool of loky workers, in which one dead
worker (``kill -9``, the out-of-memory killer, a crash in native code) raises
``TerminatedWorkerError`` in the sweep: every running job is killed, none gets its
``run.json`` and no summary is written. Here:

- each job runs in a fresh process (``multiprocessing``'s spawn context), started by one
  thread per concurrent slot; it receives Hydra's singleton state (the resolvers, so the
  ``${uid:}`` token and with it the sweep dir are the launching process's) and the sweep's
  config, and composes its own config, as hydra-joblib-launcher's ``execute_job`` does;
  its ``JobReturn`` comes back through a pipe, and results go back to Hydra in job order;
- a job process that ends without a result costs only its own job: the job is recorded
  ``failed`` (``run.json``, unless the job wrote its own) with a one-line reason such as
  ``the worker process running this job died (killed by signal 9 / SIGKILL)``, the other
  jobs go on, the summary is written and the sweep exits 1. With ``fail_fast=true`` no
  further job starts, and once the running ones end Hydra reports that reason (exit 1);
- a job that exits on its own (``fail_fast=true`` and a user error: exit 2; a job stopped
  by a signal sent to it: 130/143) stops the sweep as it does under the basic launcher:
  no further job starts, the running ones are sent SIGTERM (each stops at a batch
  boundary, resumable) and the sweep exits with that job's code;
- SIGINT or SIGTERM to the sweep's process is passed on to the running jobs, which stop
  as a single run does (``last.ckpt``, ``run.json`` ``interrupted``); no further job starts
  and the sweep exits 130/143. A job still running 60 s after the signal is killed.
  Each job process makes a process group of its own (its DDP ranks join it), so a Ctrl+C
  in the terminal reaches each job once, through the sweep, which signals the group (a
  second Ctrl+C stops the jobs at once); a job whose sweep process is gone (``kill -9``)
  stops itself as on SIGTERM.

As with loky's workers, each job's thread pools (OpenMP, MKL, OpenBLAS) are capped at
``cores // jobs at a time`` unless the environment already sets them.

Hydra instantiates launchers only from the ``hydra_plugins`` package: the class the preset
names is ``hydra_plugins.mlplab_launchers.JoblibLauncher``, a subclass of
:class:`ProcessLauncher` found by Hydra's plugin scan. hydra-joblib-launcher stores a
structured config of the same name (``hydra/launcher/joblib``), which Hydra would merge
into the preset (its deprecated automatic schema matching, with a warning and the loky
pool's keys): :func:`drop_joblib_plugin_config`, run by a search path plugin beside that
class, removes it when a config dir of the app has its own ``hydra/launcher/joblib.yaml``.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from mlplab import runs

log = logging.getLogger(__name__)

#: Seconds a job may take to stop after the sweep passed it a signal, before it is killed.
STOP_GRACE_S = 60.0
#: Seconds a job process may take to exit after it sent its result.
EXIT_GRACE_S = 60.0
#: Thread pool sizes capped in each job process, as loky caps them in its workers.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
#: hydra-joblib-launcher's structured config, as ConfigStore keeps it.
PLUGIN_CONFIG = ("hydra", "launcher", "joblib.yaml")


def _has_plugin_config(repo: dict[str, Any]) -> bool:
    return PLUGIN_CONFIG[-1] in repo.get(PLUGIN_CONFIG[0], {}).get(PLUGIN_CONFIG[1], {})


def drop_joblib_plugin_config(search_path: ConfigSearchPath | None = None) -> None:
    """Remove hydra-joblib-launcher's ``hydra/launcher/joblib`` from the ConfigStore, if a
    config dir of ``search_path`` (``file://`` or a plain path) has its own ``hydra/launcher/joblib.yaml``
    (always if None)."""
    if search_path is not None:
        paths = [e.path for e in search_path.get_path() if e.path]
        dirs = [p.removeprefix("file://") for p in paths if p.startswith("file://") or "://" not in p]
        if not any((Path(d) / "hydra" / "launcher" / "joblib.yaml").is_file() for d in dirs):
            return
    ConfigStore.instance().repo.get(PLUGIN_CONFIG[0], {}).get(PLUGIN_CONFIG[1], {}).pop(PLUGIN_CONFIG[-1], None)


class WorkerDied(RuntimeError):
    """A job's process ended without a result (a failed job under ``fail_fast=true``)."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def effective_n_jobs(n_jobs: Any) -> int:
    """joblib's meaning of ``n_jobs``: a count, or -1 for every core, -2 for all but one, ..."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        print(
            f"error: hydra.launcher.n_jobs={n_jobs} is invalid; allowed: a number of jobs at a time (1, 2, ...), "
            "or -1 (one per CPU core), -2 (all cores but one), ...",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    return n_jobs if n_jobs > 0 else max(cpu_count() + 1 + n_jobs, 1)


def death_message(exitcode: int | None) -> str:
    """Why a job's process ended without a result, in one line."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"the worker process running this job died (killed by signal {-exitcode} / {name})"
    if exitcode:
        return f"the worker process running this job died (exit code {exitcode})"
    return "the worker process running this job exited without a result"


def signal_job(pid: int, signum: int) -> None:
    """Signal a job: its process group once it has made one (its DDP ranks too, as a
    terminal's Ctrl+C reaches every rank of a single run), else its process."""
    try:
        os.killpg(pid, signum)
        return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exited(pid: int, timeout: float = 0.0) -> bool:
    """Whether child ``pid`` has exited (waiting up to ``timeout`` s), without reaping it: until
    joined its pid is not reused, so signalling it stays safe."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))


# -- in the job's process --------------------------------------------------------------------
def execute_job(
    idx: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> JobReturn:
    """Run job ``idx`` (hydra-joblib-launcher's ``execute_job``)."""
    setup_globals()
    store = singleton_state["instances"].get(ConfigStore)
    Singleton.set_state(singleton_state)  # rescans the plugins, which store their configs again
    if store is not None and not _has_plugin_config(store.repo):
        drop_joblib_plugin_config()  # compose as the sweep's process did
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _stop_when_orphaned(parent_pid: int) -> None:
    """A job whose sweep process is gone stops as on SIGTERM (killed if it does not)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os._exit(EXIT_ON_SIGNAL["SIGTERM"])

    threading.Thread(target=watch, name="mlplab-orphan-watch", daemon=True).start()


def _send(conn: Connection, message: tuple) -> None:
    """``message``, cloudpickled as loky sends results: the plugin rescan of ``Singleton.set_state``
    re-created the classes of the structured configs in the job's ``JobReturn``."""
    import cloudpickle

    try:
        data = cloudpickle.dumps(message)
    except Exception:  # a return value (an exception, say) that cannot be pickled: its text
        kind, ret = message
        value = ret._return_value
        text = f"{type(value).__name__}: {value}"
        ret._return_value = RuntimeError(text) if isinstance(value, BaseException) else None
        data = cloudpickle.dumps((kind, ret))
    try:
        conn.send_bytes(data)
    except OSError:  # the sweep's process is gone
        pass


def job_process_main(shared: bytes, idx: int, overrides: list[str], conn: Connection, parent_pid: int) -> None:
    """The job process: run the job; send ``("result", JobReturn)``, ``("exit", code)`` or ``("error", line)``.

    ``shared`` is ``(hydra_context, config, task_function, singleton_state)``, cloudpickled.
    """
    try:
        os.setpgid(0, 0)  # a terminal's Ctrl+C reaches the sweep, which passes it on once
    except OSError:
        pass
    _stop_when_orphaned(parent_pid)
    try:
        hydra_context, config, task_function, singleton_state = pickle.loads(shared)
        ret = execute_job(idx, overrides, hydra_context, config, task_function, singleton_state)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        _send(conn, ("exit", code))
        raise
    except BaseException as err:  # the launch plumbing itself, or a second Ctrl+C; its traceback is printed
        text = str(err).strip()
        _send(conn, ("error", f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__))
        raise
    _send(conn, ("result", ret))
    conn.close()


# -- in the sweep's process ------------------------------------------------------------------
@dataclass
class _Job:
    idx: int
    overrides: list[str]
    output_dir: Path | None
    task_overrides: list[str]
    task_name: str | None
    fail_fast: bool
    proc: Any = None
    started: datetime | None = None
    t0: float = 0.0


class ProcessLauncher(Launcher):
    """A Hydra launcher: each sweep job in a spawned process of its own, ``n_jobs`` at a time."""

    def __init__(self, n_jobs: int = -1) -> None:
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        n_jobs = effective_n_jobs(self.n_jobs)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        slots = min(n_jobs, len(job_overrides)) or 1
        log.info(
            f"Launching {len(job_overrides)} jobs, {slots} at a time, each in a process of its own "
            f"(hydra/launcher=joblib: Joblib.Parallel(n_jobs={n_jobs}) without a shared pool)"
        )
        log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        return _Sweep(self, job_overrides, initial_job_idx, slots).run()


class _Sweep:
    """One ``launch``: the slot threads, the job processes, the signals."""

    def __init__(
        self, launcher: ProcessLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, slots: int
    ) -> None:
        import cloudpickle  # as loky: the task function of a script and lambda resolvers go by value

        self.launcher = launcher
        self.slots = slots
        self.lock = threading.RLock()
        self.next = 0
        self.stop = threading.Event()
        self.signals: list[int] = []  # received by the sweep's process, not yet passed on
        self.stop_signal: str | None = None
        self.stop_since: float | None = None
        self.exit_code: int | None = None  # the first job that exited on its own, with its code
        self.running: dict[int, _Job] = {}
        self.jobs = [self._job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        self.results: list[JobReturn | None] = [None] * len(self.jobs)
        self.shared = cloudpickle.dumps(
            (launcher.hydra_context, launcher.config, launcher.task_function, Singleton.get_state())
        )
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")

    def _job(self, idx: int, overrides: list[str]) -> _Job:
        """What the sweep needs to know of job ``idx`` if its process dies: its dir, overrides, fail_fast."""
        launcher = self.launcher
        assert launcher.hydra_context is not None and launcher.config is not None
        try:
            cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
                cfg.hydra.job.num = idx
            out = Path(
                os.path.abspath(
                    os.path.join(
                        str(OmegaConf.select(cfg, "hydra.sweep.dir")), str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                    )
                )
            )
            task = [str(o) for o in cfg.hydra.overrides.task]
            return _Job(
                idx,
                overrides,
                out,
                task,
                OmegaConf.select(cfg, "task_name", default=None),
                bool(OmegaConf.select(cfg, "fail_fast", default=False)),
            )
        except Exception:  # the job itself will report what is wrong with its config
            log.debug("could not compose job %d's config in the sweep's process", idx, exc_info=True)
            return _Job(idx, overrides, None, list(overrides), None, False)

    # -- the main thread ---------------------------------------------------------------------
    def run(self) -> list[JobReturn]:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        saved_env = {var: os.environ.get(var) for var in THREAD_VARS}
        threads_each = str(max(cpu_count() // self.slots, 1))
        for var in THREAD_VARS:  # read by the job processes as they start (torch's pool size too)
            os.environ.setdefault(var, threads_each)
        try:
            threads = [
                threading.Thread(target=self._slot, name=f"mlplab-slot-{i}", daemon=True) for i in range(self.slots)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                self._pass_on_signals()
                for t in threads:
                    t.join(timeout=0.2)
            self._pass_on_signals()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for var, value in saved_env.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
            self._kill_all()  # only if the threads were left by an exception here
        if self.stop_signal is not None:
            not_started = sum(job.started is None for job in self.jobs)
            print(
                f"interrupted: the sweep was stopped by {self.stop_signal}"
                + (f"; {not_started} jobs did not start" if not_started else ""),
                file=sys.stderr,
                flush=True,
            )
            sys.exit(EXIT_ON_SIGNAL.get(self.stop_signal, 128 + signal.Signals[self.stop_signal].value))
        if self.exit_code is not None:
            sys.exit(self.exit_code)
        for i, ret in enumerate(self.results):  # after a fail_fast stop
            if ret is None:
                self.results[i] = JobReturn(
                    overrides=self.jobs[i].overrides,
                    status=JobStatus.FAILED,
                    _return_value=WorkerDied("not started: fail_fast=true stopped the sweep"),
                )
        return list(self.results)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only note it: the main thread's loop passes it on (no lock taken in a handler).
        self.signals.append(signum)
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name
            self.stop_since = time.monotonic()
        self.stop.set()

    def _pass_on_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            self._signal_running(signum)
        if self.stop_since is not None and time.monotonic() - self.stop_since > STOP_GRACE_S:
            self._signal_running(signal.SIGKILL)

    def _signal_running(self, signum: int) -> None:
        with self.lock:
            for job in self.running.values():
                signal_job(job.proc.pid, signum)

    def _stop_sweep(self, exit_code: int) -> None:
        """A job exited on its own: no further job starts, the running ones are stopped."""
        with self.lock:
            if self.exit_code is None and self.stop_signal is None:
                self.exit_code = exit_code
                self.stop_since = time.monotonic()
                self.stop.set()
                self.signals.append(signal.SIGTERM)

    def _kill_all(self) -> None:
        with self.lock:
            for job in self.running.values():
                signal_job(job.proc.pid, signal.SIGKILL)

    # -- the slot threads --------------------------------------------------------------------
    def _slot(self) -> None:
        while True:
            with self.lock:
                if self.stop.is_set() or self.next >= len(self.jobs):
                    return
                i, self.next = self.next, self.next + 1
            self.results[i] = self._run_job(i)

    def _run_job(self, i: int) -> JobReturn | None:
        job = self.jobs[i]
        receive, send = self.ctx.Pipe(duplex=False)
        job.proc = self.ctx.Process(
            target=job_process_main,
            name=f"mlplab-job-{job.idx}",
            args=(self.shared, job.idx, job.overrides, send, os.getpid()),
        )
        with self.lock:
            if self.stop.is_set():
                return None
            job.started, job.t0 = datetime.now(timezone.utc), time.perf_counter()
            job.proc.start()
            self.running[job.idx] = job
        send.close()
        message = None
        try:
            # Its message, or its end (forked children of its own may hold the pipes open).
            while not wait([receive, job.proc.sentinel], timeout=1.0) and not _exited(job.proc.pid):
                pass
            if receive.poll():
                message = self._receive(receive)
            # A job that sent its message has EXIT_GRACE_S to exit (a stopped sweep kills sooner).
            deadline = time.monotonic() + EXIT_GRACE_S
            while not _exited(job.proc.pid, timeout=1.0):
                if time.monotonic() > deadline:
                    signal_job(job.proc.pid, signal.SIGKILL)
        finally:
            with self.lock:  # it has exited; until joined, its pid cannot be reused
                self.running.pop(job.idx, None)
            receive.close()
        job.proc.join()
        return self._outcome(job, message)

    @staticmethod
    def _receive(receive: Connection) -> tuple | None:
        try:
            data = receive.recv_bytes()
        except (EOFError, OSError):  # it ended without sending anything
            return None
        try:
            return pickle.loads(data)
        except Exception as err:
            return ("error", f"its result could not be read ({type(err).__name__}: {err})")

    def _outcome(self, job: _Job, message: Any) -> JobReturn:
        kind = message[0] if message else None
        if kind == "result":
            return message[1]
        ret = JobReturn(
            overrides=job.overrides, working_dir=os.getcwd(), task_name=job.task_name, status=JobStatus.COMPLETED
        )
        if kind == "exit":
            if message[1] != 0:
                self._stop_sweep(message[1])
            return ret
        if self.stop_signal is not None:
            self._record(job, "interrupted", f"the sweep was stopped by {self.stop_signal} before this job finished")
            return ret
        if kind is None:
            error = death_message(job.proc.exitcode)
        else:
            error = f"the worker process running this job failed: {message[1]}"
        print(f"error: job {job.idx} ({' '.join(job.task_overrides)}): {error}", file=sys.stderr, flush=True)
        self._record(job, "failed", error)
        if job.fail_fast:
            with self.lock:
                self.stop.set()  # no further job starts
            ret.status, ret.return_value = JobStatus.FAILED, WorkerDied(error)
        return ret

    def _record(self, job: _Job, status: str, error: str) -> None:
        """The job's ``run.json``, unless the job wrote its own."""
        if job.output_dir is None or runs.read_run_record(job.output_dir) is not None:
            return
        runs.write_run_record(
            job.output_dir,
            {
                "status": status,
                "error": error,
                "metrics": {},
                "epochs": None,
                "wall_s": round(time.perf_counter() - job.t0, 3),
                "overrides": job.task_overrides,
                "output_dir": str(job.output_dir),
                "task_name": job.task_name,
                "started": job.started.isoformat(timespec="seconds") if job.started else None,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )

"""DDP under Hydra: one job, N ranks, one output dir -- in single runs, sweeps and on clusters.

Lightning's DDP launcher starts ranks 1..N-1 by re-running the script with ``sys.argv``
(plus ``hydra.run.dir``). Under ``-m`` that re-runs the whole sweep in every child, into
``hydra.run.dir`` rather than the job's dir (Lightning issue 11300); and the next job of
the sweep finds the first job's ``LOCAL_RANK``/``MASTER_PORT`` and process group still
set, takes itself for an externally launched rank and waits for peers that never come.

:class:`HydraDDPStrategy` (``trainer=ddp|ddp_cpu``) launches each child rank as a
*single run of this job*: the script, the job's own overrides
(``HydraConfig.overrides.task``, sweep values already chosen, no ``-m``), ``hydra.mode=RUN``,
the job's output dir as ``hydra.run.dir`` and ``hydra.output_subdir=null``, so a child
writes only ``<task>_rank<R>.log`` there. ``hydra.mode=RUN`` matters when the job's
overrides choose a preset that sets ``hydra.mode: MULTIRUN`` (``hparams_search=...``):
Hydra takes the mode from the composed config when no ``-m`` is given, so without it the
child would start a sweep of its own. In a run the sweeper and its params are unused.

:func:`ddp_job` brackets each job: when it ends, the job's child ranks are waited for,
the process group is destroyed and the launch environment is restored, so the next job
of a sweep starts from scratch.

Processes started by ``torchrun`` or SLURM's ``srun`` (multi-node) create no children;
:func:`external_rank_argv` makes their ranks > 0 write no ``.hydra/`` and only
``<task>_rank<R>.log`` into the job dir, which every node must name the same
(``hydra.run.dir=...``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.plugins.environments import (
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from mlplab.errors import ConfigError
from mlplab.lightning_ext.ddp import ChildLauncher, ChildLaunchingDDPStrategy

log = logging.getLogger(__name__)

#: Set by Lightning's launcher in the launching process; restored when a job ends.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
#: Hydra keys the parent sets for a child rank; the parent's own values are not passed on.
_CHILD_HYDRA_KEYS = {"hydra.mode", "hydra.run.dir", "hydra.output_subdir", "hydra.job.name"}
#: Seconds a job waits for its child ranks to exit after rank 0 is done, and the grace a
#: failed child gives rank 0 to fail on its own before rank 0 is killed (as Lightning does).
CHILD_EXIT_TIMEOUT_S = 120
CHILD_FAILURE_GRACE_S = 30


class _JobRanks:
    """The child ranks the current job launched, and whether the job has ended."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.over = threading.Event()


_job = _JobRanks()


def entry_script() -> str:
    """The script this run started from (``src/train.py``), recorded by :func:`mlplab.cli.set_project_root`."""
    return os.environ.get("MLPLAB_ENTRY") or os.path.abspath(sys.argv[0])


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def child_command(global_rank: int) -> tuple[list[str], str]:
    """The command (and cwd) that runs one more rank of the current Hydra job."""
    hc = HydraConfig.get()
    parsed = OverridesParser.create().parse_overrides(list(hc.overrides.hydra))
    hydra_overrides = [o.input_line for o in parsed if o.key_or_group not in _CHILD_HYDRA_KEYS]
    command = [
        sys.executable,
        entry_script(),
        *hc.overrides.task,
        *hydra_overrides,
        "hydra.mode=RUN",  # a preset in the task overrides may set hydra.mode: MULTIRUN
        f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}",
        "hydra.output_subdir=null",
        f"hydra.job.name={rank_job_name(hc.job.name, global_rank)}",
    ]
    return command, hc.runtime.cwd


def rank_job_name(job_name: str, global_rank: int) -> str:
    """``train_rank1``: the job name of rank > 0, hence its log file ``train_rank1.log``."""
    return f"{job_name}_rank{global_rank}"


class HydraDDPStrategy(ChildLaunchingDDPStrategy):
    """``DDPStrategy`` whose extra ranks re-run the current Hydra job (see the module doc)."""

    def make_launcher(self, cluster_environment: Any, num_processes: int, num_nodes: int) -> ChildLauncher:
        return ChildLauncher(
            cluster_environment, num_processes, num_nodes, spawn=_spawn_job_ranks, started=_watch_ranks
        )


def _spawn_job_ranks(launcher: ChildLauncher) -> list[subprocess.Popen] | None:
    """Start ranks 1..N-1 of this node as single runs of the current job (None outside Hydra:
    e.g. a notebook, where Lightning's own way is right)."""
    if not HydraConfig.initialized():
        return None
    launcher.check_can_spawn_children()
    env = launcher.cluster_environment
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    os.environ["NODE_RANK"] = str(env.node_rank())
    os.environ["LOCAL_RANK"] = str(env.local_rank())
    os.environ["WORLD_SIZE"] = str(launcher.num_processes * launcher.num_nodes)
    procs = []
    for local_rank in range(1, launcher.num_processes):
        command, cwd = child_command(env.node_rank() * launcher.num_processes + local_rank)
        procs.append(subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(local_rank)}, cwd=cwd))
    return procs


def _watch_ranks(procs: list[subprocess.Popen]) -> None:
    """The job's child ranks end with it (:func:`ddp_job`); a failed one stops the others."""
    _job.procs.extend(procs)
    _ChildObserver(_job, os.getpid()).start()


class _ChildObserver(threading.Thread):
    """If a child rank fails, stop the others; kill this process only if it has not ended
    the job on its own within :data:`CHILD_FAILURE_GRACE_S` (a peer stuck in a collective).

    Lightning's observer kills the launching process at once, which would end a whole
    sweep; here a failed job is recorded as failed and the sweep goes on.
    """

    def __init__(self, job: _JobRanks, main_pid: int) -> None:
        super().__init__(daemon=True, name="mlplab-child-rank-observer")
        self.job, self.main_pid = job, main_pid

    def run(self) -> None:
        while not self.job.over.wait(1.0):
            codes = [p.poll() for p in self.job.procs]
            if all(c == 0 for c in codes):
                return
            if any(c not in (None, 0) for c in codes):
                log.error("a child rank exited with code %s: stopping the other ranks of this job", codes)
                for p in self.job.procs:
                    if p.poll() is None:
                        p.kill()
                if not self.job.over.wait(CHILD_FAILURE_GRACE_S):
                    os.kill(self.main_pid, signal.SIGKILL)
                return


@contextmanager
def ddp_job() -> Iterator[None]:
    """One job's DDP lifetime in this process; afterwards the next job starts from scratch.

    On exit: wait for the child ranks this job launched (if the job failed, or after
    :data:`CHILD_EXIT_TIMEOUT_S`, kill them: they may be waiting in a collective for
    rank 0), destroy the process group, restore the launch environment variables and
    the thread count Lightning set.
    """
    global _job
    _job = job = _JobRanks()
    saved_env = {key: os.environ.get(key) for key in LAUNCH_ENV}
    saved_threads = torch.get_num_threads()
    failed = True
    try:
        yield
        failed = False
    finally:
        job.over.set()
        for proc in job.procs:
            try:
                proc.wait(timeout=1 if failed else CHILD_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("child rank (pid %d) still running after rank 0 ended: killed", proc.pid)
                proc.kill()
                proc.wait()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(saved_threads)


def external_launch() -> tuple[int, int] | None:
    """``(global rank, world size)`` when torchrun or SLURM's srun started this process, else None."""
    for env_cls in (TorchElasticEnvironment, SLURMEnvironment):
        if env_cls.detect():
            env = env_cls()
            return env.global_rank(), env.world_size()
    return None


def external_rank_argv(argv: list[str]) -> list[str]:
    """The command line for this process when torchrun/srun launched it as one of several ranks.

    Every rank of the job must use the same output dir, and only rank 0 may write
    Hydra's ``.hydra/``: so ``hydra.run.dir`` must be given (the same on every node), and
    ranks > 0 get ``hydra.output_subdir=null`` and their own log name. Otherwise
    ``argv`` is returned unchanged.
    """
    launched = external_launch()
    if launched is None or launched[1] <= 1:
        return argv
    rank, world = launched
    args = argv[1:]
    if any(a in ("-m", "--multirun") for a in args):
        raise ConfigError(
            f"-m (multirun) is invalid when torchrun/srun starts {world} ranks; allowed: one job per launch "
            "(sweep with python src/train.py -m ... trainer=ddp, or hydra/launcher=submitit_slurm)"
        )
    if not any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        raise ConfigError(
            f"hydra.run.dir is unset but torchrun/srun starts {world} ranks; allowed: hydra.run.dir=PATH, "
            "the same dir on every node (e.g. hydra.run.dir=logs/runs/$SLURM_JOB_ID)"
        )
    if rank == 0:
        return argv
    return [*argv, "hydra.output_subdir=null", f"hydra.job.name={rank_job_name(Path(argv[0]).stem, rank)}"]

"""The ``hydra/launcher=population`` preset: the jobs of a sweep that can share one stacked
model trained as one population, in the sweep's process.

``python src/train.py -m hydra/launcher=population seed=1,2,3,4,5,6,7,8 optimizer.lr=0.02,0.1``

The launcher composes every job's config as Hydra's basic launcher does, then groups the
jobs whose configs agree in everything but what members may differ in
(:data:`mlplab.population.MEMBER_KEYS`: seed, optimizer hyper-parameters, dropout, init,
label smoothing, the schedule's values); ``population.max_members`` bounds a group (a
larger one is split). Each group trains as one population
(:func:`mlplab.engines.population.train_group`), then each member becomes its job in
Hydra's way -- its job dir, ``.hydra/``, ``train.log``, then
:func:`mlplab.engines.population.write_member` under :func:`mlplab.cli.run_job`
(``run.json``). A job that cannot share (alone in its settings, or refused by population
training: DDP, augmentation, early stopping, another engine) runs as the basic launcher
runs it. One line per group says which jobs it holds and what they differ in, one line per
lone job why it runs alone. Results go back to Hydra in job order, so the sweep summary
reads the members as it reads any jobs.

The test-stage figures are rendered for the best member of each group (by ``val/acc_best``)
or, with ``population.figures=all``, for every member.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mlplab import signals
from mlplab.errors import MlplabError

log = logging.getLogger(__name__)

#: ``population.figures`` options.
FIGURES = ("best", "all")


@dataclass
class _Job:
    idx: int
    overrides: list[str]
    config: DictConfig  # the job's sweep config (Hydra's node included)
    plain: dict | None = None  # its resolved config without Hydra's node (None: it does not compose)
    settings: dict | None = None
    refusal: str | None = None


@dataclass
class _Group:
    jobs: list[_Job] = field(default_factory=list)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def options_refusal(config: DictConfig) -> str | None:
    """What is wrong with ``population.max_members`` / ``population.figures``, in one line (None: nothing)."""
    max_members = OmegaConf.select(config, "population.max_members", default=64)
    figures = OmegaConf.select(config, "population.figures", default="best")
    if isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 1:
        return f"population.max_members={max_members} is invalid; allowed: a number of members per group (1, 2, ...)"
    if figures not in FIGURES:
        return f"population.figures={figures} is invalid; allowed: {', '.join(FIGURES)}"
    return None


def population_options(config: DictConfig) -> tuple[int, str]:
    """``population.max_members`` and ``population.figures`` of the sweep's config (one line and exit 2 if invalid)."""
    refused = options_refusal(config)
    if refused is not None:
        _fail(refused)
    return (
        int(OmegaConf.select(config, "population.max_members", default=64)),
        str(OmegaConf.select(config, "population.figures", default="best")),
    )


class _RememberingLoader:
    """Hydra's config loader, keeping the job configs the sweeper composes to check a batch
    (``Sweeper.validate_batch_is_legal``, which discards them): the launcher takes them instead
    of composing each job a second time (a fifth of a second each). Everything else goes to
    the loader."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._kept: dict[tuple[str, ...], DictConfig] = {}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        # Kept as it is: the sweeper only checks that it composes (a copy costs a quarter of a compose).
        config = self._loader.load_sweep_config(master_config, sweep_overrides)
        self._kept[tuple(sweep_overrides)] = config
        return config

    def take_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """The config the sweeper composed for these overrides (composed now if it did not)."""
        kept = self._kept.pop(tuple(sweep_overrides), None)
        return kept if kept is not None else self._loader.load_sweep_config(master_config, sweep_overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class PopulationLauncher(Launcher):
    """A Hydra launcher: sweep jobs that can share one stacked model trained as one population."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        if not isinstance(hydra_context.config_loader, _RememberingLoader):
            hydra_context.config_loader = _RememberingLoader(hydra_context.config_loader)  # type: ignore[assignment]
        self.hydra_context = hydra_context

    # -- planning ------------------------------------------------------------------------------
    def _compose(self, idx: int, overrides: Sequence[str]) -> _Job:
        from mlplab.population.train import refusal, shared_settings

        assert self.hydra_context is not None and self.config is not None
        loader = self.hydra_context.config_loader
        if isinstance(loader, _RememberingLoader):
            config = loader.take_sweep_config(self.config, list(overrides))
        else:
            config = loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = f"{config.hydra.job.name}_{idx}"
            config.hydra.job.num = idx
        job = _Job(idx, list(overrides), config)
        try:
            job.plain = _task_config(config)
        except Exception as err:  # the job itself reports what is wrong with its config
            job.refusal = f"its config does not resolve ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
            return job
        job.settings = shared_settings(job.plain)
        job.refusal = refusal(job.plain)
        return job

    def plan(self, jobs: list[_Job], max_members: int) -> tuple[list[_Group], list[tuple[_Job, str]]]:
        """The groups (each of 2 to ``max_members`` jobs) and the jobs that run alone, each with why."""
        from mlplab.population.train import first_difference

        by_key: dict[str, _Group] = {}
        alone: list[tuple[_Job, str]] = []
        for job in jobs:
            if job.refusal is not None:
                alone.append((job, job.refusal))
                continue
            key = json.dumps(job.settings, sort_keys=True, default=str)
            by_key.setdefault(key, _Group()).jobs.append(job)
        groups: list[_Group] = []
        singles = [g.jobs[0] for g in by_key.values() if len(g.jobs) == 1]
        largest = max(by_key.values(), key=lambda g: len(g.jobs), default=None)
        for group in by_key.values():
            if len(group.jobs) == 1:
                job = group.jobs[0]
                other = largest.jobs[0] if largest is not None and largest.jobs[0] is not job else None
                if other is None and len(singles) > 1:
                    other = next(j for j in singles if j is not job)
                diff = first_difference(job.settings, other.settings) if other is not None else None
                why = (
                    f"no other job has its {diff}={_shown(job.plain, diff)}"
                    if diff
                    else "it is the only job that population training accepts"
                )
                alone.append((job, why))
                continue
            for start in range(0, len(group.jobs), max_members):
                groups.append(_Group(group.jobs[start : start + max_members]))
        return groups, sorted(alone, key=lambda pair: pair[0].idx)

    # -- launching -----------------------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        max_members, figures = population_options(self.config)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        jobs = [self._compose(idx, overrides) for idx, overrides in enumerate(job_overrides, initial_job_idx)]
        groups, alone = self.plan(jobs, max_members)
        for n, group in enumerate(groups, 1):
            print(f"population {n}/{len(groups)}: {_describe(group)}", flush=True)
        common = set.intersection(*(set(job.overrides) for job in jobs)) if jobs else set()
        for job, why in alone:
            own = " ".join(o for o in filter_overrides(job.overrides) if o not in common)
            print(f"job {job.idx} runs alone ({own or 'the common overrides'}): {why}", flush=True)

        results: dict[int, JobReturn] = {}
        for group in groups:
            results.update(self._run_group(group, figures))
        for job, _ in alone:
            results[job.idx] = self._run_single(job)
        return [results[job.idx] for job in jobs]

    def _run_single(self, job: _Job) -> JobReturn:
        assert self.hydra_context is not None and self.task_function is not None
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=job.config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    def _stopper(self, group: _Group) -> Callable[[str], None]:
        """A signal while ``group`` trains: its jobs are not written (none of their dirs exists
        yet), the summary of the jobs so far is, and the sweep exits 130 / 143."""
        assert self.config is not None
        metric = OmegaConf.select(self.config, "optimized_metric", default=None) or "val/acc_best"
        return signals.stop_sweep_between_jobs(
            Path(str(self.config.hydra.sweep.dir)),
            str(metric),
            where=f"while the population of jobs {_ids(group)} trained (they leave no job dirs)",
        )

    def _run_group(self, group: _Group, figures: str) -> dict[int, JobReturn]:
        from mlplab import cli
        from mlplab.engines.population import train_group, write_member

        assert self.hydra_context is not None
        cfgs = [OmegaConf.create(job.plain) for job in group.jobs]
        try:
            with _stop_on_signals(self._stopper(group)):
                run = train_group(cfgs)
        except MlplabError as err:  # refused when built (an optimizer population training lacks, ...)
            text = str(err).strip().splitlines()[0]
            print(f"population of jobs {_ids(group)} runs as single jobs: {text}", flush=True)
            return {job.idx: self._run_single(job) for job in group.jobs}
        best = max(
            range(len(group.jobs)),
            key=lambda i: max((r["val/acc"] for r in run.results[i].history), default=float("-inf")),
        )
        results = {}
        for i, job in enumerate(group.jobs):
            draw = figures == "all" or i == best

            def task(cfg: DictConfig, i: int = i, draw: bool = draw) -> Any:
                return cli.run_job(cfg, lambda c: write_member(c, run, i, figures=draw))

            results[job.idx] = run_job(
                hydra_context=self.hydra_context,
                task_function=task,
                config=job.config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        return results


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[str], None]) -> Iterator[None]:
    """SIGINT or SIGTERM while a population trains: ``stop(signal name)`` (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        stop(signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in signals.SIGNALS}
    for s in signals.SIGNALS:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _task_config(config: DictConfig) -> dict:
    """The job's config as its task sees it, resolved: Hydra's node gone, ``paths.output_dir`` its job dir."""
    out = os.path.abspath(
        os.path.join(
            str(OmegaConf.select(config, "hydra.sweep.dir")), str(OmegaConf.select(config, "hydra.sweep.subdir"))
        )
    )
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = out  # as Hydra's run_job sets it (and will again)
    HydraConfig.instance().set_config(config)
    plain = OmegaConf.to_container(config, resolve=True)
    plain.pop("hydra")
    return plain


def _ids(group: _Group) -> str:
    idxs = [job.idx for job in group.jobs]
    if idxs == list(range(idxs[0], idxs[-1] + 1)) and len(idxs) > 2:
        return f"{idxs[0]}-{idxs[-1]}"
    return ",".join(str(i) for i in idxs)


def _describe(group: _Group) -> str:
    """``jobs 0-7, 8 members differing in seed, optimizer.lr``."""
    from mlplab.population.train import MEMBER_KEYS, _select

    differ = [
        key
        for key in MEMBER_KEYS
        if len({json.dumps(_select(job.plain, key), sort_keys=True, default=str) for job in group.jobs}) > 1
    ]
    what = f"differing in {', '.join(differ)}" if differ else "identical"
    return f"jobs {_ids(group)}, {len(group.jobs)} members {what}, trained as one stacked model"


def _shown(plain: dict | None, key: str) -> str:
    from mlplab.population.train import _select

    value = _select(plain, key) if plain is not None else None
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)

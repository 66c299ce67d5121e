"""Sweeps that compare themselves: one table, one plot, one answer per multirun.

At the end of every multirun (``python src/train.py -m ...``) the Hydra callback
:class:`SweepSummary` reads each job's ``run.json`` (:mod:`mlplab.runs`, written by every
job whichever launcher ran it) and writes into the sweep dir:

- ``summary.csv``: one row per job: job dir, status, error, metrics, epochs, wall time,
  overrides, output dir;
- ``summary.md``: the same as a Markdown table, with the overrides the jobs share shown
  once above it and the best job named below it;
- ``summary.png``: the chosen metric per job, as bars (failed jobs marked).

Jobs that differ only in ``seed`` are one *setting*: when a sweep has such repeats
(``seed=1,2,3 model=relu_mlp,simple_net``), ``summary.md`` adds a table over seeds -- per
setting n, mean ± std and a 95 % interval (Student's t) of each shown metric --
``summary_seeds.csv`` holds it as CSV, and ``summary.png`` shows each setting's mean with
its 95 % interval as an error bar and every seed as a dot.

The table is printed at the end of the sweep, and the multirun exits with code 1 if any
job failed or left no record (the summary is written either way). ``python -m
mlplab.sweeps SWEEP_DIR`` rewrites the summary of any sweep dir (e.g. one stopped by
``fail_fast=true``, or a SLURM sweep whose jobs are still running).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlplab.atomic import atomic_write_bytes, atomic_write_text
from mlplab.errors import StorageError
from mlplab.runs import RUN_FILE, read_run_record

SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
SEEDS_FILE = "summary_seeds.csv"
#: Metrics every summary shows; the chosen metric is added when it is another one.
SHOWN_METRICS = ("val/acc_best", "test/acc")
NO_RECORD = "no run.json: the job was killed or is still running"
EXIT_JOBS_FAILED = 1
_UNSAFE = re.compile(r"[^\w.,=+\-\[\]@%]+")
_LONG_FLOAT = re.compile(r"(?<![\w.])\d+\.\d{5,}(?:e[+-]?\d+)?")
_MAX_NAME = 200


def short_numbers(text: str) -> str:
    """Floats with many digits (Optuna's samples) cut to 4 significant digits, for display."""
    return _LONG_FLOAT.sub(lambda m: f"{float(m.group()):.4g}", text)


def job_dirname(num: Any, overrides: str = "") -> str:
    """``<num>_<overrides>``: a readable, unique, filesystem-safe job dir name.

    ``overrides`` is Hydra's ``hydra.job.override_dirname`` (``model=simple_net,optimizer.lr=0.1``);
    long floats are cut to 4 significant digits, characters that are unsafe in a file
    name (``/``, spaces, quotes, ``:`` ...) become ``_`` and the name is cut to 200
    characters. The job number keeps names unique; ``run.json`` keeps the exact overrides.
    """
    safe = _UNSAFE.sub("_", short_numbers(str(overrides))).strip("._-")[:_MAX_NAME]
    return f"{num}_{safe}" if safe else str(num)


@dataclass
class JobRow:
    """One job of a sweep, as the summary shows it."""

    job: str
    status: str
    error: str | None
    metrics: dict[str, float]
    epochs: int | None
    wall_s: float | None
    overrides: list[str]
    output_dir: str
    label: str = field(default="")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _job_number(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (sys.maxsize, path.name)


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job dir of a sweep: a subdir holding Hydra's ``.hydra/`` or a ``run.json``, in job order."""
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / RUN_FILE).is_file())]
    return sorted(dirs, key=_job_number)


def _hydra_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # missing or unreadable: the row still shows the job
        return []


def _record_overrides(record: dict[str, Any]) -> list[str]:
    """The record's ``overrides`` if they are a list of strings (a hand-edited or foreign file may hold
    anything: a string would be read character by character); else none."""
    overrides = record.get("overrides")
    if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
        return overrides
    return []


def read_job(job_dir: Path) -> JobRow:
    """A job's row from its ``run.json``; a job without one is ``unknown``, never dropped."""
    record = read_run_record(job_dir)
    if record is None:
        return JobRow(job_dir.name, "unknown", NO_RECORD, {}, None, None, _hydra_overrides(job_dir), str(job_dir))
    metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
    epochs = record.get("epochs")
    wall = record.get("wall_s")
    return JobRow(
        job=job_dir.name,
        status=str(record.get("status") or "unknown"),
        error=record.get("error"),
        metrics=metrics,
        epochs=None if epochs is None else int(epochs),
        wall_s=None if wall is None else float(wall),
        overrides=_record_overrides(record) or _hydra_overrides(job_dir),
        output_dir=str(record.get("output_dir") or job_dir),
    )


def _is_seed(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") == "seed"


@dataclass
class SeedStats:
    """A metric over the ok jobs of a setting: n, mean, sample std and the 95 % interval of the mean."""

    n: int
    mean: float | None
    std: float | None
    ci95: tuple[float, float] | None
    values: list[float]

    @classmethod
    def of(cls, rows: list[JobRow], metric: str) -> SeedStats:
        values = [r.metrics[metric] for r in rows if r.ok and math.isfinite(r.metrics.get(metric, math.nan))]
        n = len(values)
        if n == 0:
            return cls(0, None, None, None, [])
        mean = statistics.fmean(values)
        if n == 1:
            return cls(1, mean, None, None, values)
        from scipy.stats import t

        std = statistics.stdev(values)
        half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        return cls(n, mean, std, (mean - half, mean + half), values)

    def text(self) -> str:
        """``0.9612 ± 0.0040`` (mean ± std), or the one value, or empty."""
        if self.mean is None:
            return ""
        return _fmt(self.mean) if self.std is None else f"{_fmt(self.mean)} ± {_fmt(self.std)}"


@dataclass
class Setting:
    """The jobs of a sweep that differ only in ``seed``, and their statistics per metric."""

    label: str
    rows: list[JobRow]
    stats: dict[str, SeedStats]

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.rows)


@dataclass
class Summary:
    """A sweep's jobs and what they share; :meth:`best` is the answer."""

    sweep_dir: Path
    metric: str
    rows: list[JobRow]
    common: list[str]

    @property
    def metrics(self) -> list[str]:
        return [*SHOWN_METRICS, *([self.metric] if self.metric not in SHOWN_METRICS else [])]

    @property
    def failed(self) -> list[JobRow]:
        return [r for r in self.rows if not r.ok]

    def settings(self) -> list[Setting]:
        """The jobs grouped by their overrides other than ``seed``, in job order; empty unless some
        setting was run with more than one seed (a sweep over seeds)."""
        groups: dict[tuple[str, ...], list[JobRow]] = {}
        for row in self.rows:
            key = tuple(sorted(o for o in row.overrides if not _is_seed(o)))
            groups.setdefault(key, []).append(row)
        if not any(len(rows) > 1 and any(_is_seed(o) for r in rows for o in r.overrides) for rows in groups.values()):
            return []
        settings = []
        for key, rows in groups.items():
            label = short_numbers(" ".join(o for o in key if o not in self.common)) or "(every job)"
            settings.append(Setting(label, rows, {m: SeedStats.of(rows, m) for m in self.metrics}))
        return settings

    def best(self) -> JobRow | None:
        """The ok job with the highest ``metric`` (losses: the lowest)."""
        scored = [r for r in self.rows if r.ok and math.isfinite(r.metrics.get(self.metric, math.nan))]
        if not scored:
            return None
        pick = min if "loss" in self.metric else max
        return pick(scored, key=lambda r: r.metrics[self.metric])


def collect(sweep_dir: str | Path, metric: str = "val/acc_best") -> Summary:
    """Read every job of ``sweep_dir``; label each by the overrides that differ between jobs."""
    sweep_dir = Path(sweep_dir)
    rows = [read_job(d) for d in find_job_dirs(sweep_dir)]
    common = [o for o in rows[0].overrides if all(o in r.overrides for r in rows)] if len(rows) > 1 else []
    for row in rows:
        row.label = short_numbers(" ".join(o for o in row.overrides if o not in common)) or row.job
    return Summary(sweep_dir, metric, rows, common)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(summary: Summary) -> str:
    """The summary as Markdown: shared overrides, the table, the best job."""
    lines = [f"# Sweep {summary.sweep_dir.name}", ""]
    lines.append(
        f"{len(summary.rows)} jobs, {len(summary.rows) - len(summary.failed)} ok, {len(summary.failed)} failed; "
        f"metric: `{summary.metric}`."
    )
    if summary.common:
        lines.append(f"Every job: `{' '.join(summary.common)}`.")
    lines.append("")
    header = ["#", "overrides", "status", *summary.metrics, "epochs", "wall (s)", "error", "dir"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    best = summary.best()
    for row in summary.rows:
        cells = [
            row.job.split("_", 1)[0],
            f"`{row.label}`",
            ("**ok** (best)" if row is best else row.status),
            *(_fmt(row.metrics.get(m)) for m in summary.metrics),
            "" if row.epochs is None else str(row.epochs),
            _fmt(row.wall_s, 1),
            row.error or "",
            row.job,
        ]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    lines.append("")
    if best is not None:
        lines.append(
            f"Best by `{summary.metric}`: `{best.label}`, {summary.metric}={_fmt(best.metrics[summary.metric])} "
            f"(dir `{best.job}`)."
        )
    else:
        lines.append(f"No job finished with `{summary.metric}`.")
    lines.append("")
    settings = summary.settings()
    if settings:
        lines += [
            "## Over seeds",
            "",
            "Jobs that differ only in `seed`: n ok jobs, mean ± std (sample), 95 % interval of the mean (Student's t).",
            "",
        ]
        header = ["setting", "n", *(f"{m} {col}" for m in summary.metrics for col in ("mean ± std", "95 % interval"))]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for setting in settings:
            n = f"{setting.stats[summary.metric].n}" + (f" ({setting.failed} failed)" if setting.failed else "")
            cells = [f"`{setting.label}`", n]
            for m in summary.metrics:
                st = setting.stats[m]
                cells += [st.text(), f"[{_fmt(st.ci95[0])}, {_fmt(st.ci95[1])}]" if st.ci95 else ""]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(summary: Summary, path: Path) -> None:
    """The table as CSV, written atomically (:mod:`mlplab.atomic`)."""
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", "error", *summary.metrics, "epochs", "wall_s", "overrides", "output_dir"])
        for row in summary.rows:
            writer.writerow(
                [
                    row.job,
                    row.status,
                    row.error or "",
                    *(_fmt(row.metrics.get(m), 6) for m in summary.metrics),
                    "" if row.epochs is None else row.epochs,
                    _fmt(row.wall_s, 3),
                    " ".join(row.overrides),
                    row.output_dir,
                ]
            )
        atomic_write_text(path, f.getvalue())


def write_seeds_csv(settings: list[Setting], metrics: list[str], path: Path) -> None:
    """One row per setting: n, failed, and per metric mean, std, 95 % interval (atomically)."""
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        cols = [f"{m} {c}" for m in metrics for c in ("n", "mean", "std", "ci95_low", "ci95_high")]
        writer.writerow(["setting", "jobs", "failed", *cols, "job_dirs"])
        for setting in settings:
            cells: list[Any] = []
            for m in metrics:
                st = setting.stats[m]
                low, high = st.ci95 or (None, None)
                cells += [st.n, *(_fmt(v, 6) for v in (st.mean, st.std, low, high))]
            jobs = " ".join(r.job for r in setting.rows)
            writer.writerow([setting.label, len(setting.rows), setting.failed, *cells, jobs])
        atomic_write_text(path, f.getvalue())


def plot(summary: Summary, path: Path) -> None:
    """Horizontal bars: ``metric`` per job (top to bottom in job order); failed jobs marked in red.
    A sweep over seeds: per setting, the mean with its 95 % interval, and each seed as a dot."""
    settings = summary.settings()
    if settings:
        return _plot_settings(summary, settings, path)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    rows = summary.rows
    fig = Figure(figsize=(8, 1.2 + 0.4 * max(len(rows), 1)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]
    values = [r.metrics.get(summary.metric, math.nan) if r.ok else math.nan for r in rows]
    shown = [v if math.isfinite(v) else 0.0 for v in values]
    best = summary.best()
    colors = ["tab:green" if r is best else "tab:blue" for r in rows]
    ax.barh(y, shown, color=colors)
    for yi, row, value in zip(y, rows, values):
        if math.isfinite(value):
            ax.text(value, yi, f" {value:.4f}", va="center", fontsize=8)
        else:
            ax.text(0, yi, f" {row.status}", va="center", color="tab:red", fontsize=8)
    ax.set_yticks(y, [r.label if len(r.label) <= 60 else r.label[:57] + "..." for r in rows], fontsize=8)
    finite = [v for v in values if math.isfinite(v)]
    ax.set_xlim(0, max([1.0, *finite]) * 1.12 if "acc" in summary.metric else max([1e-9, *finite]) * 1.25)
    ax.set_xlabel(summary.metric)
    ax.set_title(f"{summary.metric} per job: sweep {summary.sweep_dir.name}", fontsize=10)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    atomic_write_bytes(path, image.getbuffer())


def _plot_settings(summary: Summary, settings: list[Setting], path: Path) -> None:
    from matplotlib.figure import Figure

    metric = summary.metric
    fig = Figure(figsize=(8, 1.4 + 0.45 * len(settings)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(settings)))[::-1]
    finite: list[float] = []
    for yi, setting in zip(y, settings):
        st = setting.stats[metric]
        if st.mean is None:
            ax.text(0, yi, " no ok job", va="center", color="tab:red", fontsize=8)
            continue
        low, high = st.ci95 or (st.mean, st.mean)
        ax.barh(yi, st.mean, color="tab:blue", alpha=0.35)
        ax.errorbar(st.mean, yi, xerr=[[st.mean - low], [high - st.mean]], fmt="o", color="tab:blue", capsize=4)
        ax.plot(st.values, [yi] * st.n, "k.", alpha=0.6)
        finite += [*st.values, high]
        failed = f", {setting.failed} failed" if setting.failed else ""
        ax.text(max(st.values + [high]), yi, f"  {st.text()} (n={st.n}{failed})", va="center", fontsize=8)
    labels = [s.label if len(s.label) <= 60 else s.label[:57] + "..." for s in settings]
    ax.set_yticks(y, labels, fontsize=8)
    if finite and "acc" in metric:
        low_edge = min(finite)
        ax.set_xlim(max(0.0, low_edge - (1.0 - low_edge) * 0.5), 1.0 + (1.0 - low_edge) * 0.35)
    ax.set_xlabel(f"{metric}: mean, 95 % interval, seeds")
    ax.set_title(f"{metric} over seeds: sweep {summary.sweep_dir.name}", fontsize=10)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    atomic_write_bytes(path, image.getbuffer())


def write_summary(sweep_dir: str | Path, metric: str = "val/acc_best") -> Summary:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``; returns the summary.

    Each file is written atomically (a fresh temporary file, then rename); a full disk is
    one :class:`~mlplab.errors.StorageError` line.
    """
    summary = collect(sweep_dir, metric)
    write_csv(summary, summary.sweep_dir / "summary.csv")
    atomic_write_text(summary.sweep_dir / "summary.md", markdown(summary))
    plot(summary, summary.sweep_dir / "summary.png")
    settings = summary.settings()
    if settings:
        write_seeds_csv(settings, summary.metrics, summary.sweep_dir / SEEDS_FILE)
    return summary


def _write_summary_or_exit(sweep_dir: Path, metric: str) -> Summary:
    """:func:`write_summary`; a file it cannot write (a full disk) is one line and exit 2."""
    try:
        return write_summary(sweep_dir, metric)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def report(summary: Summary) -> str:
    """What the sweep prints at its end: the Markdown table and where the files are."""
    files = ", ".join(str(summary.sweep_dir / name) for name in SUMMARY_FILES)
    return f"{markdown(summary)}Summary: {files}\n"


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary``): summarise every multirun at its end.

    ``metric`` is the one compared (default: the run's ``optimized_metric``);
    ``exit_on_failure``: exit with code 1 after the summary if any job failed.
    """

    def __init__(self, metric: str = "val/acc_best", exit_on_failure: bool = True) -> None:
        self.metric = metric
        self.exit_on_failure = exit_on_failure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():  # no job ever started
            return
        summary = _write_summary_or_exit(sweep_dir, self.metric)
        print(report(summary), flush=True)
        if summary.failed and self.exit_on_failure:
            print(
                f"{len(summary.failed)} of {len(summary.rows)} jobs failed (see the table above)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(EXIT_JOBS_FAILED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlplab.sweeps", description="(Re)write the summary of a sweep dir."
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="val/acc_best", help="the metric compared (default: val/acc_best)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep_dir={args.sweep_dir} is invalid; allowed: an existing sweep dir", file=sys.stderr)
        return 2
    summary = _write_summary_or_exit(args.sweep_dir, args.metric)
    print(report(summary))
    return EXIT_JOBS_FAILED if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

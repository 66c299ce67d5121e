"""SIGINT and SIGTERM over a whole job, and between the jobs of a sweep.

One handler for both signals (SLURM preemption sends SIGTERM, Ctrl+C sends SIGINT):

- **while the fit loop runs** the first signal asks Lightning to stop at the next batch
  boundary (its SIGTERM mechanism, which ends the epoch's work cleanly: ``last.ckpt``
  stays the last completed epoch); a second signal stops at once;
- **anywhere else in a job** (set-up, data, the test stage) it stops at once with
  :class:`~mlplab.errors.RunInterrupted`: nothing there is resumable mid-way;
- **between the jobs of a sweep** it stops the sweep: the summary of the jobs so far is
  written and the process exits 130 / 143.

In every case the job's ``run.json`` says ``interrupted`` and the one-line message says
how to resume (:func:`mlplab.cli.run_job`). Lightning's own "Received SIGTERM: 2" log line
(it names SIGINT's number as SIGTERM) is replaced by this module's line.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from mlplab.errors import RunInterrupted

log = logging.getLogger("mlplab")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Exit codes of a process stopped by a signal: the shell's 128 + signal number.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class _DropLightningSigtermLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Received SIGTERM" not in record.getMessage()


class JobSignals:
    """The process's handler state; one instance, :data:`JOB`."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.training = False
        self.in_job = False
        self.between_jobs: Callable[[str], None] | None = None
        self._previous: dict[int, Any] = {}
        self._forwarding = False

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handler (main thread only); False where signals cannot be handled here."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if not self.installed:
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, self._handle)
            logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(
                _DropLightningSigtermLine()
            )
        return True

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def start_job(self) -> None:
        self.received, self.training, self.in_job = None, False, True

    def end_job(self) -> None:
        self.training, self.in_job = False, False

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._forwarding:  # Lightning's SIGTERM handler calling this one back
            return
        if not self.in_job:
            if self.between_jobs is not None:
                self.between_jobs(name)
            raise RunInterrupted(f"stopped by {name}", name)
        if self.training and self.received is None:
            self.received = name
            again = "Ctrl+C" if name == "SIGINT" else name
            log.warning("%s: stopping at the next batch boundary (%s again stops at once)", name, again)
            if signum != signal.SIGTERM:
                lightning = signal.getsignal(signal.SIGTERM)
                if callable(lightning) and lightning is not self._handle:
                    self._forwarding = True
                    try:
                        lightning(signal.SIGTERM, frame)
                    finally:
                        self._forwarding = False
            return
        first = self.received
        self.received = first or name
        if first is not None:
            raise RunInterrupted(f"stopped at once by a second {name}", name)
        raise RunInterrupted(f"stopped by {name}", name)


JOB = JobSignals()


def stop_sweep_between_jobs(sweep_dir: Path, metric: str, where: str = "between two jobs") -> Callable[[str], None]:
    """What a signal between two jobs of a sweep does (or ``where`` it came): summarise the
    jobs so far, one line, exit."""

    def stop(name: str) -> None:
        from mlplab.sweeps import write_summary

        written = ""
        if sweep_dir.is_dir():
            try:
                write_summary(sweep_dir, metric)
                written = f"; the summary of the jobs so far is in {sweep_dir / 'summary.md'}"
            except Exception as err:  # the exit must not turn into a traceback
                written = f"; its summary could not be written ({err})"
        print(
            f"interrupted: the sweep was stopped by {name} {where}{written}; the jobs after it did not start",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_CODES.get(name, 130))

    return stop

"""DDP child ranks started by mlplab: Lightning's subprocess launcher with its spawning replaced.

Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv``. Under Hydra that
is the wrong command (a sweep would re-run the whole sweep): :class:`ChildLaunchingDDPStrategy`
swaps in a :class:`ChildLauncher` whose ``spawn`` starts the children the caller's way
(:mod:`mlplab.distributed` starts each as a single run of the current job). Outside the
verified Lightning versions the strategy keeps Lightning's own launcher.
"""

from __future__ import annotations

import subprocess
from typing import Any, Callable

from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import (
    _SubprocessScriptLauncher,
)

from mlplab.lightning_ext import supported


class ChildLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher whose child ranks ``spawn(launcher)`` starts.

    ``spawn`` returns the started processes, or None for Lightning's own way (``sys.argv``);
    ``started(procs)`` is called with them once they run.
    """

    def __init__(
        self,
        cluster_environment: Any,
        num_processes: int,
        num_nodes: int,
        spawn: Callable[["ChildLauncher"], list[subprocess.Popen] | None],
        started: Callable[[list[subprocess.Popen]], None],
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.spawn, self.started = spawn, started

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.started(list(self.procs))
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        procs = self.spawn(self)
        if procs is None:
            super()._call_children_scripts()
        else:
            self.procs.extend(procs)

    def check_can_spawn_children(self) -> None:
        """Lightning's check that this process may start children (not itself a child rank)."""
        self._check_can_spawn_children()


class ChildLaunchingDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose subprocess launcher is :meth:`make_launcher`'s (verified Lightning only)."""

    def make_launcher(self, cluster_environment: Any, num_processes: int, num_nodes: int) -> ChildLauncher:
        raise NotImplementedError

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if supported() and isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = self.make_launcher(self.cluster_environment, self.num_processes, self.num_nodes)

"""mlplab's launchers as Hydra plugins: Hydra instantiates launchers only from ``hydra_plugins``.

``hydra/launcher=joblib`` (``conf/hydra/launcher/joblib.yaml``) names :class:`JoblibLauncher`;
the implementation and its guarantees are in :mod:`mlplab.launchers`.
``hydra/launcher=population`` names :class:`PopulationLauncher` (:mod:`mlplab.population.launcher`).
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from mlplab.launchers import ProcessLauncher, drop_joblib_plugin_config
from mlplab.population.launcher import PopulationLauncher as _PopulationLauncher


class JoblibLauncher(ProcessLauncher):
    """Sweep jobs in parallel on this machine, each in a process of its own (:mod:`mlplab.launchers`)."""


class OwnJoblibPreset(SearchPathPlugin):
    """An app's own ``hydra/launcher/joblib.yaml`` is used as it is, not merged with
    hydra-joblib-launcher's config of the same name (:func:`mlplab.launchers.drop_joblib_plugin_config`)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        drop_joblib_plugin_config(search_path)


class PopulationLauncher(_PopulationLauncher):
    """Sweep jobs that can share one stacked model trained as one population (:mod:`mlplab.population.launcher`)."""

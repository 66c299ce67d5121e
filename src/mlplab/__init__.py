"""mlplab: classic MLP image classifiers with PyTorch Lightning and Hydra."""

from mlplab.errors import CheckpointError, ConfigError, DataError, MlplabError

__all__ = ["MlplabError", "ConfigError", "DataError", "CheckpointError"]
__version__ = "0.1.0"

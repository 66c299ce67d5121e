"""mlplab: classic MLP image classifiers with PyTorch Lightning and Hydra."""

from mlplab.errors import CheckpointError, ConfigError, DataError, DivergenceError, MlplabError, RunInterrupted

__all__ = ["MlplabError", "ConfigError", "DataError", "CheckpointError", "DivergenceError", "RunInterrupted"]
__version__ = "0.1.0"

"""One error family for everything a user can get wrong.

Messages name the key, the bad value and what is allowed; the entry points print them as
one line on stderr and exit non-zero (see :mod:`mlplab.cli`).
"""


class MlplabError(Exception):
    """Base class: a problem the user can fix (bad config, missing data, bad checkpoint)."""


class ConfigError(MlplabError, ValueError):
    """A config value is out of range or of the wrong type."""


class DataError(MlplabError):
    """Dataset files are missing or unusable."""


class CheckpointError(MlplabError):
    """A checkpoint path is missing, unreadable or not an mlplab checkpoint."""

"""Engines: what ``src/train.py`` and ``src/eval.py`` run, config in, metrics out.

- :mod:`~mlplab.engines.run`: ``fit(cfg)``, the one pipeline (validate -> seed -> build ->
  ``engine.fit`` -> report), and ``train(cfg)`` for sweepers;
- :mod:`~mlplab.engines.build`: everything built from a ``_target_``, checked first;
- one module per engine: :mod:`~mlplab.engines.lightning` (the default),
  :mod:`~mlplab.engines.ignite` (Lesson D's loop), :mod:`~mlplab.engines.numpy` (the
  lessons' NumPy net);
- :mod:`~mlplab.engines.eval`: ``evaluate(cfg)``, a checkpoint on its test set, and
  :mod:`~mlplab.engines.checkpoints`, how a checkpoint is read.
"""

from mlplab.engines.eval import evaluate
from mlplab.engines.run import fit, train

__all__ = ["evaluate", "fit", "train"]

"""sklearn baselines on mlplab's own splits: what the classic tools get on the very same data.

    python -m mlplab.baselines                          # data=digits
    python -m mlplab.baselines data=moons
    python -m mlplab.baselines data=mnist baselines=logistic_regression,mlp

The data config is composed as ``src/train.py`` composes it (the same ``data=`` options and
overrides, the same ``data.split_seed``), so the train, val and test splits and the inputs
(scaled and normalised as the nets see them, flattened) are mlplab's. Each baseline is fit
on the train split only (as a run trains on it) and scored on val and test:

- ``logistic_regression``: ``LogisticRegression(max_iter=1000)`` -- what a net without
  hidden layers (``SimpleNet``'s linear map) can express;
- ``svc``: ``SVC()`` (RBF kernel, sklearn's defaults);
- ``mlp``: ``MLPClassifier(hidden_layer_sizes=(256, 128), random_state=seed)``, Adam with
  early stopping off, 200 iterations at most: ``relu_mlp``'s shape with sklearn's loop.

``seed=N`` seeds the stochastic ones (the MLP). Prints one Markdown table (val/acc,
test/acc, fit seconds); a bad option or key is one line and exit 2, as for ``train.py``.
On MNIST the SVC takes minutes on 2 CPU cores; ``baselines=...`` picks a subset.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

from mlplab.errors import ConfigError, MlplabError

EXIT_USER_ERROR = 2


def _logistic_regression(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000)


def _svc(seed: int) -> Any:
    from sklearn.svm import SVC

    return SVC()


def _mlp(seed: int) -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(256, 128), random_state=seed, max_iter=200)


#: ``baselines=`` options: name -> a factory taking the seed.
BASELINES: dict[str, Callable[[int], Any]] = {
    "logistic_regression": _logistic_regression,
    "svc": _svc,
    "mlp": _mlp,
}


def split_arrays(data_cfg: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The DataModule's train, val and test splits as flat float arrays (``x [n, features]``, ``y [n]``)."""
    from mlplab.engines.build import build_datamodule
    from mlplab.engines.run import load_data

    dm = build_datamodule(data_cfg)
    dm.check_available()
    load_data(dm)
    splits = {"train": dm.data_train, "val": dm.data_val, "test": dm.data_test}
    out = {}
    for name, ds in splits.items():
        if ds is None or len(ds) == 0:
            continue
        x, y = ds.tensors
        out[name] = (x.flatten(1).numpy(), y.numpy())
    return out


def run_baselines(data_cfg: Any, names: list[str], seed: int) -> list[dict[str, Any]]:
    """Fit each named baseline on the train split; its val and test accuracy and fit seconds."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"baselines={unknown[0]} is not an option; allowed: {', '.join(BASELINES)}")
    arrays = split_arrays(data_cfg)
    x_train, y_train = arrays["train"]
    rows = []
    for name in names:
        model = BASELINES[name](seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the MLP's "did not converge" after its 200 iterations: reported as such
            warnings.simplefilter("ignore")
            model.fit(x_train, y_train)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"baseline": name, "fit_s": seconds}
        for split in ("val", "test"):
            if split in arrays:
                x, y = arrays[split]
                row[f"{split}/acc"] = float((model.predict(x) == y).mean())
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], data: str) -> str:
    lines = ["| data | baseline | val/acc | test/acc | fit (s) |", "|---|---|---|---|---|"]
    for r in rows:
        val = f"{r['val/acc']:.4f}" if "val/acc" in r else ""
        test = f"{r['test/acc']:.4f}" if "test/acc" in r else ""
        lines.append(f"| {data} | {r['baseline']} | {val} | {test} | {r['fit_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mlplab.cli import register_resolvers
    from mlplab.commandline import check_command_line
    from mlplab.groups import CONF_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("baselines=")]
    names = chosen[-1].split(",") if chosen else list(BASELINES)
    overrides = [a for a in args if not a.startswith("baselines=")]
    register_resolvers()
    check_command_line(["baselines", *overrides], "train", Path(CONF_DIR))  # one line and exit 2, as train.py
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    choice = cfg.hydra.runtime.choices.data  # data= as composed: experiment=mnist_fast says mnist
    try:
        rows = run_baselines(cfg.data, names, int(cfg.seed))
    except MlplabError as err:
        text = str(err).strip()
        print(f"error: {text.splitlines()[0] if text else type(err).__name__}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(table(rows, choice), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

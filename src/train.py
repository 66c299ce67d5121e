"""Train a classifier: ``python src/train.py [group=option ...] [key=value ...]``.

See ``python src/train.py --help`` and README.md.
"""

import sys

import hydra
from omegaconf import DictConfig

from mlplab.cli import expand_resume, register_resolvers, set_project_root, user_errors_exit
from mlplab.training import train

set_project_root(__file__)
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    sys.argv = expand_resume(sys.argv)
    main()

"""Train a classifier: ``python src/train.py [group=option ...] [key=value ...]``.

See ``python src/train.py --help`` and README.md.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mlplab.cli import expand_resume, prepare_argv, register_resolvers, run_job, set_project_root
from mlplab.commandline import check_command_line

set_project_root(__file__)
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Returns cfg.optimized_metric for Hydra sweepers (Optuna); run.json records the rest.
    from mlplab.engines import fit  # torch and Lightning load once the command line is checked

    return run_job(cfg, fit)


if __name__ == "__main__":
    sys.argv = expand_resume(sys.argv)  # resume=<run dir>: that run's config, in that dir
    prepare_argv()
    check_command_line(sys.argv, "train", Path(__file__).resolve().parents[1] / "conf")  # Hydra's refusals, one line
    main()

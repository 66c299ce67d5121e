"""Evaluate a checkpoint on its test set: ``python src/eval.py ckpt_path=PATH``."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mlplab.cli import prepare_argv, register_resolvers, run_job, set_project_root
from mlplab.commandline import check_command_line

set_project_root(__file__)
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from mlplab.engines import evaluate  # torch and Lightning load once the command line is checked

    run_job(cfg, evaluate)


if __name__ == "__main__":
    prepare_argv()
    check_command_line(sys.argv, "eval", Path(__file__).resolve().parents[1] / "conf")  # Hydra's refusals, one line
    main()

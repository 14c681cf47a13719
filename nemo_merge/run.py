"""Run an experiment file the NeMo way: a Hydra script over ``asr-merge run``.

    python -m nemo_merge.run --config-path configs/experiments --config-name demo_nemo \\
        storage=outputs/demo/nemo-default executor=ray

The experiment is the same YAML ``asr-merge run`` reads (:mod:`merge_core.app.experiment.schema`),
run by the same code (:func:`merge_core.app.experiment.run_experiment`); Hydra supplies
``--config-path``, ``--config-name`` and ``key=value`` overrides (``+key=value`` adds a key).
"""

from __future__ import annotations

import sys

from nemo.core.config import hydra_runner
from nemo.utils import logging
from omegaconf import DictConfig, OmegaConf

from merge_core import MergeError
from merge_core.app.experiment import parse_experiment, run_experiment
from nemo_merge.hydra_args import config_path_from_cwd


@hydra_runner(config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    try:
        run_experiment(parse_experiment(OmegaConf.to_container(cfg, resolve=True), str(cfg.get("name") or "experiment")))
    except MergeError as e:
        logging.error(str(e))
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = config_path_from_cwd(sys.argv)
    main()

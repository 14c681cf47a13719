"""Merge ``.nemo`` experts the NeMo way: a Hydra script over asr-merge's recipes, of any kind.

    python -m nemo_merge.merge --config-path configs/recipes --config-name aode_nemo \\
        output=merged.nemo parameters.density=0.3

The recipe is the same YAML ``asr-merge merge`` reads (``method``, ``base_model``,
``models``, ``parameters``, ``output``, ...; ``greedy_soup`` and ``mam`` recipes too), run
by the same front door (:func:`merge_core.recipes.run_recipe`); Hydra supplies
``--config-path``, ``--config-name`` and ``key=value`` overrides (``+key=value`` adds a key).
"""

from __future__ import annotations

import sys

from nemo.core.config import hydra_runner
from nemo.utils import logging
from omegaconf import DictConfig

from merge_core import MergeError, run_recipe
from nemo_merge.hydra_args import config_path_from_cwd


@hydra_runner(config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    try:
        result = run_recipe(cfg)
    except MergeError as e:
        logging.error(str(e))
        sys.exit(2)
    logging.info(f"wrote {result.output} ({result.summary}) in {result.seconds:.1f} s")


if __name__ == "__main__":
    sys.argv = config_path_from_cwd(sys.argv)
    main()

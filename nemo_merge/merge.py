"""Merge ``.nemo`` experts the NeMo way: a Hydra script over the asr-merge recipe format.

    python -m nemo_merge.merge --config-path configs/recipes --config-name aode_nemo \\
        output=merged.nemo parameters.density=0.3

The recipe is the same YAML ``asr-merge merge`` reads (``method``, ``base_model``,
``models``, ``parameters``, ``output``, ...); Hydra supplies ``--config-path``,
``--config-name`` and ``key=value`` overrides (``+key=value`` adds a key).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from merge_core import MergeError, Recipe, merge
from nemo.core.config import hydra_runner
from nemo.utils import logging

from nemo_merge.hydra_args import config_path_from_cwd


@hydra_runner(config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    try:
        recipe = Recipe.from_mapping(cfg)
        result = merge(recipe)
    except MergeError as e:
        logging.error(str(e))
        sys.exit(2)
    logging.info(
        f"wrote {result.output} ({result.merged} tensors merged by {recipe.method}, {result.copied} copied) "
        f"in {result.seconds:.1f} s"
    )


if __name__ == "__main__":
    sys.argv = config_path_from_cwd(sys.argv)
    main()

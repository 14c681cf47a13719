"""Merge SpeechBrain checkpoints from a SpeechBrain-style command line, recipes of any kind.

    python -m speechbrain_merge.merge configs/recipes/aode_speechbrain.yaml \\
        --output=results/aode/save/CKPT+aode --parameters.density=0.3

The recipe is the YAML ``asr-merge merge`` reads (``method``, ``base_model``,
``models``, ``parameters``, ``include``/``exclude``, ``output``, ...; ``greedy_soup`` and
``mam`` recipes too), with ``CKPT+`` checkpoint folders as models (see
:mod:`speechbrain_merge.checkpoint_io`), run by the same front door
(:func:`merge_core.recipes.run_recipe`); ``--key=value`` overrides any of its keys,
dotted keys and list indices included (``--models.1.weight=2``). Exit status 2 on bad
input, with the error on stderr.
"""

from __future__ import annotations

import sys
from typing import Sequence

from merge_core import MergeError, run_recipe
from speechbrain_merge.arguments import parse_arguments


def main(argv: Sequence[str] | None = None) -> int:
    recipe_file, _run_opts, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        result = run_recipe(recipe_file, overrides)
    except MergeError as e:
        print(f"speechbrain_merge.merge: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.output} ({result.summary}) in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

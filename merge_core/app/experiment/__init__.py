"""The papers' procedures on a user's own data, as one experiment file
(``asr-merge run EXPERIMENT.yaml [key=value ...]``), on this machine or on Ray.

- :mod:`~merge_core.app.experiment.schema`: the file's keys, checked before anything runs;
- :mod:`~merge_core.app.experiment.procedures`: single-domain experts (full or LoRA),
  sequential fine-tuning, merges, iterative AoDE, sequential editing, MAST, MAcT, SMAcT and
  the forgetting-budget search, each a registered function;
- :mod:`~merge_core.app.experiment.graph`: the jobs, content-addressed and resumable;
- :mod:`~merge_core.app.experiment.executors`: ``local`` processes or ``ray`` tasks;
- :mod:`~merge_core.app.experiment.progress`: the live view and the log;
- :mod:`~merge_core.app.experiment.runner`: all of it, then the forgetting report.

The demo (``asr-merge demo``) is such experiments over the synthetic corpus:
``configs/experiments/demo_*.yaml``.
"""

from merge_core.app.experiment.procedures import PROCEDURES, procedure
from merge_core.app.experiment.runner import ExperimentFailed, run_experiment
from merge_core.app.experiment.schema import Experiment, load_experiment, parse_experiment

__all__ = ["PROCEDURES", "Experiment", "ExperimentFailed", "load_experiment", "parse_experiment", "procedure",
           "run_experiment"]

"""Errors raised for bad input. Each message names the file, tensor or recipe key at fault."""


class MergeError(Exception):
    """Base class: anything the user can fix in their inputs or recipe."""


class RecipeError(MergeError):
    """The recipe is malformed: unknown key, bad value, wrong model count."""


class CheckpointError(MergeError):
    """A checkpoint file is missing, unreadable, corrupt or not weights-only."""


class TensorMismatchError(MergeError):
    """Checkpoints disagree on key sets, shapes or dtype kinds."""


class NonFiniteError(MergeError):
    """An input tensor holds NaN or Inf and ``allow_nonfinite`` is off."""


class EvaluationError(MergeError):
    """Bad evaluation input: unknown normalisation key, mismatched hypothesis and
    reference lists, a model or test set missing from the results."""


class ManifestError(EvaluationError):
    """A manifest is empty, malformed, or names audio that cannot be read."""


class TrainingConfigError(MergeError):
    """A fine-tuning setting (LLRD, schedule, LoRA, snapshots) is invalid; the message
    names the config key or module at fault."""


class CorpusError(MergeError):
    """A corpus folder, transcript, audio file or text source is missing or malformed,
    or a build clashes with an earlier one; the message names the path at fault."""


class OutputError(MergeError):
    """An output cannot be written: the disk or quota is full, or the folder is not
    writable; the message names the output and the folder."""


class SearchError(MergeError):
    """A forgetting-budget search cannot run (Optuna is missing, its study belongs to
    another recipe) or found no merge within its budget; the message names the study."""

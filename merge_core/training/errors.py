"""The error raised for bad fine-tuning settings."""

from merge_core.errors import MergeError


class TrainingConfigError(MergeError):
    """A fine-tuning setting (LLRD, schedule, LoRA, snapshots) is invalid; the message
    names the config key or module at fault."""

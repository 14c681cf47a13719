"""The error raised when a corpus cannot be built or prepared."""

from merge_core.errors import MergeError


class CorpusError(MergeError):
    """A corpus folder, transcript, audio file or text source is missing or malformed,
    or a build clashes with an earlier one; the message names the path at fault."""

"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix; the message says how."""

"""The one user-facing error type. Framework-free (the teacher tool raises it too)."""


class BonsaiError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero (never a traceback)."""

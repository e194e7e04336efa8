"""The one error type for what the user can fix: a setting, an input file, a run directory, a missing extra.

The CLI prints a `UserError` as one line and exits 2; anything else is a bug and keeps its traceback (exit 1).
It is a `ValueError`, so library callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Something the user can fix; its message names the file, row or setting."""


class MissingFile(UserError, FileNotFoundError):
    """A file or a stage's output the user named or must make first is not there; the message says which."""

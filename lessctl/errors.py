"""The one exception type the CLI turns into a one-line error (exit code 2)."""


class LessctlError(Exception):
    """Bad input or a missing resource; `str(err)` is one line naming the bad value."""


class InputError(LessctlError, ValueError):
    """A bad value handed to a library function (still a ValueError for library callers)."""

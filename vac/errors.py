"""One exception type for every user-facing failure.

A ``VacError`` message says what was wrong and what to do about it; the CLIs print it on
one line and exit with status 2 instead of a traceback.
"""


class VacError(Exception):
    """A problem with the user's input or environment, with a fix in the message."""

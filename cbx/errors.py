"""The one error type that user-facing code raises for bad input.

The CLI turns a :class:`CbxError` into a one-line message on stderr and exit status 2, so a
bad config, checkpoint, audio file or argument never ends in a traceback or a half-written
output. Library callers can catch it like any exception.
"""


class CbxError(Exception):
    """Bad input that the user can fix: the message names the file, key or value and the problem."""

    exit_code = 2

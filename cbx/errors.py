"""The one error type that user-facing code raises for bad input.

The CLI turns a :class:`CbxError` into a one-line message on stderr and exit status 2, so a
bad config, checkpoint, audio file or argument never ends in a traceback or a half-written
output. Library callers can catch it like any exception.
"""


class CbxError(Exception):
    """Bad input that the user can fix: the message names the file, key or value and the problem."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into an exception by the CLI, so that ``finally`` blocks and the
    runner's failure marking run as they do for Ctrl-C. ``signal`` is the signal number."""

    def __init__(self, signal: int):
        super().__init__(signal)
        self.signal = signal


# errno values that mean "the machine refused to store it", not "the program is wrong".
_RESOURCE_ERRNOS = {
    "ENOSPC": "disk full",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
}


def resource_fault(exc: BaseException) -> str | None:
    """``"disk full"``, ``"read-only file system"``, ... for an OSError that is a resource
    fault, else None."""
    import errno

    if isinstance(exc, OSError) and exc.errno is not None:
        return _RESOURCE_ERRNOS.get(errno.errorcode.get(exc.errno, ""))
    return None


def os_error_message(exc: OSError) -> str:
    """One line naming the fault and the file: ``disk full: cannot write runs/x/a.wav (No
    space left on device)``."""
    kind = resource_fault(exc)
    name = exc.filename if exc.filename is not None else ""
    where = f" {name}" if name else ""
    detail = exc.strerror or str(exc)
    if kind:
        verb = "write" if kind in ("disk full", "disk quota exceeded", "read-only file system") else "access"
        return f"{kind}: cannot {verb}{where} ({detail})"
    return f"{type(exc).__name__}:{where} {detail}".rstrip()

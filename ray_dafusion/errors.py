"""The two kinds of failure a user sees, and how each becomes one line on stderr.

- :class:`ConfigError`: a config value cannot work (exit code 2). The message names the field,
  the value and the fix.
- :class:`StageError`: a stage could not finish its work (exit code 1): a class failed, an output
  is inconsistent, a loss became non-finite. The message says what failed and what to do.

Other ordinary failures (a missing file, an S3 error, a bad input value) keep their own types
and are reported the same way as StageError by the command line and the job scripts.
"""

from __future__ import annotations

__all__ = ["ConfigError", "StageError", "ORDINARY_FAILURES", "one_line"]


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


class StageError(RuntimeError):
    """A stage could not finish; the message says what failed and what to do about it."""


# What a stage raises for bad input or a failed run, as opposed to a bug in the code.
ORDINARY_FAILURES: tuple[type[BaseException], ...] = (
    StageError, ValueError, OSError, FloatingPointError, RuntimeError,
)


def one_line(exc: BaseException) -> str:
    """The message of `exc` without a traceback: Ray wraps task errors with the remote traceback,
    so the last non-empty line (``SomeError: message``) is what the user needs."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError carries the original
    if isinstance(cause, BaseException) and cause is not exc:
        return one_line(cause)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) == 1:
        return lines[0]
    return lines[-1]

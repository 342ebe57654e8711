"""The two kinds of failure a user sees, and how each becomes one line on stderr.

- :class:`ConfigError`: a config value cannot work (exit code 2). The message names the field,
  the value and the fix.
- :class:`StageError`: a stage could not finish its work (exit code 1): a class failed, an output
  is inconsistent, a loss became non-finite. The message says what failed and what to do.

Other ordinary failures (a missing file, an S3 error, a bad input value) keep their own types
and are reported the same way as StageError by the command line and the job scripts; so are
Ray's errors (:func:`ordinary_failures`): a stage's error raised inside a Ray Data task or actor
reaches the driver wrapped (``RayTaskError(UserCodeException)``, ``ActorDiedError``), and
:func:`one_line` digs the original message out of the remote traceback.
"""

from __future__ import annotations

import re

__all__ = ["ConfigError", "StageError", "ORDINARY_FAILURES", "ordinary_failures", "one_line"]


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


class StageError(RuntimeError):
    """A stage could not finish; the message says what failed and what to do about it."""


# What a stage raises for bad input or a failed run, as opposed to a bug in the code.
ORDINARY_FAILURES: tuple[type[BaseException], ...] = (
    StageError, ValueError, OSError, FloatingPointError, RuntimeError,
)


def ordinary_failures() -> tuple[type[BaseException], ...]:
    """ORDINARY_FAILURES and Ray's own errors (a stage's error from a worker arrives as one of them)."""
    from ray.exceptions import RayError  # here, so that importing this module does not import Ray

    return ORDINARY_FAILURES + (RayError,)


# Ray Data raises a worker's error as RayTaskError(UserCodeException), whose remote traceback holds
# the user's error, then this line, then Ray Data's wrapper (with a hint about retries).
_WRAPPED = "The above exception was the direct cause of the following exception:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException) -> str:
    """The message of `exc` without a traceback: Ray wraps task errors with the remote traceback,
    so the last non-empty line (``SomeError: message``) is what the user needs, of the part before
    Ray Data's UserCodeException when the error passed through Ray Data."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError carries the original
    wrapped = type(cause).__name__ == "UserCodeException"  # Ray Data's wrapper: the original is only text
    if isinstance(cause, BaseException) and cause is not exc and not wrapped:
        return one_line(cause)
    text = _ANSI.sub("", str(exc))
    if wrapped and _WRAPPED in text:
        text = text.rsplit(_WRAPPED, 1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1]

"""One log format for every stage: ``HH:MM:SS stage: message`` on stderr.

Modules log through ``logging.getLogger(__name__)``; the library never configures logging at
import. The command line, the job scripts and the Ray tasks and actors that do long work call
:func:`setup_logging` once (it is idempotent). Ray Data's own progress output is left as it is.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging", "FORMAT"]

FORMAT = "%(asctime)s %(stage)s: %(message)s"
_PACKAGE = "ray_dafusion"


class _StageFormatter(logging.Formatter):
    """`ray_dafusion.augment` -> `augment`; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.removeprefix(_PACKAGE + ".") if record.name != _PACKAGE else _PACKAGE
        record.stage = stage if record.levelno < logging.WARNING else f"{stage} {record.levelname.lower()}"
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (tests and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send the package's log records to stderr in the one format (once per process)."""
    logger = logging.getLogger(_PACKAGE)
    logger.setLevel(level)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(_StageFormatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)

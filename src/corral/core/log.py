"""corral's log: what a supervisor or guard has to say that is not an answer to a command
(a journal that failed, an on_incident program that could not start), with a timestamp and a
level, on standard error: the supervisor's goes to /run/corral/NAME/supervisor.log, `corral
run`'s to the terminal. Python's logging is imported on the first message only, so the launch
path, which has nothing to say when all is well, does not pay for it (~8 ms)."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

_logger: Any = None


def _get() -> Any:
    global _logger
    if _logger is None:
        import logging

        from corral.core.text import iso

        class Formatter(logging.Formatter):
            def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
                return iso(record.created)  # the one timestamp format

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(Formatter(f"%(asctime)s %(levelname)s corral[{os.getpid()}]: "
                                       "%(message)s"))
        _logger = logging.getLogger("corral")
        _logger.addHandler(handler)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False
    return _logger


def info(message: str) -> None:
    _get().info(message)


def warning(message: str) -> None:
    _get().warning(message)


def error(message: str) -> None:
    _get().error(message)

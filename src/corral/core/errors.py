"""Errors that reach the user as `FILE: key.path: message` lines, and the exit codes of the spec."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from corral.core.record import record

EXIT_OK = 0
EXIT_RUNTIME = 1  # failed at run time; the message says what and what was left as it was
EXIT_USAGE = 2  # bad input or usage: manifest errors, unknown service
EXIT_CHECK = 3  # a check found a problem
# `corral exec` passes its command's exit code through, so its own failures take the codes
# Docker and podman reserve for theirs, which a command's 1, 2 or 3 cannot be mistaken for.
EXIT_EXEC_FAILED = 125  # corral itself failed (not root, not running, no such process, usage)
EXIT_CANNOT_EXECUTE = 126  # the command was found but could not be executed
EXIT_NOT_FOUND = 127  # the command was not found


def key_path(loc: Sequence[str | int]) -> str:
    """("process", "app", "connect", 1) -> "process.app.connect[1]"; keys that are not bare
    TOML keys are quoted, as TOML would: image.add."/opt/app"."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        part = str(part)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", part):
            part = json.dumps(part)
        text += f".{part}" if text else part
    return text


_CONTROLS = r"[\x00-\x1f\x7f-\x9f]"  # compiled (and cached) by re at the first error shown


def escape_controls(text: str) -> str:
    """"a\nb" -> "a\\nb": one line, printable, still recognisable."""
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return re.sub(_CONTROLS, lambda m: named.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


@record(frozen=True)
class Problem:
    """One thing wrong with one input file; `loc` is empty for file-level problems."""

    file: str
    loc: tuple[str | int, ...]
    message: str

    def __post_init__(self) -> None:
        # Messages quote the user's values; control characters in them must not break the
        # one-line format or reach a terminal raw (escape sequences).
        object.__setattr__(self, "message", escape_controls(self.message))
        object.__setattr__(self, "file", escape_controls(self.file))

    def __str__(self) -> str:
        where = key_path(self.loc)
        return f"{self.file}: {where}: {self.message}" if where else f"{self.file}: {self.message}"


class CorralError(Exception):
    """Base of the errors corral reports without a traceback; `exit_code` per the spec."""

    exit_code = EXIT_RUNTIME


class UsageError(CorralError):
    exit_code = EXIT_USAGE


class InputError(UsageError):
    """Bad input files: one or more problems, each printed on its own line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RuntimeFailure(CorralError):
    exit_code = EXIT_RUNTIME


class ExecFailure(RuntimeFailure):
    """`corral exec` could not run its command: 125, 126 or 127 (EXIT_EXEC_FAILED...)."""

    def __init__(self, message: str, exit_code: int = EXIT_EXEC_FAILED):
        super().__init__(message)
        self.exit_code = exit_code

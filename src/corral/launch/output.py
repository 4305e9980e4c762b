"""A contained process's output: the pipe it writes to (stdout and stderr), which the
supervisor copies to /run/corral/NAME/logs/PROCESS.log and, for `corral run`, to the terminal
as "PROCESS| line". Through the supervisor rather than an open log file, so that the process
cannot rewrite or truncate what it already logged.

Copied in batches, at most every BATCH seconds, not at every write: one wake of the
supervisor's (Python) loop per line cost a line-per-request service a quarter of its request
rate (bench/run.sh, part (c)). The pipe holds what a batch window's output can be, so no
writer waits.
"""

from __future__ import annotations

import fcntl
import os
from typing import TextIO

BATCH = 0.025  # seconds
PIPE_SIZE = 1 << 20
MAX_READS = 16  # per copy: a process that writes without pause must not hold the loop


class Output:
    def __init__(self, name: str, log_path: str, echo: TextIO | None = None):
        self.name, self.echo = name, echo
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        try:
            fcntl.fcntl(self.read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above /proc/sys/fs/pipe-max-size: the default 64 KiB will do
            pass
        self.log = open(log_path, "a")
        self.partial = ""  # echoed text after its last newline (a line split between reads)
        self.paused_until: float | None = None  # set while the supervisor is not watching

    def copy(self) -> None:
        """Copy what is in the pipe now."""
        for _ in range(MAX_READS):
            try:
                data = os.read(self.read_fd, PIPE_SIZE)
            except BlockingIOError:
                return
            if data:
                self._write(data.decode(errors="replace"))
            if len(data) < PIPE_SIZE:
                return

    def _write(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()
        if self.echo is not None:
            *lines, self.partial = (self.partial + text).split("\n")
            self._echo(lines)

    def _echo(self, lines: list[str]) -> None:
        if self.echo is not None and lines:
            for line in lines:
                self.echo.write(f"{self.name}| {line}\n")
            self.echo.flush()

    def end(self) -> None:
        """The process is gone: echo its last line, even without a newline."""
        if self.partial:
            self._echo([self.partial])
            self.partial = ""

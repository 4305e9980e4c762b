"""A contained process's output: the pipe it writes to (stdout and stderr), which the
supervisor copies line by line, stamped, to /var/log/corral/NAME/PROCESS.log (launch.logfile:
size-rotated, forwarded to journald or syslog) and, for `corral run`, to the terminal as
"PROCESS| line". Through the supervisor rather than an open log file, so that the process
cannot rewrite or truncate what it already logged.

Copied in batches, at most every BATCH seconds, not at every write: one wake of the
supervisor's (Python) loop per line cost a line-per-request service a quarter of its request
rate (bench/run.sh, part (c)). The pipe holds what a batch window's output can be, so no
writer waits.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import deque

from corral.launch.logfile import MAX_LINE, Forward, LogFile

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import TextIO

BATCH = 0.025  # seconds
PIPE_SIZE = 1 << 20
MAX_READS = 16  # per copy: a process that writes without pause must not hold the loop
RECENT = 5  # lines kept for a failure's excerpt


class Output:
    def __init__(self, name: str, log: LogFile, forward: Forward | None = None,
                 echo: TextIO | None = None):
        self.name, self.echo, self.log, self.forward = name, echo, log, forward
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        try:
            fcntl.fcntl(self.read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above /proc/sys/fs/pipe-max-size: the default 64 KiB will do
            pass
        self.partial = ""  # text after its last newline (a line split between reads)
        self.paused_until: float | None = None  # set while the supervisor is not watching
        # The last lines since the process last started: a failure quotes these, never a
        # line of an earlier run.
        self.recent: deque[str] = deque(maxlen=RECENT)

    def mark(self) -> None:
        """A new run of the process starts: what came before is not its output."""
        self.recent.clear()

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
        *lines, self.partial = (self.partial + text).split("\n")
        if len(self.partial) > MAX_LINE:  # no newline for this long: a line of its own
            lines.append(self.partial)
            self.partial = ""
        self._lines(lines)

    def _lines(self, lines: list[str]) -> None:
        if not lines:
            return
        self.log.write_lines(lines, time.time())
        self.recent.extend(line[:500] for line in lines)
        if self.forward is not None:
            for line in lines:
                self.forward.send(line)
        if self.echo is not None:
            for line in lines:
                self.echo.write(f"{self.name}| {line}\n")
            self.echo.flush()

    def end(self) -> None:
        """The process is gone: its last line, even without a newline."""
        if self.partial:
            self._lines([self.partial])
            self.partial = ""

    def close(self) -> None:
        self.log.close()
        if self.forward is not None:
            self.forward.close()

"""Where a process's output is kept: a size-rotated file under /var/log/corral/NAME, each line
stamped with the time the supervisor read it, and a copy to journald (or syslog) where one runs,
at a bounded line rate.

Size-rotated, like logrotate's `size` with `rotate N`, but by the writer itself: PROCESS.log
grows to `size` bytes, then becomes PROCESS.log.1 (.1 becomes .2, ...; the oldest of `files`
goes), so a flood costs at most (files + 1) x size of disk and never fills it. Only the
supervisor (root) writes here; the service cannot reach this directory.

The forward is rate-limited (a token bucket per process) because journald and syslog are shared
with the host: a service must not be able to drown the host's own messages. The file keeps
every line; the forward says how many lines it skipped.
"""

from __future__ import annotations

import os
import socket
import time

from corral.core.paths import corral_root
from corral.core.text import iso

SIZE = 10 << 20  # bytes per file
FILES = 5  # rotated files kept besides the current one
RATE = 200  # lines per second to journald/syslog (burst: RATE * 5)
MAX_LINE = 16 << 10  # a longer line is cut in the file, and in the forward


class Forward:
    """journald's native socket, else syslog's /dev/log; under CORRAL_ROOT only the sockets
    inside it (a test's own), so a throwaway root never writes to the host's journal."""

    def __init__(self, service: str, process: str, rate: int):
        self.ident = f"corral-{service}"
        self.process = process
        self.rate, self.tokens, self.last = float(rate), float(rate) * 5, time.monotonic()
        self.dropped = 0
        self.sock: socket.socket | None = None
        self.kind = ""
        root = str(corral_root())
        for kind, path in (("journal", "run/systemd/journal/socket"), ("syslog", "dev/log")):
            full = os.path.join(root, path)
            if rate <= 0 or not os.path.exists(full):
                continue
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.connect(full)
                sock.setblocking(False)  # a stuck journal must never stop the supervisor
            except OSError:
                continue
            self.sock, self.kind = sock, kind
            break

    def send(self, line: str) -> None:
        if self.sock is None:
            return
        now = time.monotonic()
        self.tokens = min(self.rate * 5, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.dropped += 1
            return
        if self.dropped:
            skipped, self.dropped = self.dropped, 0
            self._send(f"{skipped} lines not forwarded (more than {self.rate:.0f}/s); "
                       "all are in corral logs")
        self.tokens -= 1
        self._send(line)

    def _send(self, line: str) -> None:
        if self.kind == "journal":
            data = (f"SYSLOG_IDENTIFIER={self.ident}\nCORRAL_PROCESS={self.process}\n"
                    "PRIORITY=6\n").encode()
            text = line.encode(errors="replace")
            data += b"MESSAGE\n" + len(text).to_bytes(8, "little") + text + b"\n"
        else:
            data = f"<30>{self.ident}/{self.process}: {line}".encode(errors="replace")
        try:
            assert self.sock is not None
            self.sock.send(data)
        except OSError:
            self.dropped += 1  # full or gone: counted, said with the next line that goes

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class LogFile:
    def __init__(self, directory: str, process: str, size: int = SIZE, files: int = FILES):
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self.path = os.path.join(directory, f"{process}.log")
        self.size, self.files = max(4096, size), max(1, files)
        self.fd = -1
        self.written = 0
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                          | os.O_NOFOLLOW, 0o640)
        self.written = os.fstat(self.fd).st_size

    def _rotate(self) -> None:
        os.close(self.fd)
        for k in range(self.files - 1, 0, -1):
            older = f"{self.path}.{k}"
            if os.path.lexists(older):
                os.replace(older, f"{self.path}.{k + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()

    def write_lines(self, lines: list[str], at: float) -> None:
        """One write per file: a batch larger than what is left of `size` is split where the
        file is rotated, so no file grows beyond `size` (plus one line)."""
        stamp = iso(at)
        chunk: list[bytes] = []
        used = self.written
        for line in lines:
            data = f"{stamp} {line[:MAX_LINE]}\n".encode(errors="replace")
            if used and used + len(data) > self.size:
                self._flush(chunk)
                chunk = []
                self._rotate()
                used = 0
            chunk.append(data)
            used += len(data)
        self._flush(chunk)

    def _flush(self, chunk: list[bytes]) -> None:
        if chunk:
            data = b"".join(chunk)
            os.write(self.fd, data)
            self.written += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def files_of(directory: str, process: str) -> list[str]:
    """A process's log files, oldest first."""
    base = os.path.join(directory, f"{process}.log")
    rotated = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(f"{process}.log.") and name.rsplit(".", 1)[1].isdigit():
            rotated.append((int(name.rsplit(".", 1)[1]), os.path.join(directory, name)))
    return [p for _, p in sorted(rotated, reverse=True)] + ([base] if os.path.exists(base)
                                                            else [])

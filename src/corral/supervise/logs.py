"""`corral logs NAME [PROCESS]`: the processes' output from /var/log/corral/NAME, rotated files
included, oldest first; with `follow`, new lines as they are written (across a rotation)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

from corral.core.errors import UsageError
from corral.core.text import parse_iso
from corral.launch.logfile import files_of

_RELATIVE = re.compile(r"^([0-9]+)(s|m|h|d)$")


def since_time(text: str) -> float:
    """An ISO time ("2026-12-04T10:00:00Z", a date alone too) or an age ("10m", "2h")."""
    match = _RELATIVE.match(text.strip())
    if match:
        return time.time() - int(match.group(1)) * {"s": 1, "m": 60, "h": 3600,
                                                    "d": 86400}[match.group(2)]
    raw = text.strip()
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw):
        raw += "T00:00:00Z"
    if not raw.endswith("Z"):
        raw += "Z"
    try:
        return parse_iso(raw)
    except ValueError:
        raise UsageError(f"--since {text!r}: expected an ISO time (2026-12-04T10:00:00Z) or "
                         "an age like 10m, 2h, 1d") from None


def _parse(process: str, raw: str) -> dict[str, Any]:
    stamp, _, text = raw.partition(" ")
    return {"at": stamp, "process": process, "text": text}


def _after(line: dict[str, Any], since: float | None) -> bool:
    if since is None:
        return True
    try:
        return parse_iso(line["at"]) >= since
    except ValueError:
        return True


def read(directory: str, processes: list[str], since: float | None) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for process in processes:
        for path in files_of(directory, process):
            try:
                with open(path, errors="replace") as handle:
                    lines.extend(line for raw in handle
                                 if _after(line := _parse(process, raw.rstrip("\n")), since))
            except OSError:
                continue
    lines.sort(key=lambda line: line["at"])  # stable: one process's order is kept
    return lines


def follow(directory: str, processes: list[str], timeout: float | None = None,
           interval: float = 0.2) -> Iterator[dict[str, Any]]:
    """New lines from now on; a rotated file is read to its end, then the new one from 0."""
    state: dict[str, tuple[int, int]] = {}  # process -> (inode, offset)
    for process in processes:
        path = os.path.join(directory, f"{process}.log")
        try:
            st = os.stat(path)
            state[process] = (st.st_ino, st.st_size)
        except OSError:
            state[process] = (0, 0)
    end = None if timeout is None else time.monotonic() + timeout
    partial: dict[str, str] = {}
    while end is None or time.monotonic() < end:
        for process in processes:
            path = os.path.join(directory, f"{process}.log")
            inode, offset = state[process]
            try:
                st = os.stat(path)
            except OSError:
                continue
            chunks = []
            if inode and st.st_ino != inode:  # rotated: finish the old file (now .1)
                chunks.append(_read_from(f"{path}.1", offset, inode))
                offset = 0
            chunks.append(_read_from(path, offset, st.st_ino))
            state[process] = (st.st_ino, offset + len(chunks[-1].encode()))
            text = partial.pop(process, "") + "".join(chunks)
            *complete, rest = text.split("\n")
            if rest:
                partial[process] = rest
            for raw in complete:
                yield _parse(process, raw)
        time.sleep(interval)


def _read_from(path: str, offset: int, inode: int) -> str:
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_ino != inode:
                return ""
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""

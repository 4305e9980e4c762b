"""Incident records: append-only JSON lines in the state directory, fsynced, one line each also
in the system log. An incident stays open until an administrator closes it (`corral incidents
NAME --close ID|all`); closing appends a record, nothing is ever rewritten."""

from __future__ import annotations

import json
import os
import time

from corral.core import text

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

    from corral.core.fsio import StrPath

FILE = "incidents.jsonl"


iso = text.iso  # the one timestamp format (core.text); kept here for the records' callers


def new_id() -> str:
    # os.urandom rather than secrets: the same kernel source, without importing hmac and
    # hashlib on every start of the supervisor.
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


def append(state: StrPath, record: dict[str, Any]) -> None:
    """One line, written with a single write() on an O_APPEND descriptor, then fsynced."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(os.path.join(state, FILE),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def to_syslog(record: dict[str, Any]) -> None:
    import syslog

    syslog.openlog("corral", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_ALERT, "incident " + json.dumps(record, sort_keys=True))


def read(state: StrPath) -> list[dict[str, Any]]:
    """Every incident, oldest first, with its close merged in."""
    incidents: dict[str, dict[str, Any]] = {}
    try:
        with open(os.path.join(state, FILE)) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash: ignored, the rest stands
                ident = record.get("id")
                if not isinstance(ident, str):
                    continue
                if record.get("type") == "close":
                    if ident in incidents:
                        incidents[ident]["closed_at"] = record.get("closed_at")
                elif record.get("type") == "update":
                    if ident in incidents:
                        incidents[ident].update(record.get("fields", {}))
                else:
                    record.setdefault("closed_at", None)
                    incidents[ident] = record
    except FileNotFoundError:
        pass
    return list(incidents.values())


def open_ones(state: StrPath) -> list[dict[str, Any]]:
    return [i for i in read(state) if not i.get("closed_at")]


def close(state: StrPath, which: str) -> list[str]:
    """Close one incident by id, or "all" open ones; returns the ids closed."""
    targets = [i["id"] for i in open_ones(state) if which in ("all", i["id"])]
    now = iso(time.time())
    for ident in targets:
        append(state, {"type": "close", "id": ident, "closed_at": now})
    return targets

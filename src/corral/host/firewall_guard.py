"""The dead man's switch of `corral host apply`: state files, table snapshots, the guard.

This is what the detached guard process runs (`python -m corral.host.firewall_guard guard ...`),
so it
imports nothing but the standard library, `nftables`, `paths` and `text`: it starts in tens of ms.

    snapshot  the table as it is now: `nft -j list table inet corral-host` (to restore) and the
              text listing (to verify the restore), or "absent"
    restore   add+delete the table, then its saved objects, in one transaction: only
              corral-host ever changes, and `nft list table` prints what it printed when saved
    guard     started by apply before the new table goes in: double fork (re-parented to init
              or the nearest subreaper, nobody's child), own session (no SIGHUP when the admin's
              SSH dies), stdio on guard.log. Sleeps for the timeout, then, under the lock, rolls
              back if pending.json still carries its token; confirm removing pending.json is
              what disarms it (the SIGTERM after that only tidies up)

If the restore fails, the guard deletes table corral-host instead: its whole point is that
nobody stays locked out, and without corral-host nothing of ours filters the host.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.core.errors import RuntimeFailure
from corral.core.fsio import write_json
from corral.core.paths import lib_root
from corral.core.text import iso
from corral.host import nft
from corral.plan.host_rules import TABLE

# The state directory's name under /var/lib/corral; nft_rules.table_name(STATE) == TABLE.
STATE = "host"
_TABLE = {"table": {"family": "inet", "name": TABLE}}


def state_dir() -> Path:
    return Path(lib_root(), STATE)


def now() -> str:
    return iso(time.time())  # the one timestamp format (core.text)


# ---------------------------------------------------------------- state files

@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{path}: unreadable ({exc})") from None


def write(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a killed corral leaves the old file or the new one, never half of one."""
    write_json(path, data)


def put(path: Path, data: dict[str, Any] | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
    else:
        write(path, data)


# ---------------------------------------------------------------- the table in the kernel

def snapshot() -> dict[str, Any]:
    """The table as it is now: its JSON listing (to restore) and text listing (to verify)."""
    if not nft.table_exists(STATE):
        return {"present": False, "saved_at": now()}
    return {"present": True, "saved_at": now(),
            "listing": json.loads(nft.run(["-j", "list", "table", "inet", TABLE], None)),
            "text": nft.run(["list", "table", "inet", TABLE], None)}


def restore(saved: dict[str, Any]) -> bool:
    """Put the table back as saved, in one transaction; True if `nft list table` now prints
    exactly what it printed when saved (or the table is absent, as it was)."""
    cmds: list[dict] = [{"add": _TABLE}, {"delete": _TABLE}]
    if saved["present"]:
        # A listing fed back to nft adds each object; handles in it are ignored.
        cmds += [obj for obj in saved["listing"]["nftables"] if "metainfo" not in obj]
    nft.apply({"nftables": cmds})
    if not saved["present"]:
        return not nft.table_exists(STATE)
    return nft.run(["list", "table", "inet", TABLE], None) == saved["text"]


# ---------------------------------------------------------------- the guard

def _guard_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_running(pending: dict[str, Any]) -> bool:
    """Its pid is alive and still the guard with this token (pids get reused)."""
    return pending.get("token", "?") in _guard_cmdline(int(pending.get("guard_pid", 0)))


def stop_guard(pending: dict[str, Any]) -> None:
    if is_running(pending):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pending["guard_pid"]), signal.SIGTERM)


def start_guard(directory: Path, token: str, seconds: float) -> int:
    log = os.open(directory / "guard.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                  0o600)
    try:
        # close_fds (the default) matters: the guard must not inherit the lock or our caller's
        # pipes (a caller reading our output until EOF would wait for the guard otherwise).
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.host.firewall_guard", "guard", "--state", str(directory),
             "--token", token, "--after", repr(seconds)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd="/",
            start_new_session=True, text=True)
    finally:
        os.close(log)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeFailure("the rollback guard did not start within 30 s") from None
    if proc.returncode != 0 or not out.strip().isdigit():
        raise RuntimeFailure(f"the rollback guard did not start (see {directory / 'guard.log'})")
    return int(out.strip())


def _guard_log(message: str) -> None:
    print(f"{now()} guard {os.getpid()}: {message}", file=sys.stderr, flush=True)


def _guard(directory: Path, token: str, seconds: float) -> int:
    """Runs in the detached guard: wait, then roll back unless confirmed (token gone)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)
    with locked(directory):
        pending = read(directory / "pending.json")
        if not pending or pending.get("token") != token:
            _guard_log("nothing to do (confirmed, rolled back or superseded)")
            return 0
        previous = read(directory / "previous.json")
        outcome = roll_back(directory, previous, pending, by="guard: not confirmed in time")
    _guard_log(outcome["message"])
    return 0


def roll_back(directory: Path, previous: dict[str, Any] | None, pending: dict[str, Any] | None,
              by: str) -> dict[str, Any]:
    """Restore `previous` (under the lock). If that fails, delete our table instead: the point
    of the guard is that nobody stays locked out, and without corral-host nothing of ours
    filters. Removes pending.json and previous.json; records rolled_back.json."""
    record: dict[str, Any] = {"at": now(), "by": by,
                              "host_file": (pending or {}).get("host_file"),
                              "restored": "absent" if not previous or not previous["present"]
                              else "table"}
    try:
        if previous is None:
            raise RuntimeFailure("previous.json is missing")
        record["identical"] = restore(previous)
        what = "table absent again" if record["restored"] == "absent" else "previous table restored"
        record["message"] = what + ("" if record["identical"]
                                    else " (its listing differs from the saved one)")
    except (nft.NftError, RuntimeFailure, KeyError, TypeError) as exc:
        nft.apply({"nftables": [{"add": _TABLE}, {"delete": _TABLE}]})
        record.update(restored="deleted", identical=False,
                      message=f"could not restore the previous table ({exc}); "
                              f"table inet {TABLE} deleted")
    (directory / "pending.json").unlink(missing_ok=True)
    (directory / "previous.json").unlink(missing_ok=True)
    write(directory / "rolled_back.json", record)
    return record


def _daemonize_and_guard(directory: Path, token: str, seconds: float) -> int:
    """Second fork: the intermediate prints the guard's pid and exits, so the guard is nobody's
    child (re-parented to init or the nearest subreaper) and survives whoever started it."""
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    os.setsid()  # its own session: no controlling terminal, no SIGHUP when the admin's SSH dies
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)   # stderr is guard.log; this also closes our copy of the pid pipe
    os.close(devnull)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _guard(directory, token, seconds)
    except Exception as exc:  # noqa: BLE001 - the log is the only place anybody will see it
        _guard_log(f"failed: {type(exc).__name__}: {exc}")
        return 1


# ---------------------------------------------------------------- guard entry point

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corral.host.firewall_guard",
                                     description="corral's host-table rollback guard (internal)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    guard = sub.add_parser("guard")
    guard.add_argument("--state", required=True, type=Path)
    guard.add_argument("--token", required=True)
    guard.add_argument("--after", required=True, type=float)
    args = parser.parse_args(argv)
    return _daemonize_and_guard(args.state, args.token, args.after)


if __name__ == "__main__":
    sys.exit(main())

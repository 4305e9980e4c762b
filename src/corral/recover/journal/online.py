"""Excise from a running service's volume, in one command.

The writers are quiesced by freezing the service's cgroups, not by stopping it: a frozen
process runs no instruction, so it neither writes during the excision nor sees a file half
rewritten. Under the journal's lock (no scheduled close can thaw anything meanwhile):

1. close the open epoch with the usual two-phase freeze (the bulk read while it runs);
2. freeze every process cgroup and record which in the run directory (MARK);
3. excise: its own close, now frozen, takes what was written since 1, so nothing written up to
   the freeze is lost; the plan; the volume rewritten;
4. if the excision changed anything, the processes are killed while still frozen and the
   supervisor starts them again: RESTART, not resume. A process may hold the excised data in
   memory (a cache, a parsed config, an SQLite page cache) and would write it back, and a
   descriptor it holds open names the old file, which a restore replaces by rename: its later
   writes would go to a file no longer in the volume. Killed before it is thawed, it never
   runs against the rewritten volume with its old memory. An excision that changed nothing
   resumes the processes (thaws them) where they stood;
5. thaw and forget MARK.

A kill of the command anywhere leaves MARK behind with the service frozen. `settle` (run by
`corral state check|mark|excise` and by the supervisor's next close) finishes the excision
from its record (log.recover_locked), then restarts the marked processes and thaws them: the
same end as an uninterrupted run. MARK lives in /run: freezing does not survive a reboot
either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from corral.recover.journal.config import EXCISE_MARK as MARK
from corral.recover.journal.config import freezer
from corral.recover.journal.store import encode, point, unlink_durable, write_durable


def through_service(journal: Any, spec: Any, volume_path: str, supervisor: int) -> bool:
    """Make `journal` write through the running service's mount of its volume: join the
    supervisor's mount namespace (the overlays live there, and the processes' namespaces are
    copies of it sharing the same overlay) and point write_root at the mount. Irreversible
    for this process: for a one-shot command. False if the volume is not mounted there."""
    from corral.kernel import syscalls

    fd = os.open(f"/proc/{supervisor}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNS)
    finally:
        os.close(fd)
    mount = Path(spec.root) / volume_path.lstrip("/")
    if not os.path.ismount(mount):
        return False
    journal.write_root = mount
    return True


def _groups(spec: Any, names: list[str] | None = None) -> list[Any]:
    from corral.launch import cgroup

    out = []
    for proc in spec.processes:
        if names is None or proc.name in names:
            group = cgroup.Cgroup(spec.service, proc.name)
            if any(os.path.isdir(d) for d in group.paths.values()):
                out.append(group)
    return out


def _mark(spec: Any) -> Path:
    return Path(spec.run) / MARK


def excise_running(journal: Any, spec: Any, from_: int, to: int | None, prefer: str | None,
                   note: str | None = None) -> dict[str, Any]:
    """Steps 1-5 above. The result is excise()'s, plus "processes": "restarted" or
    "resumed", and "frozen_ms": how long the service stood still."""
    import time

    with journal.locked():
        journal.recover_locked()
        settle_locked(journal, spec)  # an earlier online excision killed half way
        journal.close_locked("mark", "closed before an excision", freeze=freezer(spec))
        # Groups frozen already (the isolate reaction) stay frozen and are not ours to thaw.
        groups = [g for g in _groups(spec) if not g.stats()["frozen"]]
        mark = _mark(spec)
        mark.parent.mkdir(parents=True, exist_ok=True)
        write_durable(mark, encode({"processes": [g.process for g in groups],
                                    "volume": journal.store, "pid": os.getpid()}))
        started = time.monotonic()
        for group in groups:
            group.freeze()
        point()
        result = journal.excise_locked(from_, to, prefer, note=note)
        restart = bool(result["changes"])
        for group in groups:
            if restart:
                group.kill()  # thaws too; SIGKILL is taken before any user code runs
            else:
                group.thaw()
        point()
        unlink_durable([mark])
        result["processes"] = "restarted" if restart and groups else "resumed"
        result["frozen_ms"] = round((time.monotonic() - started) * 1000, 1)
        return result


def settle_locked(journal: Any, spec: Any) -> str | None:
    """Finish what a killed online excision left (see the module's docstring): restart and
    thaw the processes it froze. The caller holds the journal's lock and has run
    recover_locked (which finishes the excision itself). Returns what was done, if anything."""
    mark = _mark(spec)
    try:
        data = json.loads(mark.read_bytes())
        names = list(data["processes"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # torn before it was durable: we froze nothing
        unlink_durable([mark])
        return None
    if data.get("volume") not in (None, journal.store):
        return None  # another volume's excision: its own journal settles it
    for group in _groups(spec, names):
        group.kill()  # may have seen the volume rewritten with its old memory: restart
    unlink_durable([mark])
    return f"restarted {', '.join(names) or 'no process'} after an interrupted excision"


def settle(journal: Any, spec: Any) -> str | None:
    """settle_locked for a caller that does not hold the lock."""
    from corral.recover.journal.log import JournalBusy

    if not _mark(spec).exists():
        return None  # the common case costs a stat
    try:
        with journal.locked(wait=False):  # held: the excision is still under way
            journal.recover_locked()
            return settle_locked(journal, spec)
    except JournalBusy:
        return None

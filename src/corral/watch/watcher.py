"""The watcher: sensors -> tripwires -> reactions -> incident records. It lives inside the
supervisor (one per service), which the contained processes can neither see nor signal: they
are in their own PID namespaces, and Landlock scopes their signals.

When the containment is tested, corral does not hesitate: the configured reaction runs at once
(`log`, `isolate`: cut the network and freeze, `kill`, `revert`: kill, archive, restart from
base). A flood of violations makes one incident with a count, not one per packet; a service
that keeps getting reverted backs off and finally stays down, saying why.
"""

from __future__ import annotations

import json
import time

from corral.core import log
from corral.core import record as rec
from corral.watch import incidents
from corral.watch.reactions import REACTIONS, Reaction
from corral.watch.sensors import Event

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:  # types only: subprocess is imported at the first incident, not at launch
    import subprocess
    from typing import Any

    from corral.watch.reactions import Containment

COALESCE = 2.0  # seconds: repeats of one tripwire by one process join the open incident
REVERT_LIMIT = 5  # reverts within REVERT_WINDOW before the service stays down
REVERT_WINDOW = 300.0
# Tripwire names of the sensors that the manifest's `tripwires` switch; "syscall" (other
# dangerous calls refused by seccomp) follows the "ptrace" switch.
SWITCH = {"syscall": "ptrace"}


@rec.record
class Watcher:
    sup: Containment
    react: str = "revert"
    tripwires: tuple[str, ...] = ()
    on_incident: list[str] | None = None
    recent: dict[tuple[str, str], dict[str, Any]] = rec.field(default_factory=dict)
    reverts: list[float] = rec.field(default_factory=list)
    incarnation: float = 0.0  # when the last kill or revert took effect
    helpers: list[subprocess.Popen] = rec.field(default_factory=list)
    # Reactions that wait for the processes to die, with their records: settle() finishes them.
    pending: list[tuple[Reaction, dict[str, Any]]] = rec.field(default_factory=list)

    @classmethod
    def for_supervisor(cls, sup: Containment) -> Watcher:
        watch = sup.spec.watch or {}
        tripwires = tuple(watch.get("tripwires") or ("egress", "listen", "exec", "base-write",
                                                    "setuid", "ptrace", "spoof", "flood"))
        return cls(sup, watch.get("react", "revert"), tripwires, watch.get("on_incident"))

    def enabled(self, tripwire: str) -> bool:
        return SWITCH.get(tripwire, tripwire) in self.tripwires

    def process_of(self, uid: int | None) -> str | None:
        for proc in self.sup.spec.processes:
            if proc.uid == uid:
                return proc.name
        return None

    def writer_of(self, path: str) -> str:
        """Which process could have written `path` in the delta: a copied-up file keeps the
        base's owner (root), so the owner does not tell. Landlock lets only the processes
        whose `writable` paths cover it write there."""
        procs = self.sup.spec.processes
        names = [p.name for p in procs
                 if any(path == w or path.startswith(w.rstrip("/") + "/")
                        for w in p.landlock.get("read_write", ()))]
        return names[0] if names else procs[0].name

    # -- the tripwire ---------------------------------------------------------------------
    def trip(self, event: Event, process: str | None = None) -> dict[str, Any] | None:
        if process is None and event.tripwire == "flood":
            # A volume's owner, who alone writes it; a delta or the state file system: no one
            # process is known to have filled it, the first one stands for the service.
            process = event.detail.get("owner") or self.sup.spec.processes[0].name
        elif process is None:
            process = self.writer_of(event.detail.get("path", "")) \
                if event.tripwire == "base-write" else self.process_of(event.uid)
        if process is None or not self.enabled(event.tripwire):
            return None
        detected = time.time()
        key = _key(event.tripwire, process, event.detail)
        open_one = self.recent.get(key)
        act = event.at if 0 < event.at <= detected else detected
        clock = event.clock if 0 < event.at <= detected else "detected"
        # Acts of processes killed since (records still in flight), or repeats within the
        # coalescing window while the same processes live (log, isolate): one incident, counted.
        stale = act < self.incarnation
        repeat = open_one is not None and detected - open_one["_last"] < COALESCE and \
            open_one["reaction"] in ("log", "isolate")
        if open_one and (stale or repeat):
            open_one["count"] += 1
            open_one["_last"] = detected
            open_one["_dirty"] = True
            return None
        if stale or self.sup.halting:  # a reaction is under way: this act dies with it
            return None
        record: dict[str, Any] = {
            "id": incidents.new_id(), "service": self.sup.spec.service, "process": process,
            "tripwire": event.tripwire, "detail": event.detail, "pid": event.pid,
            "detected_at": incidents.iso(detected), "reaction": self.react, "count": 1,
            "delta_archive": None,
        }
        reaction = REACTIONS[self.react]
        if event.tripwire == "flood" and event.detail.get("filesystem") == "state":
            # The state file system is shared with the host and every service: its reserve
            # being reached says nothing this service did. Recorded; corral's writes refuse.
            reaction = REACTIONS["log"]
            record["reaction"] = "log"
        if reaction.name == "revert" and self._too_many_reverts(detected):
            reaction = REACTIONS["kill"]
            record["reaction"] = reaction.name
            record["note"] = (f"more than {REVERT_LIMIT} reverts in {REVERT_WINDOW:.0f}s: "
                              "the service stays down")
        reaction.contain(self.sup, record)
        contained = time.time()
        if reaction.waits:
            self.incarnation = contained
        # The journal's epoch ends here, so the bad stretch is bounded by epochs.
        if reaction.name != "revert":  # a revert closes its own epoch, with the incident id
            self.sup.close_epochs("incident", (record["id"],))
        record["contained_at"] = incidents.iso(contained)
        record["latency_ms"] = round((contained - act) * 1000, 3)
        record["act_at"] = incidents.iso(act)
        record["act_clock"] = clock  # what act_at (and so latency_ms) is measured from
        self.recent[key] = dict(record, _last=detected, _dirty=False)
        # The incident is on disk before anything waits: whatever happens to the revert, the
        # act is recorded. What the reaction finds later (the archive) follows as an update.
        self._write(record)
        if reaction.waits:
            self.pending.append((reaction, record))
        else:
            self._announce(record)
        return record

    def settle(self) -> None:
        """Finish the reactions that waited for the processes to die; the supervisor's loop
        calls this once they are all reaped."""
        # Only those pending now: a restart may trip again, and that one waits for its own reap.
        pending, self.pending = self.pending, []
        for reaction, record in pending:
            fields = reaction.settle(self.sup, record)
            if fields:
                record.update(fields)
                self.recent.get(_key(record["tripwire"], record["process"], record["detail"]),
                                {}).update(fields)
                self._write({"type": "update", "id": record["id"], "fields": fields})
            self._announce(record)

    def _write(self, record: dict[str, Any]) -> None:
        """Append to the incident file; a full state file system (a service's unsized volume
        filled it) loses the record, never the reaction: the system log still gets it."""
        try:
            incidents.append(self.sup.spec.state, record)
        except OSError as exc:
            log.error(f"incident {record.get('id')}: not recorded in "
                      f"{incidents.FILE}: {exc}; it follows in the system log")

    def _too_many_reverts(self, now: float) -> bool:
        self.reverts = [t for t in self.reverts if now - t < REVERT_WINDOW] + [now]
        return len(self.reverts) > REVERT_LIMIT

    def flush_counts(self) -> None:
        """Record the counts of coalesced floods (at most one update per incident and poll)."""
        for record in self.recent.values():
            if record.get("_dirty"):
                self._write({"type": "update", "id": record["id"],
                             "fields": {"count": record["count"]}})
                record["_dirty"] = False

    def _announce(self, record: dict[str, Any]) -> None:
        public = {k: v for k, v in record.items() if not k.startswith("_")}
        try:
            incidents.to_syslog(public)
        except OSError as exc:
            log.warning(f"incident {record['id']}: system log: {exc}")
        if self.on_incident:
            import subprocess

            try:
                helper = subprocess.Popen(self.on_incident, stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
                assert helper.stdin is not None  # stdin=PIPE
                helper.stdin.write(json.dumps(public).encode())
                helper.stdin.close()
                self.helpers.append(helper)
            except OSError as exc:
                log.warning(f"on_incident {self.on_incident[0]!r} failed: {exc}")
        self.helpers = [h for h in self.helpers if h.poll() is None]


def _key(tripwire: str, process: str, detail: dict[str, Any]) -> tuple[str, str]:
    """What repeats join: one tripwire of one process; floods of two file systems are two
    incidents (a volume's and the delta's, one after the other, are not one flood)."""
    if tripwire == "flood":
        return f"flood {detail.get('volume') or detail.get('filesystem')}", process
    return tripwire, process

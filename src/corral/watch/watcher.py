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
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.watch import incidents
from corral.watch.sensors import Event

from corral.host.runtime import ServiceSpec


class Containment(Protocol):
    """What the watcher's reactions act on: the supervisor, seen through only what they need
    (so the watcher does not depend on it, and a test can hold a smaller one)."""

    spec: ServiceSpec
    halting: bool  # a reaction is under way

    def close_epochs(self, reason: str, incidents: tuple[str, ...] = ()) -> None: ...

    def isolate(self) -> None: ...

    def kill_all(self) -> None: ...

    def stay_down(self, reason: str) -> None: ...

    def finish_revert(self, record: dict[str, Any]) -> str | None: ...

COALESCE = 2.0  # seconds: repeats of one tripwire by one process join the open incident
REVERT_LIMIT = 5  # reverts within REVERT_WINDOW before the service stays down
REVERT_WINDOW = 300.0
# Tripwire names of the sensors that the manifest's `tripwires` switch; "syscall" (other
# dangerous calls refused by seccomp) follows the "ptrace" switch.
SWITCH = {"syscall": "ptrace"}


@dataclass
class Watcher:
    sup: Containment
    react: str = "revert"
    tripwires: tuple[str, ...] = ()
    on_incident: list[str] | None = None
    recent: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    reverts: list[float] = field(default_factory=list)
    incarnation: float = 0.0  # when the last kill or revert took effect
    helpers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def for_supervisor(cls, sup: Containment) -> Watcher:
        watch = sup.spec.watch or {}
        tripwires = tuple(watch.get("tripwires") or ("egress", "listen", "exec", "base-write",
                                                    "setuid", "ptrace", "spoof"))
        return cls(sup, watch.get("react", "revert"), tripwires, watch.get("on_incident"))

    def enabled(self, tripwire: str) -> bool:
        return SWITCH.get(tripwire, tripwire) in self.tripwires

    def process_of(self, uid: int | None) -> str | None:
        for proc in self.sup.spec.processes:
            if proc.uid == uid:
                return proc.name
        return None

    # -- the tripwire ---------------------------------------------------------------------
    def trip(self, event: Event, process: str | None = None) -> dict[str, Any] | None:
        process = process or self.process_of(event.uid)
        if process is None or not self.enabled(event.tripwire):
            return None
        detected = time.time()
        key = (event.tripwire, process)
        open_one = self.recent.get(key)
        act = event.at if 0 < event.at <= detected else detected
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
        reaction = self.react
        if reaction == "revert" and self._too_many_reverts(detected):
            reaction = record["reaction"] = "kill"
            record["note"] = (f"more than {REVERT_LIMIT} reverts in {REVERT_WINDOW:.0f}s: "
                              "the service stays down")
        contained = self.contain(reaction, record)
        if reaction in ("kill", "revert"):
            self.incarnation = contained
        # The journal's epoch ends here, so the bad stretch is bounded by epochs.
        if reaction != "revert":  # a revert closes its own epoch, with the incident id
            self.sup.close_epochs("incident", (record["id"],))
        record["contained_at"] = incidents.iso(contained)
        record["latency_ms"] = round((contained - act) * 1000, 3)
        record["act_at"] = incidents.iso(act)
        self.recent[key] = dict(record, _last=detected, _dirty=False)
        if reaction == "revert":  # archive (with the incident id) and back from base
            record["delta_archive"] = self.sup.finish_revert(record)
            self.recent[key]["delta_archive"] = record["delta_archive"]
        incidents.append(self.sup.spec.state, record)
        self._announce(record)
        return record

    def contain(self, reaction: str, record: dict[str, Any]) -> float:
        """Make the reaction take effect; returns the moment it had."""
        if reaction == "isolate":
            self.sup.isolate()
        elif reaction in ("kill", "revert"):
            self.sup.kill_all()
            if reaction == "kill":
                self.sup.stay_down(record.get("note") or f"killed: incident {record['id']}")
        return time.time()

    def _too_many_reverts(self, now: float) -> bool:
        self.reverts = [t for t in self.reverts if now - t < REVERT_WINDOW] + [now]
        return len(self.reverts) > REVERT_LIMIT

    def flush_counts(self) -> None:
        """Record the counts of coalesced floods (at most one update per incident and poll)."""
        for record in self.recent.values():
            if record.get("_dirty"):
                incidents.append(self.sup.spec.state, {"type": "update", "id": record["id"],
                                                       "fields": {"count": record["count"]}})
                record["_dirty"] = False

    def _announce(self, record: dict[str, Any]) -> None:
        public = {k: v for k, v in record.items() if not k.startswith("_")}
        try:
            incidents.to_syslog(public)
        except OSError:
            pass
        if self.on_incident:
            try:
                helper = subprocess.Popen(self.on_incident, stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
                assert helper.stdin is not None  # stdin=PIPE
                helper.stdin.write(json.dumps(public).encode())
                helper.stdin.close()
                self.helpers.append(helper)
            except OSError as exc:
                print(f"corral supervisor: on_incident failed: {exc}")
        self.helpers = [h for h in self.helpers if h.poll() is None]

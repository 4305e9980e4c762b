"""Refusals as tripwire events: Landlock's, from its audit records (kernel 6.15+), and the UDP
bind program's, from its ring buffer (BindRefusals, at the end).

Landlock refuses a TCP connect() or bind() before any packet exists, so the service's nft
table never sees it; its audit records are the only trace. Parsed by hand: they are text
lines (`key=value ...`), and no maintained Python parser knows the Landlock types.

One audit event (one serial in `audit(SEC.MS:SERIAL)`) holds, in this order:

    1423 LANDLOCK_ACCESS  domain=1a2b blockers=net.connect_tcp daddr=127.0.0.1 dest=7999
    1424 LANDLOCK_DOMAIN  domain=1a2b status=allocated mode=enforcing pid=.. uid=.. exe=..
                          (only at the domain's first denial)
    1300 SYSCALL          ... pid=.. uid=..   (only if the task has an audit context)
    1320 EOE              (likewise)

The ACCESS record names no process. A SYSCALL record gives pid and uid; without one (a task
forked before audit was enabled, or a host rule `-a task,never`) the domain's uid is that of
its creator, which for corral is the process's own user (Landlock is applied after the uid
change). An event is emitted at its SYSCALL or EOE record, at the first record of a later
event, or at the end of a read when its domain's uid is known.

Decided: refused file access (`fs.*`) is not a tripwire. Programs probe files all the time
(locale, configuration, plugin paths); an incident per probe would revert benign services.
Only network refusals and abstract UNIX socket scoping (an attempt to reach a host service)
count.
"""

from __future__ import annotations

import socket
import time

from corral.core import text
from corral.core.record import replace
from corral.kernel import audit
from corral.watch.event import Event

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

AUDIT_SYSCALL, AUDIT_EOE = 1300, 1320
AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN = 1423, 1424
KINDS = (AUDIT_SYSCALL, AUDIT_EOE, AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN)
# blocker -> (tripwire, detail keys from the record's fields)
TRIPWIRES = {
    "net.connect_tcp": ("egress", {"daddr": "dst", "dest": "dport"}),
    "net.bind_tcp": ("listen", {"saddr": "src", "src": "sport"}),
    "scope.abstract_unix_socket": ("egress", {"path": "dst"}),
}
MAX_DOMAINS = 4096  # creators remembered; a domain's "deallocated" record frees its entry
MAX_PENDING = 256


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


class LandlockRecords:
    """`uids`: the service's users; another user's events are dropped (None: none is)."""

    def __init__(self, uids: frozenset[int] | None = None) -> None:
        self.uids = uids
        self.domains: dict[str, int] = {}  # domain id -> its creator's uid
        self.pending: dict[int, Event] = {}  # serial -> event waiting for its process

    def foreign_domain(self, raw: bytes) -> bool:
        """An ACCESS record's raw bytes name a domain another user made (known from its
        DOMAIN record): the act is not ours, and needs no parsing."""
        at = raw.find(b" domain=")
        if at < 0 or self.uids is None:
            return False
        end = raw.find(b" ", at + 8)
        uid = self.domains.get(raw[at + 8:end if end > 0 else len(raw)].decode("ascii",
                                                                              "replace"))
        return uid is not None and uid not in self.uids

    def feed(self, kind: int, body: str, out: list[Event]) -> None:
        stamp = audit.record_stamp(body)
        if stamp is None:
            return
        at, serial, end = stamp
        for older in [s for s in self.pending if s < serial]:  # a later event began
            self._emit(older, out)
        fields = audit.record_fields(body[end:])
        if kind == AUDIT_LANDLOCK_ACCESS:
            event = self._access(fields, at)
            if event is not None and len(self.pending) < MAX_PENDING:
                self.pending[serial] = event
        elif kind == AUDIT_LANDLOCK_DOMAIN:
            domain = fields.get("domain", "")
            if fields.get("status") == "allocated" and (uid := _number(fields.get("uid"))) \
                    is not None:
                if len(self.domains) >= MAX_DOMAINS:
                    self.domains.pop(next(iter(self.domains)))
                self.domains[domain] = uid
            elif fields.get("status") == "deallocated":
                self.domains.pop(domain, None)
        elif kind == AUDIT_SYSCALL and serial in self.pending:
            event = self.pending[serial]
            self.pending[serial] = replace(event, uid=_number(fields.get("uid")),
                                           pid=_number(fields.get("pid")))
            self._emit(serial, out)
        elif kind == AUDIT_EOE and serial in self.pending:
            self._emit(serial, out)

    def flush(self, out: list[Event]) -> None:
        """At the end of a read: emit what can be attributed; the rest waits for its
        domain's record."""
        for serial in list(self.pending):
            if self.pending[serial].detail.get("_domain") in self.domains:
                self._emit(serial, out)

    def _access(self, fields: dict[str, str], at: float) -> Event | None:
        for blocker in fields.get("blockers", "").split(","):
            if blocker in TRIPWIRES:
                tripwire, keys = TRIPWIRES[blocker]
                detail: dict[str, Any] = {"proto": "unix" if blocker.startswith("scope.")
                                          else "tcp", "refused_by": "landlock",
                                          "_domain": fields.get("domain")}
                for key, name in keys.items():
                    value = fields.get(key)
                    detail[name] = _number(value) if name.endswith("port") else value
                return Event(tripwire, None, None, at, detail, "audit")
        return None  # fs.*, scope.signal, ptrace: not tripwires (see above)

    def _emit(self, serial: int, out: list[Event]) -> None:
        event = self.pending.pop(serial)
        domain = event.detail.pop("_domain", None)
        if event.uid is None:
            event.uid = self.domains.get(domain or "")
        if event.uid is not None and (self.uids is None or event.uid in self.uids):
            out.append(event)  # unattributable: no process of any service to blame


UDP_PROTOCOLS = {17: "udp", 136: "udplite"}


class BindRefusals:
    """The `listen` tripwire for UDP: every bind the cgroup's program (kernel.bindguard)
    refused is a report in the service's ring buffer (kernel.bpfring), readable at once. The
    kernel stamps it with CLOCK_MONOTONIC; as wall time that is the act's own time."""

    name = "udp-bind"
    interval = 0.0
    state = "on (the cgroup bind program's reports)"

    def __init__(self, ring: Any):
        self.ring = ring

    def fileno(self) -> int:
        return int(self.ring.fileno())

    def close(self) -> None:
        pass  # the supervisor's ring: the programs may still write to it

    def drain(self, now: float) -> list[Event]:
        from corral.kernel.bindguard import REPORT

        offset = time.time() - time.monotonic()  # CLOCK_MONOTONIC -> wall clock
        out = []
        for record in self.ring.read():
            if len(record) < REPORT.size:
                continue
            pid_tgid, uid_gid, ns, port, proto, family, addr, comm = \
                REPORT.unpack_from(record)
            if family == socket.AF_INET6:
                src = socket.inet_ntop(family, addr)
            else:
                src = socket.inet_ntop(socket.AF_INET, addr[:4])
            detail = {"proto": UDP_PROTOCOLS.get(proto, str(proto)), "src": src, "sport": port,
                      "refused_by": "bpf", "comm": text.show(comm.split(b"\0", 1)[0])}
            out.append(Event("listen", uid_gid & 0xFFFFFFFF, pid_tgid >> 32,
                             offset + ns / 1e9, detail, "bpf"))
        return out

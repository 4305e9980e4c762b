"""Sensors that feed the watcher. Each is a `Sensor`: a name (its key in `corral status`), a
state ("on ..." or "off: why"), and `drain(now)`, which returns the tripwire events found since
the last call. One the kernel wakes has a `fileno()` for the supervisor's selector; one without
(`fileno()` is None) is drained every `interval` seconds by the supervisor's loop. The exec
tripwire is not one: its seccomp notifications must be answered, not only read (supervisor).

- AuditReader: the kernel's audit records, read through the netlink multicast group (no
  auditd needed). corral's seccomp filters log every denial (SECCOMP records, with the
  kernel's own timestamp), which gives the `ptrace`, `setuid` and dangerous-syscall
  tripwires; Landlock's records of refused TCP connects and binds give `egress` and `listen`
  (watch.refusals). Landlock logs only while audit is enabled: if it is off, the reader turns
  it on (no rule, no daemon), and the last reader to close turns it off again
  (kernel.auditholds).
- PacketSensor: the packets the service's nft table dropped, from its NFLOG group (nflog).
- DeltaPoller: the `base-write` tripwire, by a metadata-only walk of the delta's upper layer
  (cost proportional to the delta, which is small while the service behaves).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable

from corral.core import log, text, tree
from corral.kernel import audit
from corral.recover import delta
from corral.watch.event import Event
from corral.watch.refusals import AUDIT_EOE, AUDIT_LANDLOCK_ACCESS, AUDIT_SYSCALL, LandlockRecords
from corral.watch.refusals import KINDS as LANDLOCK_KINDS

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:  # a protocol is for the type checker only
    from typing import Any, Protocol

    class Sensor(Protocol):
        name: str
        state: str  # "on ..." while it sees; "off: why" once it cannot (shown by `corral status`)
        interval: float  # seconds between drains of a sensor without a descriptor

        def fileno(self) -> int | None: ...

        def drain(self, now: float) -> list[Event]: ...

        def close(self) -> None: ...


__all__ = ["Event", "AuditReader", "PacketSensor", "DeltaPoller"]

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_SECCOMP = 1326
PTRACE_CALLS = {"ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp"}
SETID_CALLS = {"chmod", "fchmod", "fchmodat", "fchmodat2", "creat", "open", "openat", "mkdir",
               "mkdirat", "mknod", "mknodat"}
# Not violations: exec calls are the notify sensor's (every one is logged as USER_NOTIF), and
# clone3 and openat2 get ENOSYS on purpose so that callers fall back to clone and openat (every
# new thread does it); the unlogged filter answers them, this is in case a kernel logs anyway.
IGNORED_CALLS = {"execve", "execveat", "clone3", "openat2"}
# setsockopt is refused only for multicast joins (launch.seccomp), a covert way out: egress.
EGRESS_CALLS = {"setsockopt"}


def _in_initial_netns(make: Callable[[], socket.socket]) -> socket.socket:
    """The kernel multicasts audit records only in the initial network namespace, so the
    socket is made there even when the service (and its supervisor) live in another one."""
    from corral.kernel import syscalls as kernel

    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    initial = -1
    # PID 1 may refuse (a VM agent that is not dumpable); kthreadd (PID 2) always lives in
    # the initial namespaces.
    for pid in (1, 2):
        try:
            initial = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            break
        except OSError:
            continue
    if initial < 0:
        os.close(own)
        return make()
    try:
        if os.stat(f"/proc/self/fd/{own}").st_ino == os.stat(f"/proc/self/fd/{initial}").st_ino:
            return make()
        kernel.setns(initial, kernel.CLONE_NEWNET)
        try:
            return make()
        finally:
            kernel.setns(own, kernel.CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(initial)


def _number_after(raw: bytes, key: bytes) -> int | None:
    """The decimal value of `key` (b" uid=") in a record's raw bytes, without decoding it."""
    at = raw.find(key)
    if at < 0:
        return None
    start = at + len(key)
    end = start
    while end < len(raw) and 48 <= raw[end] <= 57:
        end += 1
    return int(raw[start:end]) if end > start else None


def _serial(raw: bytes) -> int | None:
    """The event serial of `audit(SEC.MS:SERIAL)`, the record's first bytes."""
    colon, close = raw.find(b":", 6, 40), raw.find(b")", 6, 48)
    return int(raw[colon + 1:close]) if 0 < colon < close and raw[colon + 1:close].isdigit() \
        else None


class AuditReader:
    """`uids`: the service's own users. The kernel multicasts every record of the host to every
    listener, so each supervisor would parse every other service's flood; a record that names
    another user (seccomp's), another user's Landlock domain, or an event nobody here waits
    for is skipped at its first bytes, before it is decoded (`counts`: `read`, `foreign`,
    `parsed`, `lost`; `corral status --json` shows them as `audit_records`)."""

    name = "audit"
    interval = 0.0

    def __init__(self, status: Any = None, uids: Iterable[int] | None = None) -> None:
        """`status`: a kernel.auditholds.Early, the audit status asked ahead (else asked
        when registering); `uids`: the service's users (None: every user's records)."""
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_AUDIT)
            sock.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
            return sock

        self.sock = _in_initial_netns(make)
        self.sock.setblocking(False)
        self._names: dict[int, str] = {}
        self.uids = frozenset(uids) if uids is not None else None  # None: every user's
        self.landlock = LandlockRecords(self.uids)
        self.counts = {"read": 0, "foreign": 0, "parsed": 0, "lost": 0}
        self.state = "on"  # or "off: why" once reading failed for good
        self._enable_audit(status)

    def _enable_audit(self, early: Any) -> None:
        from corral.kernel import auditholds

        self.hold: auditholds.Hold | None = None  # turns audit off again at close, if ours
        try:
            self.hold = auditholds.register(early)
            if self.hold.note:
                self.state = f"on ({self.hold.note})"
        except OSError as exc:  # seccomp's records still come; Landlock's may not
            self.state = f"on (audit left as is: holder registry: {exc.strerror or exc})"

    @property
    def lost(self) -> int:  # ENOBUFS overruns: records the kernel dropped
        return self.counts["lost"]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        hold, self.hold = getattr(self, "hold", None), None
        if hold is not None:
            from corral.kernel import auditholds

            try:
                if done := auditholds.unregister(hold):
                    log.info(f"sensor audit: {done}")
            except OSError as exc:
                log.warning(f"sensor audit: could not release audit: {exc.strerror or exc}")

    def drain(self, now: float) -> list[Event]:
        return self.read()

    def _syscall_name(self, nr: int) -> str:
        if nr not in self._names:
            from corral.kernel.libseccomp import load

            pyseccomp = load()
            try:
                name = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, nr)
                self._names[nr] = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # noqa: BLE001 - an unknown number: keep the number
                self._names[nr] = str(nr)
        return self._names[nr]

    def read(self) -> list[Event]:
        out: list[Event] = []
        counts = self.counts
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                self.landlock.flush(out)  # read dry: what can be attributed goes now
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # after a burst: records were lost; read on
                    counts["lost"] += 1
                    continue
                # Anything else (EBADF, ...) would fail again at once: retrying spun the
                # supervisor at 100% CPU. Stop and say so; the supervisor drops the sensor.
                self.state = f"off: {exc.strerror or exc}"
                return out
            while len(data) >= 16:
                length, kind = struct.unpack_from("=IH", data)
                raw = data[16:length]
                data = data[(length + 3) & ~3:]
                counts["read"] += 1
                if kind == AUDIT_SECCOMP or kind in LANDLOCK_KINDS:
                    if self._foreign(kind, raw):
                        counts["foreign"] += 1
                    else:
                        counts["parsed"] += 1
                        body = raw.decode(errors="replace")
                        if kind == AUDIT_SECCOMP:
                            if (event := self.parse(body)) is not None:
                                out.append(event)
                        else:
                            self.landlock.feed(kind, body, out)
                if length < 16:
                    break

    def _foreign(self, kind: int, raw: bytes) -> bool:
        """Whether the record can be skipped undecoded: another user's act, or an event
        nobody here waits for."""
        if kind in (AUDIT_SYSCALL, AUDIT_EOE):  # only to complete a pending Landlock event
            return not self.landlock.pending or _serial(raw) not in self.landlock.pending
        if self.uids is None:
            return False
        if kind == AUDIT_SECCOMP:
            uid = _number_after(raw, b" uid=")
            return uid is not None and uid not in self.uids
        if kind == AUDIT_LANDLOCK_ACCESS:
            return self.landlock.foreign_domain(raw)
        return False  # a domain's record: rare, and it tells whose later records are

    def parse(self, body: str) -> Event | None:
        fields = audit.record_fields(body)
        stamp = audit.record_stamp(body)
        try:
            uid, pid, nr = int(fields["uid"]), int(fields["pid"]), int(fields["syscall"])
        except (KeyError, ValueError):
            return None
        name = self._syscall_name(nr)
        if name in IGNORED_CALLS:
            return None
        tripwire = "ptrace" if name in PTRACE_CALLS else "setuid" if name in SETID_CALLS \
            else "egress" if name in EGRESS_CALLS else "syscall"
        at = stamp[0] if stamp else 0.0
        return Event(tripwire, uid, pid, at, {"syscall": name, "exe": fields.get("exe"),
                                              "comm": fields.get("comm")}, "audit")


PACKET_TRIPWIRES = {"egress": "egress", "listen": "listen", "spoof": "spoof",
                    "untracked": "egress"}


class PacketSensor:
    """The `egress`, `listen` and `spoof` tripwires: every packet the service's nft table drops
    is logged to the service's own NFLOG group (plan.nft_rules), read here."""

    name = "network"
    interval = 0.0

    def __init__(self, group: int, netns_fd: int | None = None):
        """netns_fd: the service's own network namespace (network = "own"), closed here."""
        from corral.watch import nflog

        try:
            self.reader = nflog.EventReader(group, netns_fd)
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        where = " in the service's network namespace" if netns_fd is not None else ""
        self.state = f"on (NFLOG group {group}{where})"

    def fileno(self) -> int:
        return self.reader.fileno()

    def close(self) -> None:
        self.reader.close()

    def drain(self, now: float) -> list[Event]:
        return [packet_event(packet) for packet in self.reader.read(0)]


def packet_event(packet: dict[str, Any]) -> Event:
    """A dropped packet as a tripwire event."""
    try:
        at = text.parse_iso(packet["time"])
    except (KeyError, ValueError, TypeError, AttributeError):
        at = 0.0
    detail = {k: packet.get(k) for k in ("proto", "src", "sport", "dst", "dport")}
    return Event(PACKET_TRIPWIRES.get(packet.get("reason") or "", "egress"), packet.get("uid"),
                 None, at, detail, "received")


class DeltaPoller:
    """Report each base file the service overwrote, deleted or chmodded, once.

    A delta the walk cannot see whole (nested past tree.MAX_DEPTH, or unreadable) is itself a
    `base-write` event, change "unwalkable": the service may be hiding a base write where the
    poller cannot look, and a walk that raised must never stop the supervisor (that once let
    a service crash it and take its delta with it, unarchived). `state` says how the sensor
    is ("on", or what is wrong) for the supervisor's `sensors` (shown by `corral status`)."""

    ON = "on (delta poll)"
    name = "base-write"

    def __init__(self, upper: str, base: str, interval: float = 0.25):
        self.interval = interval  # the walk is metadata only: cheap while the delta is small
        self.upper, self.base = upper, base
        self.reported: set[bytes] = set()
        self.seen: dict[bytes, tuple[int, int, int]] = {}
        self.state = self.ON

    def fileno(self) -> None:
        return None  # polled: overlayfs has no change notification for its upper layer

    def close(self) -> None:
        pass

    def drain(self, now: float) -> list[Event]:
        return self.poll(now)

    def poll(self, now: float) -> list[Event]:
        try:
            with tree.directory(self.upper) as upper, tree.directory(self.base) as base:
                events: list[Event] = []
                try:
                    self._walk(upper, base, now, events)
                except tree.WalkError as exc:
                    self.state = f"error: {exc.why}"  # the path (long) is in the incident
                    if exc.path not in self.reported:
                        self.reported.add(exc.path)
                        events.append(Event("base-write", None, None, now, {
                            "path": text.show(exc.path or b"/"), "change": "unwalkable",
                            "why": exc.why}))
                    return events
        except OSError as exc:  # the delta or the base itself: the tripwire is blind
            self.state = f"off: cannot open {exc.filename}: {exc.strerror}"
            return []
        self.state = self.ON
        return events

    def _walk(self, upper: int, base: int, now: float, events: list[Event]) -> None:
        for entry in tree.walk(upper, base_fd=base):
            if entry.path not in self.reported and (
                    event := base_write(entry.path, entry.st, entry.base_st, now)):
                self.reported.add(entry.path)
                events.append(event)


def base_write(path: bytes, st: os.stat_result, base_st: os.stat_result | None,
               now: float, at: float | None = None,
               clock: str = "received") -> Event | None:
    """The `base-write` event for the delta's entry `path` (`st`) over the base's (`base_st`),
    or None when it is no base file or not a sensitive one (the walk and fanotify agree).
    `at`: the act's time if known (`clock` says which), else the file's mtime (a walk's best
    guess)."""
    if stat.S_ISDIR(st.st_mode) or base_st is None:
        return None
    sensitive = path.startswith(delta.SENSITIVE_PREFIXES) or bool(
        base_st.st_mode & 0o111) or bool(stat.S_IMODE(st.st_mode) & 0o6000)
    if not sensitive:
        return None
    change = "deleted" if tree.is_whiteout(st) else "modified"
    if at is None:
        at, clock = (st.st_mtime, "mtime") if st.st_mtime else (now, "walk")
    return Event("base-write", st.st_uid, None, at,
                 {"path": text.show(path), "change": change}, clock)

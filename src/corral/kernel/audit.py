"""The kernel audit subsystem's status, through its netlink socket (AUDIT_GET / AUDIT_SET).

Plain `socket` and `struct`: the requests are two fixed structs, and the Python bindings of
libaudit (python3-audit) are a Debian package outside the venv, not on PyPI.

Landlock writes its denial records (AUDIT_LANDLOCK_ACCESS) only while audit is enabled
(`audit_enabled`), unlike seccomp, whose logged actions reach the audit multicast group
either way. A host without auditd boots with audit disabled, so the watcher turns it on, and
the last supervisor to stop turns it off again (kernel.auditholds decides when).
"""

from __future__ import annotations

import errno
import re
import socket
import struct

NETLINK_AUDIT = 9
AUDIT_GET, AUDIT_SET = 1000, 1001
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
AUDIT_STATUS_ENABLED = 1
# A record's text: `audit(SECONDS.MILLIS:SERIAL): key=value key="quoted value" ...`. Patterns,
# not compiled objects: re compiles (and caches) them at first use, so a launch that sees no
# record does not pay ~0.3 ms to compile them.
_FIELD = r'(\w+)=("[^"]*"|\S+)'
_STAMP = r"audit\((\d+)\.(\d+):(\d+)\)"


def record_fields(body: str) -> dict[str, str]:
    """A record's key=value fields, quotes removed."""
    return {k: v.strip('"') for k, v in re.findall(_FIELD, body)}


def record_stamp(body: str) -> tuple[float, int, int] | None:
    """(seconds, serial, where the stamp ends) of a record's `audit(...)`, or None."""
    found = re.search(_STAMP, body)
    if found is None:
        return None
    return int(found[1]) + int(found[2]) / 1000, int(found[3]), found.end()


# struct audit_status's first eight u32 fields: mask, enabled, failure, pid, rate_limit,
# backlog_limit, lost, backlog (the kernel accepts a shorter struct and zero-fills the rest).
_STATUS = struct.Struct("=8I")
_NLMSG = struct.Struct("=IHHII")


def _send(kind: int, flags: int, body: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT)
    try:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, 1, 0) + body)
    except OSError:
        sock.close()
        raise
    return sock


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    with sock:
        data = sock.recv(8192)
    if len(data) < _NLMSG.size:
        raise OSError(errno.EPROTO, "audit: short netlink reply")
    _, reply, _, _, _ = _NLMSG.unpack_from(data)
    payload = data[_NLMSG.size:]
    if reply == NLMSG_ERROR:
        code = struct.unpack_from("=i", payload)[0]
        if code < 0:
            raise OSError(-code, f"audit: {errno.errorcode.get(-code, code)}")
    return reply, payload


def _request(kind: int, flags: int, body: bytes = b"") -> tuple[int, bytes]:
    return _reply(_send(kind, flags, body))


class StatusQuery:
    """AUDIT_GET asked now, answered by `enabled()` later. The kernel sends an AUDIT_GET reply
    from a kernel thread it starts for it (2-8 ms measured on a busy machine): asked early, the
    supervisor prepares the service meanwhile instead of waiting (bench/README.md)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = _send(AUDIT_GET, NLM_F_REQUEST)

    def enabled(self) -> int:
        """0 disabled, 1 enabled, 2 enabled and locked (until reboot)."""
        if self.sock is None:
            raise OSError(errno.EBADF, "audit: status already read")
        sock, self.sock = self.sock, None
        return _unpack(*_reply(sock))[1]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _unpack(reply: int, payload: bytes) -> tuple[int, ...]:
    if reply != AUDIT_GET or len(payload) < _STATUS.size:
        raise OSError(errno.EPROTO, "audit: unexpected reply to AUDIT_GET")
    return tuple(int(v) for v in _STATUS.unpack_from(payload))


def _status() -> tuple[int, ...]:
    return _unpack(*_request(AUDIT_GET, NLM_F_REQUEST))


def enabled() -> int:
    """0 disabled, 1 enabled, 2 enabled and locked (until reboot)."""
    return _status()[1]


def daemon() -> int:
    """The pid of the registered audit daemon (auditd), 0 if none."""
    return _status()[3]


def _set_enabled(value: int) -> None:
    body = _STATUS.pack(AUDIT_STATUS_ENABLED, value, 0, 0, 0, 0, 0, 0)
    _request(AUDIT_SET, NLM_F_REQUEST | NLM_F_ACK, body)


def enable() -> None:
    """Set `enabled` to 1 (needs CAP_AUDIT_CONTROL in the initial user namespace). No rule is
    added and no daemon is registered: records go to the multicast group and, with no auditd,
    to the kernel log (rate-limited)."""
    _set_enabled(1)


def disable() -> None:
    """Set `enabled` back to 0 (EPERM while it is locked: enabled == 2)."""
    _set_enabled(0)

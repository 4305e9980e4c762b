"""Denied packets as structured events: a reader of corral's NFLOG group.

Every drop in a corral table is logged (rate limited, see nftables.LOG_RATE) to NFLOG group
nftables.NFLOG_GROUP with the prefix "corral SERVICE PROCESS REASON" (or "corral host CHAIN" for
the host table) and the first nftables.LOG_SNAPLEN bytes of the packet. This module binds that
group over a raw NETLINK_NETFILTER socket (nfnetlink_log, hand-written with struct: pyroute2 0.9.7
only knows the subsystem number, it has no nfnetlink_log support) and turns each message into

    {"time": "2025-01-01T12:00:00.123456Z", "uid": 998, "user": "corral-web-app",
     "service": "web", "process": "app", "reason": "egress", "prefix": "corral web app egress",
     "family": "ipv4", "proto": "tcp", "src": "10.0.0.1", "sport": 40312,
     "dst": "10.0.0.2", "dport": 9009}

- time: the kernel's NFULA_TIMESTAMP when the message has one, else the time the message was
  received. The kernel only stamps packets seen at prerouting/input/forward; corral logs at the
  output hook, so its events carry the receive time. The reader asks the kernel to send every
  message at once (queue threshold 1), so that is the drop time to within scheduling latency.
- uid: NFULA_UID, the fsuid of the socket's owner at socket() time (the same owner that
  `meta skuid` matched), None when the packet has no full socket (kernel-made packets, SYN-ACKs
  answered from a request socket). user: its name, None when it has none.
- service / process / reason: split from the prefix; all None for prefixes that are not corral's.
  "corral host CHAIN" gives service "host", process None, reason CHAIN.
- proto: tcp, udp, icmp, icmpv6 or other; sport/dport only for tcp and udp (and not for a
  non-first fragment); src/dst/sport/dport None when the copied headers are cut short.

One NFLOG group has at most one listener per network namespace: a second bind fails (the kernel
answers EPERM to a socket that is not the owner). The reader is created in the network namespace
of the calling thread, or in `netns_fd`'s (a socket keeps the namespace it was created in, so
setns in a short-lived helper thread is enough; the rest of the process is not moved).

Only the standard library, imported cheaply; no thread runs after __init__ returns.
"""

from __future__ import annotations

import errno
import math
import os
import pwd
import select
import socket
import struct
import time
from collections.abc import Iterator

from corral.core.errors import RuntimeFailure
from corral.core.nflog import LOG_SNAPLEN, NFLOG_GROUP
from corral.core.text import iso

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# packet attributes (linux/netfilter/nfnetlink_log.h)
NFULA_PACKET_HDR, NFULA_TIMESTAMP, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_UID = 1, 3, 9, 10, 11
# config attributes and commands
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2

CLONE_NEWNET = 0x40000000
RCVBUF = 1 << 20
MAX_PER_READ = 4096   # events returned by one read(), so a flood cannot starve a caller's loop
_HDR = struct.Struct("=IHHII")        # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")        # nfgenmsg: family, version, res_id (big endian, see below)
_NLA = struct.Struct("=HH")
_FAMILIES: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_PROTOS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_IPV6_EXT = {0, 43, 44, 51, 60}       # hop-by-hop, routing, fragment, AH, destination options
_USER_TTL = 60.0                      # seconds a uid -> name answer is reused


class EventsError(RuntimeFailure):
    """The NFLOG group could not be opened or bound; the message says why."""


# ---------------------------------------------------------------- parsing (pure)

def _attrs(data: bytes | memoryview, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4 or start + length > end:
            break
        out[kind & NLA_TYPE_MASK] = bytes(data[start + 4:start + length])
        start += (length + 3) & ~3
    return out


def parse_prefix(prefix: str) -> tuple[str | None, str | None, str | None]:
    """(service, process, reason) from "corral SERVICE PROCESS REASON" / "corral host CHAIN"."""
    words = prefix.split(" ")
    if len(words) == 4 and words[0] == "corral" and all(words[1:]):
        return words[1], words[2], words[3]
    if len(words) == 3 and words[:2] == ["corral", "host"] and words[2]:
        return "host", None, words[2]
    return None, None, None


def parse_headers(payload: bytes, family: int | None = None) -> dict:
    """src, dst, sport, dport, proto and family from the first bytes of an IPv4/IPv6 packet.

    `family` is the message's nfgen_family (AF_INET/AF_INET6); without it the IP version nibble
    decides. Short or odd packets give None fields, never an exception.
    """
    out: dict = {"family": None, "proto": "other", "src": None, "dst": None, "sport": None,
                 "dport": None}
    version = payload[0] >> 4 if payload else None
    if family not in _FAMILIES:
        family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(version)  # type: ignore[arg-type]
    if family is None:
        return out
    out["family"] = _FAMILIES[family]
    l4: int | None = None          # offset of the transport header, None if not there
    if family == socket.AF_INET:
        if len(payload) < 20 or version != 4:
            return out
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        out["src"] = socket.inet_ntop(socket.AF_INET, payload[12:16])
        out["dst"] = socket.inet_ntop(socket.AF_INET, payload[16:20])
        first_fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF == 0
        l4 = ihl if ihl >= 20 and first_fragment else None
    else:
        if len(payload) < 40 or version != 6:
            return out
        out["src"] = socket.inet_ntop(socket.AF_INET6, payload[8:24])
        out["dst"] = socket.inet_ntop(socket.AF_INET6, payload[24:40])
        proto, l4 = payload[6], 40
        while proto in _IPV6_EXT and l4 is not None:
            if l4 + 8 > len(payload):
                l4, proto = None, -1       # extension headers cut short: transport unknown
                break
            nxt = payload[l4]
            if proto == 44:                # fragment: ports only in the first one
                first_fragment = struct.unpack_from("!H", payload, l4 + 2)[0] >> 3 == 0
                l4 = l4 + 8 if first_fragment else None
            elif proto == 51:              # AH counts 4-byte units minus 2
                l4 += (payload[l4 + 1] + 2) * 4
            else:
                l4 += (payload[l4 + 1] + 1) * 8
            proto = nxt
    out["proto"] = _PROTOS.get(proto, "other")
    if proto == 58 and family == socket.AF_INET:
        out["proto"] = "other"
    if proto == 1 and family == socket.AF_INET6:
        out["proto"] = "other"
    if out["proto"] in ("tcp", "udp") and l4 is not None and l4 + 4 <= len(payload):
        out["sport"], out["dport"] = struct.unpack_from("!HH", payload, l4)
    return out


_iso = iso  # the one timestamp format (core.text)


def parse_packet(msg: bytes | memoryview, received: float,
                 user_name=lambda uid: None) -> dict:
    """One NFULNL_MSG_PACKET netlink message (header included) -> event dict."""
    length = _HDR.unpack_from(msg, 0)[0]
    family = _NFGEN.unpack_from(msg, 16)[0]
    attrs = _attrs(msg, 20, min(length, len(msg)))
    seconds = received
    stamp = attrs.get(NFULA_TIMESTAMP)
    if stamp is not None and len(stamp) >= 16:
        sec, usec = struct.unpack_from("!QQ", stamp)
        if sec:
            seconds = sec + usec / 1e6
    uid = struct.unpack("!I", attrs[NFULA_UID][:4])[0] \
        if len(attrs.get(NFULA_UID, b"")) >= 4 else None
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    service, process, reason = parse_prefix(prefix)
    headers = parse_headers(attrs.get(NFULA_PAYLOAD, b""), family)
    return {"time": _iso(seconds), "uid": uid, "user": None if uid is None else user_name(uid),
            "service": service, "process": process, "reason": reason, "prefix": prefix,
            "family": headers["family"], "proto": headers["proto"],
            "src": headers["src"], "sport": headers["sport"],
            "dst": headers["dst"], "dport": headers["dport"]}


def _config(group: int, *attrs: tuple[int, bytes], seq: int = 1) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(group))
    for kind, value in attrs:
        body += _NLA.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)
    return _HDR.pack(_HDR.size + len(body), MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


# ---------------------------------------------------------------- the reader

def _socket_in(netns_fd: int | None) -> socket.socket:
    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_NETFILTER)

    if netns_fd is None:
        return make()
    # setns moves only the calling thread, and a socket stays in the namespace it was made in:
    # make it in a helper thread that moves and then ends, so this thread never changes namespace.
    import threading

    from corral.kernel.syscalls import setns

    result: dict = {}

    def helper() -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
            result["sock"] = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=helper, name="corral-nflog-setns")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]


class EventReader:
    """A bound NFLOG group. Non-blocking: put fileno() in a selector and call read(0) when ready.

    Raises EventsError when the group cannot be bound (no CAP_NET_ADMIN, or another listener
    owns the group in this network namespace).
    """

    def __init__(self, group: int = NFLOG_GROUP, netns_fd: int | None = None):
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group} is not a 16-bit number")
        self.group = group
        self.lost = 0                 # receive buffer overruns (events lost, count unknown)
        self._users: dict[int, tuple[float, str | None]] = {}
        self._buf = bytearray(1 << 16)
        try:
            self._sock: socket.socket | None = _socket_in(netns_fd)
        except OSError as exc:
            raise EventsError(f"cannot open a netfilter netlink socket: "
                              f"{exc.strerror or exc}") from exc
        try:
            self._bind()
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    def _bind(self) -> None:
        sock = self._open()
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)   # SO_RCVBUFFORCE (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        # Bind the group, copy only the headers, send each message at once (no batching: the
        # receive time is then the drop time), in one request acknowledged as a whole.
        request = _config(self.group,
                          (NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND)),
                          (NFULA_CFG_MODE, struct.pack("!IBx", LOG_SNAPLEN, NFULNL_COPY_PACKET)),
                          (NFULA_CFG_QTHRESH, struct.pack("!I", 1)),
                          (NFULA_CFG_TIMEOUT, struct.pack("!I", 1)))
        sock.settimeout(5)
        try:
            sock.send(request)
            err = self._wait_ack(seq=1)
        except OSError as exc:
            raise EventsError(f"NFLOG group {self.group}: {exc.strerror or exc}") from exc
        if err == errno.EPERM:
            raise EventsError(
                f"cannot bind NFLOG group {self.group}: permission denied (needs root / "
                "CAP_NET_ADMIN), or another listener already has the group in this network "
                "namespace (only one may; see /proc/net/netfilter/nfnetlink_log)")
        if err == errno.EBUSY:
            raise EventsError(f"NFLOG group {self.group} is already bound by this socket")
        if err:
            raise EventsError(f"cannot bind NFLOG group {self.group}: {os.strerror(err)}")

    def _wait_ack(self, seq: int) -> int:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = self._open().recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                length, kind, _, mseq, _ = _HDR.unpack_from(data, off)
                if kind == NLMSG_ERROR and mseq == seq:
                    return -struct.unpack_from("=i", data, off + _HDR.size)[0]
                off += max((length + 3) & ~3, _HDR.size)
        raise OSError(errno.ETIMEDOUT, "no answer from nfnetlink_log")

    def _open(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("use of a closed EventReader")
        return self._sock

    def fileno(self) -> int:
        return self._open().fileno()

    def read(self, timeout: float | None = None) -> list[dict]:
        """Events available now, waiting up to `timeout` seconds (None: until there is one) for
        the first. Returns [] on timeout (or when only non-event messages came). Buffer overruns
        are counted in `lost`, not raised."""
        if self._sock is None:
            raise ValueError("read from a closed EventReader")
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))):
            return []
        events: list[dict] = []
        while len(events) < MAX_PER_READ:
            try:
                size = self._sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:   # the kernel dropped messages: keep going
                    self.lost += 1
                    continue
                raise
            received = time.time()
            view = memoryview(self._buf)[:size]
            off = 0
            while off + _HDR.size <= size:
                length, kind = _HDR.unpack_from(view, off)[:2]
                if length < _HDR.size or off + length > size:
                    break
                if kind == MSG_PACKET and length >= _HDR.size + _NFGEN.size:
                    events.append(parse_packet(view[off:off + length], received, self._user))
                elif kind == NLMSG_OVERRUN:
                    self.lost += 1
                off += (length + 3) & ~3
        return events

    def _user(self, uid: int) -> str | None:
        now = time.monotonic()
        hit = self._users.get(uid)
        if hit is None or now - hit[0] > _USER_TTL:
            try:
                name: str | None = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = None
            if len(self._users) > 1024:
                self._users.clear()
            hit = self._users[uid] = (now, name)
        return hit[1]

    def close(self) -> None:
        """Unbind (closing alone would also free the group) and close; idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            unbind = (NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_UNBIND))
            sock.send(_config(self.group, unbind, seq=2))
        except OSError:
            pass
        sock.close()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)  # None: closed, or __init__ failed before it
        if sock is not None:
            sock.close()


def stream(group: int = NFLOG_GROUP, follow: bool = True, *, timeout: float | None = None,
           netns_fd: int | None = None) -> Iterator[dict]:
    """Events of `group` as they come. follow=True: until `timeout` seconds have passed (None:
    forever). follow=False: until no event came for `timeout` seconds (default 1): what is
    happening now, then stop. The group is unbound when the iterator ends or is closed."""
    with EventReader(group, netns_fd) as reader:
        if follow:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                yield from reader.read(left)
        else:
            quiet = 1.0 if timeout is None else timeout
            while batch := reader.read(quiet):
                yield from batch

"""Listening sockets from /proc/PID/net/{tcp,tcp6,udp,udp6}: the one parser for `corral up`'s
wait for its listeners (supervise.control) and `corral audit --host` (audit.net).

Read from /proc rather than through psutil: audit needs the sockets of another network
namespace (/proc/PID/net is PID's namespace), which psutil cannot give.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass

TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"  # the state column: TCP_LISTEN, TCP_CLOSE
FILES = (("tcp", ("tcp", "tcp6"), TCP_LISTEN), ("udp", ("udp", "udp6"), UDP_UNCONNECTED))


@dataclass(frozen=True)
class Listener:
    proto: str  # tcp | udp
    address: str
    port: int
    uid: int
    inode: int


def address_text(hex_addr: str) -> str:
    """/proc/net hex (32-bit words in host byte order) -> text; an IPv4-mapped IPv6 address
    as the IPv4 address."""
    raw = bytes.fromhex(hex_addr)
    swapped = raw if sys.byteorder == "big" else \
        b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(swapped)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def listening(net_pid: int | str = "self") -> list[Listener]:
    """TCP sockets in LISTEN and unconnected bound UDP sockets of PID's network namespace;
    a table that cannot be read (no IPv6, say) is skipped."""
    out: list[Listener] = []
    for proto, files, wanted in FILES:
        for name in files:
            try:
                with open(f"/proc/{net_pid}/net/{name}") as handle:
                    lines = handle.read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 10:
                    continue
                local, remote, state = fields[1], fields[2], fields[3]
                if state != wanted or (proto == "udp" and int(remote.split(":")[1], 16)):
                    continue
                addr, port = local.split(":")
                out.append(Listener(proto, address_text(addr), int(port, 16), int(fields[7]),
                                    int(fields[9])))
    return out

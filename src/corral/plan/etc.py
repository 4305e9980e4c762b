"""The basics of /etc every closure image gets, so that a stock libc behaves without the host's
files: `hosts` (localhost and the service's host name, which is the contained hostname),
`nsswitch.conf` (files only, plus dns when the manifest declares resolvers) and `resolv.conf`
(only then), the host's time zone and, when a process asks for it, the C.UTF-8 locale.

Without nsswitch.conf glibc looks host names up in DNS first: "localhost" became a UDP packet
to a resolver the service may not reach, which the egress tripwire reported as an attack
(PostgreSQL's default listen_addresses, at every start).
"""

from __future__ import annotations

import os

from corral.core.netspec import Endpoint, parse_endpoint

# Debian's name for the C.UTF-8 locale's directory (glibc >= 2.35 ships it there).
C_UTF8 = "/usr/lib/locale/C.utf8"
LOCALE_VARIABLES = ("LANG", "LC_ALL", "LC_CTYPE", "LC_COLLATE", "LC_MESSAGES", "LC_NUMERIC",
                    "LC_TIME", "LC_MONETARY")
LOCALTIME = "/etc/localtime"


def hosts(service: str) -> str:
    return ("127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{service}\n")


def nsswitch(resolvers: list[str]) -> str:
    lookup = "files dns" if resolvers else "files"
    return "".join(f"{db}:{' ' * (11 - len(db))}{how}\n" for db, how in (
        ("passwd", "files"), ("group", "files"), ("shadow", "files"), ("hosts", lookup),
        ("networks", "files"), ("protocols", "files"), ("services", "files")))


def resolv_conf(resolvers: list[str]) -> str:
    return "".join(f"nameserver {address}\n" for address in resolvers)


def generated(service: str, resolvers: list[str]) -> dict[str, str]:
    """Image path -> contents, written by the build (a file the manifest adds wins)."""
    files = {"/etc/hosts": hosts(service), "/etc/nsswitch.conf": nsswitch(resolvers)}
    if resolvers:
        files["/etc/resolv.conf"] = resolv_conf(resolvers)
    return files


def wants_c_utf8(environments: list[dict[str, str]]) -> bool:
    return any(env.get(name, "").lower().replace("-", "") in ("c.utf8",)
               for env in environments for name in LOCALE_VARIABLES)


def zone_file(host_root: str = "/") -> str | None:
    """The host's time zone file (what /etc/localtime points to), or None (no zone: UTC)."""
    path = os.path.realpath(os.path.join(host_root, LOCALTIME.lstrip("/")))
    return path if os.path.isfile(path) else None


def dns_endpoints(resolvers: list[str]) -> tuple[Endpoint, ...]:
    """What every process may reach when the manifest declares resolvers."""
    return tuple(parse_endpoint(f"{proto}/53@{address}")
                 for address in resolvers for proto in ("udp", "tcp"))

"""Network endpoint notation shared by manifests and host files.

    listen:  "tcp/8080"  "udp/53"  "tcp/8000-8010"
    connect: "udp/53@127.0.0.53"  "tcp/5432@10.0.0.5/32"  "tcp/443@2001:db8::/32"  "udp/123"

A connect entry without an address means any address. Parsing raises ValueError with a message
that quotes the input, so the manifest layer can print `key.path: "value": what is wrong`.
"""

from __future__ import annotations

from corral.core.record import record

# ipaddress is imported where an address is parsed: `corral run` reads only port ranges here
# (the UDP bind guard), and ipaddress costs it ~0.9 ms (bench/README.md, "Launch time").

PROTOCOLS = ("tcp", "udp")


@record(frozen=True, order=True)
class PortSpec:
    """A protocol and an inclusive port range (first == last for one port)."""

    proto: str
    first: int
    last: int

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.proto}/{ports}"


@record(frozen=True, order=True)
class Endpoint:
    """A destination: protocol, port range and network (None = any address, both families)."""

    proto: str
    first: int
    last: int
    network: str | None  # canonical "10.0.0.5/32" or "2001:db8::/32"

    @property
    def family(self) -> int | None:
        if self.network is None:
            return None
        import ipaddress

        return ipaddress.ip_network(self.network).version

    @property
    def ports(self) -> PortSpec:
        return PortSpec(self.proto, self.first, self.last)

    def __str__(self) -> str:
        text = str(self.ports)
        return text if self.network is None else f"{text}@{self.network}"


def _port(text: str, raw: str) -> int:
    if not text.isdigit():
        raise ValueError(f'"{raw}": port "{text}" is not a number')
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f'"{raw}": port out of range (1-65535)')
    return value


def parse_ports(text: str, raw: str | None = None) -> PortSpec:
    """Parse "proto/port" or "proto/first-last"; `raw` is the whole entry, for messages."""
    if not isinstance(text, str):
        raise ValueError('expected a string like "tcp/8080"')
    raw = text if raw is None else raw
    proto, sep, ports = text.partition("/")
    if not sep or not ports:
        raise ValueError(f'"{raw}": expected PROTO/PORT, e.g. "tcp/8080"')
    if proto not in PROTOCOLS:
        raise ValueError(f'"{raw}": unknown protocol "{proto}" (tcp or udp)')
    first_text, dash, last_text = ports.partition("-")
    first = _port(first_text, raw)
    last = _port(last_text, raw) if dash else first
    if last < first:
        raise ValueError(f'"{raw}": port range is reversed')
    return PortSpec(proto, first, last)


def parse_network(text: str, raw: str) -> str:
    """A literal address or prefix; host names are refused (rules must not depend on DNS)."""
    import ipaddress

    try:
        net = ipaddress.ip_network(text.strip("[]"), strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ValueError(f'"{raw}": prefix "{text}" has host bits set') from None
        raise ValueError(f'"{raw}": "{text}" is not an IP address or prefix') from None
    return str(net)


def parse_endpoint(raw: str) -> Endpoint:
    """Parse "proto/port[@address[/prefix]]"."""
    if not isinstance(raw, str):
        raise ValueError('expected a string like "tcp/5432@10.0.0.5"')
    ports_text, at, addr_text = raw.partition("@")
    ports = parse_ports(ports_text, raw)
    if at and not addr_text:
        raise ValueError(f'"{raw}": empty address after "@"')
    network = parse_network(addr_text, raw) if at else None
    return Endpoint(ports.proto, ports.first, ports.last, network)

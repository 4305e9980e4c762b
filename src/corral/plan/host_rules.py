"""The host's own table, `inet corral-host`: its libnftables JSON, computed by pure code.

Built only from the host file and the manifests of the services involved (installed on this host;
for a router, also those of each [[lan]]). One table, one transaction, like the service tables:

    prerouting  hook prerouting, priority raw (-300), policy accept: only drops
        lo accept; IPv6 neighbour discovery accept (link-local, DAD uses ::)
        management to this host accept              (never cut by anti-spoofing)
        router:  from a LAN, a source outside its prefixes          -> "bcp38"
                 from elsewhere, a source inside a LAN prefix       -> "lan-prefix"
                 from elsewhere, a bogon source (anti_spoofing)     -> "bogon"
        anti_spoofing: fib saddr . iif oif missing (strict rpf)     -> "rpf"
    input       policy drop: management first, lo, ND/MLD, invalid drop, established/related,
                echo-request (rate-limited), the installed services' listen ports
    output      policy drop: lo, ND, MLD -> mld-out, own-address check (anti_spoofing),
                management replies, invalid drop, established/related, allow_out + the
                installed services' connects
    mld-out     (jumped to) only reports of neighbour discovery's groups accept; else "mld"
    forward     policy drop. Router: management into each LAN, invalid drop, established/related,
                into a LAN its services' listen ports, out of a LAN its services' connects

Why this shape:
- Prerouting at priority raw runs before conntrack: spoofed floods are dropped before they can
  fill the conntrack table. Its policy is accept (it only removes what is forged); the
  filtering itself happens in input/output/forward, whose policies are drop.
- Management is matched first wherever it is matched, and statelessly: in prerouting (so no
  anti-spoofing check can cut it, e.g. under asymmetric routing), first in input, and its
  replies early in output (so a lost or invalid conntrack entry does not cut a session either).
- A drop in any table is final and an accept is not: the service tables (policy accept) and this
  one combine without ordering concerns; what the services declare is also opened here.
- Per-user precision stays in the service tables; here is the host-wide union of the services'
  flows (listens inbound, connects outbound), which also covers root and the kernel.
- IPv6 keeps working: ND (hop limit 255) and MLD (hop limit 1, link-local) are accepted before
  the conntrack checks (conntrack marks them invalid) and before the spoofing checks (DAD and
  early MLD reports come from ::). Outgoing MLD only for neighbour discovery's groups
  (MLD_RECORDS below): other groups' reports would carry data out. Nothing else about ICMP is
  opened except echo-request (rate-limited) inbound; ICMP errors pass as related to a tracked
  flow.
- Every drop rule has a counter and a comment naming why; the packets are also logged,
  rate-limited, headers only, to the watcher's NFLOG group with prefix "corral host CHAIN".
- Interfaces are matched by name (iifname/oifname), so the ruleset loads even when a LAN
  interface is down or not created yet, and keeps matching when it comes back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from corral.core.netspec import Endpoint, PortSpec
from corral.plan.nft_rules import (
    LOG_BURST,
    LOG_RATE,
    LOG_SNAPLEN,
    NFLOG_GROUP,
    Network,
    connect_boxes,
    listen_boxes,
)

# The same expression builders and interval arithmetic as the service tables.
from corral.plan.nft_rules import addr as _addr
from corral.plan.nft_rules import match as _match
from corral.plan.nft_rules import merge as _merge
from corral.plan.nft_rules import port as _port
from corral.plan.nft_rules import subtract as _subtract
from corral.plan.nft_rules import th as _th

TABLE = "corral-host"
FAMILIES = ((4, "ip"), (6, "ip6"))
# Inbound echo-request per second (burst twice that); beyond it pings are dropped and logged.
ECHO_RATE = 10

# Sources that cannot legitimately arrive from upstream (any interface that is not a [[lan]]).
# Networks a declared flow names (management sources, allow_out and connect destinations) are
# taken out again: an upstream database at 10.0.0.5 that a service declares must stay reachable.
BOGONS4 = (
    "0.0.0.0/8",        # "this network" (RFC 791)
    "10.0.0.0/8",       # private (RFC 1918)
    "100.64.0.0/10",    # shared address space, carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local
    "172.16.0.0/12",    # private (RFC 1918)
    "192.0.0.0/24",     # IETF protocol assignments
    "192.168.0.0/16",   # private (RFC 1918)
    "198.18.0.0/15",    # benchmarking (RFC 2544)
    "224.0.0.0/4",      # multicast: never a source
    "240.0.0.0/4",      # reserved, and the limited broadcast 255.255.255.255
)
# Deliberately not listed although the Internet treats them as bogons: the documentation ranges
# 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32. The spec's examples and the
# tests use them as stand-ins for public addresses; a real router never sees them anyway.
#
# IPv6 from upstream must be global unicast (2000::/3) or link-local (fe80::/10: the upstream
# router's RAs and neighbour discovery); this is the complement, as prefixes. It covers ::/8
# (unspecified, loopback, IPv4-mapped), ULA fc00::/7, site-local fec0::/10, multicast ff00::/8.
BOGONS6 = ("::/3", "4000::/2", "8000::/2", "c000::/3", "e000::/4", "f000::/5", "f800::/6",
           "fc00::/7", "fe00::/9", "fec0::/10", "ff00::/8")

_ND = ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert"]
_MLD = ["mld-listener-query", "mld-listener-report", "mld-listener-done", "mld2-listener-report"]
_LINK_LOCAL6 = {"prefix": {"addr": "fe80::", "len": 10}}

# Outgoing MLD reports (chain mld-out). The kernel sends them for every group joined on the host,
# from its own socket: `meta skuid` matches none (tests/escapes/test_host_mld.py), whoever
# joined, so a group chosen to encode data (14 bytes per ff0e:: group) would leave the host.
# Neighbour discovery needs only the solicited-node groups ff02::1:ffXX:XXXX (and a router also
# all-routers ff02::2 and ff05::2); every other report is dropped and counted (`mld`).
# An MLDv2 report lists records of variable length (sources, aux data) that nft cannot walk, so
# a report passes only when it holds 1..MLD_RECORDS records with no sources and no aux data,
# each for an allowed group, and nothing after them (checked through the IPv6 payload length:
# 8 bytes of hop-by-hop router alert, 8 of header, 20 per record). Such a report is what the
# kernel sends for those groups. A report mixing in any other group (a response to a query on
# a host where, say, avahi joined ff02::fb) is dropped whole.
MLD_RECORDS = 8
_HBH = 8  # the router-alert hop-by-hop header every MLD message carries


def _raw(offset: int, bits: int) -> dict:
    """`bits` bits of the ICMPv6 message at bit `offset` (nft's raw payload, base th)."""
    return {"payload": {"base": "th", "offset": offset, "len": bits}}


def _mld_group(offset: int, router: bool) -> list[dict]:
    """The 128-bit group address at bit `offset` is an allowed one, as four 32-bit words
    (nft's JSON numbers are 64-bit): ff02::1:ffXX:XXXX, and on a router ff02::2 and ff05::2 too.
    The router's word sets also admit their cross product (ff05::1:ffXX:XXXX, ff02::ffXX:XXXX,
    ff02::1:0:2...): no more room for data than the solicited-node groups already leave."""
    def one_of(*values: int | dict) -> int | dict:
        return values[0] if len(values) == 1 else {"set": list(values)}

    solicited = {"range": [0xFF000000, 0xFFFFFFFF]}
    words = ([one_of(0xFF020000, 0xFF050000), 0, one_of(0, 1), one_of(2, solicited)] if router
             else [0xFF020000, 0, 1, solicited])
    return [_match(_raw(offset + 32 * i, 32), word) for i, word in enumerate(words)]


@dataclass(frozen=True)
class ServiceFlows:
    """One service's flows, united over its processes."""

    name: str
    manifest: str                  # where they were read from (for people; not in the ruleset)
    listen: tuple[PortSpec, ...]
    connect: tuple[Endpoint, ...]
    veth: str = ""  # network = "own": the host side of its veth (its flows cross it)


@dataclass(frozen=True)
class LanSpec:
    interface: str
    prefixes: tuple[str, ...]
    services: tuple[ServiceFlows, ...]


@dataclass(frozen=True)
class HostSpec:
    role: str                          # "server" | "router"
    management: tuple[Endpoint, ...]   # network = the admins' source
    allow_out: tuple[Endpoint, ...]
    anti_spoofing: bool
    installed: tuple[ServiceFlows, ...]
    lans: tuple[LanSpec, ...] = ()


# ---------------------------------------------------------------- address arithmetic

def _nets(prefixes: Iterable[str | Network], version: int) -> list[Network]:
    nets = [ipaddress.ip_network(p) for p in prefixes]
    # collapse_addresses takes one version: IPv4Network is version 4, IPv6Network version 6
    if version == 4:
        return list(ipaddress.collapse_addresses(
            n for n in nets if isinstance(n, ipaddress.IPv4Network)))
    return list(ipaddress.collapse_addresses(
        n for n in nets if isinstance(n, ipaddress.IPv6Network)))


def _address(value: int, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _summarize(first: int, last: int, version: int) -> list[Network]:
    """The fewest prefixes that cover first..last exactly."""
    if version == 4:
        return list(ipaddress.summarize_address_range(
            ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)))
    return list(ipaddress.summarize_address_range(
        ipaddress.IPv6Address(first), ipaddress.IPv6Address(last)))


def _ranges(nets: Iterable[Network]) -> list[tuple[int, int]]:
    return _merge((int(n.network_address), int(n.broadcast_address)) for n in nets)


def _without(prefixes: Iterable[str], holes: Iterable[Network], version: int) -> list[dict | str]:
    """Set elements for the prefixes minus the holes: a prefix where a piece is one, else a
    range (a host carved out of 10.0.0.0/8 leaves two ranges, not twenty-four prefixes)."""
    left = _subtract(_ranges(_nets(prefixes, version)), _ranges(_nets(holes, version)))
    out: list[dict | str] = []
    for first, last in left:
        nets = _summarize(first, last, version)
        out.append(_addr(nets[0]) if len(nets) == 1 else
                   {"range": [str(_address(first, version)), str(_address(last, version))]})
    return out


def _not_loopback(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Loopback destinations stay on their host: they never cross a router, never arrive from
    outside, and lo is accepted anyway (each service table shields it per user)."""
    return [ep for ep in endpoints
            if ep.network is None or not ipaddress.ip_network(ep.network).is_loopback]


def bogons(spec: HostSpec, version: int) -> list[dict | str]:
    """Bogon set elements: BOGONS minus every network a declared flow names (except loopback,
    which never legitimately arrives from outside)."""
    declared = [ipaddress.ip_network(ep.network)
                for ep in _not_loopback(_declared(spec)) if ep.network]
    return _without(BOGONS4 if version == 4 else BOGONS6, declared, version)


def _declared(spec: HostSpec) -> list[Endpoint]:
    eps = list(spec.management) + list(spec.allow_out)
    eps += [ep for svc in spec.installed for ep in svc.connect]
    eps += [ep for lan in spec.lans for svc in lan.services for ep in svc.connect]
    return eps


# ---------------------------------------------------------------- expressions

def _field(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _flow(family: str, addr: str, port: str, set_name: str) -> dict:
    """ADDR . l4proto . PORT in @set: one lookup however many entries the set holds."""
    return _match({"concat": [_field(family, addr), _meta("l4proto"), _th(port)]}, f"@{set_name}")


def _ct(*states: str) -> dict:
    return _match({"ct": {"key": "state"}}, list(states) if len(states) > 1 else states[0], "in")


_IIF_LO = _match(_meta("iif"), "lo")
_OIF_LO = _match(_meta("oif"), "lo")
_ND_MATCH = [_match(_field("icmpv6", "type"), {"set": _ND}), _match(_field("ip6", "hoplimit"), 255)]
_MLD_MATCH = [_match(_field("icmpv6", "type"), {"set": _MLD}), _match(_field("ip6", "hoplimit"), 1)]
_RPF_MISSING = _match({"fib": {"flags": ["saddr", "iif"], "result": "oif"}}, False)
_SADDR_NOT_LOCAL = _match({"fib": {"flags": ["saddr"], "result": "type"}}, "local", "!=")
_DADDR_LOCAL = _match({"fib": {"flags": ["daddr"], "result": "type"}}, "local")
_ACCEPT = {"accept": None}


# ---------------------------------------------------------------- the document

class _Doc:
    def __init__(self) -> None:
        table = {"table": {"family": "inet", "name": TABLE}}
        # add + delete + add: replaces the table atomically whether or not it exists.
        self.cmds: list[dict] = [{"add": table}, {"delete": table}, {"add": table}]

    def _add(self, kind: str, **obj) -> None:
        self.cmds.append({"add": {kind: {"family": "inet", "table": TABLE, **obj}}})

    def set(self, name: str, type_: str | list[str], elems: list) -> None:
        # The interval flag only when an element is a prefix or a range: a concatenated
        # interval set is the kernel's pipapo backend, ~0.3-0.4 us more per lookup than a hash
        # set even with one element (bench/nft_cost.py). The table is always replaced whole,
        # never refilled, so the type can follow the content.
        interval = any(isinstance(part, dict) for e in elems
                       for part in (e["concat"] if isinstance(e, dict) and "concat" in e else [e]))
        self._add("set", name=name, type=type_, **({"flags": ["interval"]} if interval else {}),
                  **({"elem": elems} if elems else {}))

    def chain(self, name: str, prio: int, policy: str) -> None:
        self._add("chain", name=name, type="filter", hook=name, prio=prio, policy=policy)

    def regular_chain(self, name: str) -> None:  # no hook: entered by jump only
        self._add("chain", name=name)

    def rule(self, chain: str, expr: list[dict], comment: str | None = None) -> None:
        self._add("rule", chain=chain, expr=expr, **({"comment": comment} if comment else {}))

    def deny(self, chain: str, match: list[dict], reason: str) -> None:
        """Log (rate-limited: the limit gates only the log, never the drop) and drop, counted."""
        limit = {"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}}
        self.rule(chain, match + [limit, {"log": {"prefix": f"corral host {chain}",
                                                  "group": NFLOG_GROUP, "snaplen": LOG_SNAPLEN}}])
        self.rule(chain, match + [{"counter": None}, {"drop": None}], reason)

    def flow_set(self, name: str, endpoints: Iterable[Endpoint], version: int) -> None:
        addr_type = "ipv4_addr" if version == 4 else "ipv6_addr"
        elems = [{"concat": [_addr(net), proto, _port(first, last)]}
                 for net, proto, first, last in connect_boxes(endpoints, version)]
        self.set(name, [addr_type, "inet_proto", "inet_service"], elems)

    def net_set(self, name: str, nets: Iterable[str | Network], version: int) -> None:
        self.set(name, "ipv4_addr" if version == 4 else "ipv6_addr",
                 [_addr(n) for n in _nets(nets, version)])


def _union(services: Iterable[ServiceFlows]) -> tuple[list[PortSpec], list[Endpoint]]:
    services = list(services)
    return ([p for s in services for p in s.listen], [e for s in services for e in s.connect])


def host_ruleset(spec: HostSpec) -> dict:
    """libnftables JSON that atomically (re)creates table inet corral-host. Deterministic."""
    if spec.role not in ("server", "router"):
        raise ValueError(f"unknown role {spec.role!r}")
    router = spec.role == "router"
    doc = _Doc()
    listen, connect = _union(spec.installed)
    own = [s for s in spec.installed if s.veth]  # network = "own": behind a veth each
    # The veths are no upstream: their sources are the services' leased addresses (the pool is
    # private, a bogon), checked by the service table inside and by rpf here.
    lan_names = {"set": sorted([lan.interface for lan in spec.lans] + [s.veth for s in own])}

    # ---- sets
    for version, _ in FAMILIES:
        doc.flow_set(f"mgmt{version}", spec.management, version)
    doc.set("listen", ["inet_proto", "inet_service"],
            [{"concat": [proto, _port(first, last)]}
             for proto, first, last in listen_boxes(listen)])
    for version, _ in FAMILIES:
        doc.flow_set(f"egress{version}", _not_loopback(list(spec.allow_out) + connect), version)
    if router:
        for version, _ in FAMILIES:
            doc.net_set(f"lans{version}", [p for lan in spec.lans for p in lan.prefixes], version)
            if spec.anti_spoofing:
                doc.set(f"bogons{version}", "ipv4_addr" if version == 4 else "ipv6_addr",
                        bogons(spec, version))
        for i, lan in enumerate(spec.lans):
            lan_listen, lan_connect = _union(lan.services)
            for version, _ in FAMILIES:
                doc.net_set(f"lan{i}-net{version}", lan.prefixes, version)
                inbound = [Endpoint(p.proto, p.first, p.last, prefix)
                           for prefix in lan.prefixes for p in lan_listen]
                doc.flow_set(f"lan{i}-in{version}", inbound, version)
                doc.flow_set(f"lan{i}-out{version}", _not_loopback(lan_connect), version)

    for i, svc in enumerate(own):
        doc.set(f"own{i}-listen", ["inet_proto", "inet_service"],
                [{"concat": [proto, _port(first, last)]}
                 for proto, first, last in listen_boxes(svc.listen)])
        doc.flow_set(f"own{i}-out4", svc.connect, 4)  # loopback too: carried over the veth

    # ---- chains (hook = name)
    doc.chain("prerouting", -300, "accept")   # priority raw: before conntrack
    for name in ("input", "output", "forward"):
        doc.chain(name, 0, "drop")
    doc.regular_chain("mld-out")  # before the rule that jumps to it

    # ---- prerouting: drop what is forged; accept only ends this chain
    doc.rule("prerouting", [_IIF_LO, _ACCEPT], "loopback")
    doc.rule("prerouting", _ND_MATCH + [_ACCEPT], "neighbour discovery")
    for version, family in FAMILIES:
        management = _flow(family, "saddr", "dport", f"mgmt{version}")
        doc.rule("prerouting", [_DADDR_LOCAL, management, _ACCEPT], "management")
    if router:
        for i, lan in enumerate(spec.lans):
            iif = _match(_meta("iifname"), lan.interface)
            doc.deny("prerouting", [iif, _match(_field("ip", "saddr"), f"@lan{i}-net4", "!=")],
                     "bcp38")
            doc.deny("prerouting", [iif, _match(_field("ip6", "saddr"), f"@lan{i}-net6", "!="),
                                    _match(_field("ip6", "saddr"), _LINK_LOCAL6, "!=")], "bcp38")
        not_lan = _match(_meta("iifname"), lan_names, "!=")
        for version, family in FAMILIES:
            doc.deny("prerouting", [not_lan, _match(_field(family, "saddr"), f"@lans{version}")],
                     "lan-prefix")
        if spec.anti_spoofing:
            for version, family in FAMILIES:
                bogon = _match(_field(family, "saddr"), f"@bogons{version}")
                doc.deny("prerouting", [not_lan, bogon], "bogon")
    if spec.anti_spoofing:
        doc.deny("prerouting", [_RPF_MISSING], "rpf")

    # ---- input
    for version, family in FAMILIES:
        doc.rule("input", [_flow(family, "saddr", "dport", f"mgmt{version}"), _ACCEPT],
                 "management")
    doc.rule("input", [_IIF_LO, _ACCEPT], "loopback")
    doc.rule("input", _ND_MATCH + [_ACCEPT], "neighbour discovery")
    doc.rule("input", _MLD_MATCH + [_match(_field("ip6", "saddr"), _LINK_LOCAL6), _ACCEPT],
             "multicast listeners")
    doc.deny("input", [_ct("invalid")], "invalid")
    doc.rule("input", [_ct("established", "related"), _ACCEPT])
    for protocol in ("icmp", "icmpv6"):
        doc.rule("input", [_match(_field(protocol, "type"), "echo-request"),
                           {"limit": {"rate": ECHO_RATE, "per": "second", "burst": 2 * ECHO_RATE}},
                           _ACCEPT], "ping")
    doc.rule("input", [_match({"concat": [_meta("l4proto"), _th("dport")]}, "@listen"), _ACCEPT],
             "services' listen")
    for i, svc in enumerate(own):  # its connects to this host (a loopback one after the DNAT)
        doc.rule("input", [_match(_meta("iifname"), svc.veth),
                           _flow("ip", "daddr", "dport", f"own{i}-out4"), _ACCEPT],
                 f"{svc.name}'s connect to this host")
    doc.deny("input", [], "undeclared")

    # ---- output
    doc.rule("output", [_OIF_LO, _ACCEPT], "loopback")
    doc.rule("output", _ND_MATCH + [_ACCEPT], "neighbour discovery")
    doc.rule("output", _MLD_MATCH + [{"jump": {"target": "mld-out"}}], "multicast listeners")
    if spec.anti_spoofing:
        doc.deny("output", [_SADDR_NOT_LOCAL], "spoof")
    for version, family in FAMILIES:
        doc.rule("output", [_flow(family, "daddr", "sport", f"mgmt{version}"), _ACCEPT],
                 "management replies")
    doc.deny("output", [_ct("invalid")], "invalid")
    doc.rule("output", [_ct("established", "related"), _ACCEPT])
    for version, family in FAMILIES:
        doc.rule("output", [_flow(family, "daddr", "dport", f"egress{version}"), _ACCEPT],
                 "allow_out and services' connect")
    for i, svc in enumerate(own):  # this host's clients, DNAT'ed to the service
        doc.rule("output", [_match(_meta("oifname"), svc.veth),
                            _match({"concat": [_meta("l4proto"), _th("dport")]},
                                   f"@own{i}-listen"), _ACCEPT],
                 f"{svc.name}'s listen, from this host")
    doc.deny("output", [], "undeclared")

    # ---- mld-out: only the reports neighbour discovery needs (see MLD_RECORDS)
    link_source = _match(_field("ip6", "saddr"), {"set": ["::", _LINK_LOCAL6]})
    length = _field("ip6", "length")
    doc.rule("mld-out", [link_source,
                         _match(_field("icmpv6", "type"),
                                {"set": ["mld-listener-report", "mld-listener-done"]}),
                         _match(length, _HBH + 24)] + _mld_group(64, router) + [_ACCEPT],
             "MLDv1: neighbour discovery's groups")
    for records in range(1, MLD_RECORDS + 1):
        expr = [link_source, _match(_field("icmpv6", "type"), "mld2-listener-report"),
                _match(_field("ip6", "daddr"), "ff02::16"),
                _match(length, _HBH + 8 + 20 * records), _match(_raw(48, 16), records)]
        for i in range(records):  # record i: type, aux length, sources, group (bit offsets)
            expr += [_match(_raw(64 + 160 * i + 8, 24), 0)] + _mld_group(64 + 160 * i + 32,
                                                                           router)
        doc.rule("mld-out", expr + [_ACCEPT], f"MLDv2: {records} of neighbour discovery's groups")
    doc.deny("mld-out", [], "mld")

    # ---- forward
    if router or own:
        for i, lan in enumerate(spec.lans):
            oif = _match(_meta("oifname"), lan.interface)
            for version, family in FAMILIES:
                doc.rule("forward", [oif, _match(_field(family, "daddr"), f"@lan{i}-net{version}"),
                                     _flow(family, "saddr", "dport", f"mgmt{version}"), _ACCEPT],
                         f"management into {lan.interface}")
        doc.deny("forward", [_ct("invalid")], "invalid")
        doc.rule("forward", [_ct("established", "related"), _ACCEPT])
        for i, svc in enumerate(own):  # clients of other hosts in; its connects beyond out
            doc.rule("forward", [_match(_meta("oifname"), svc.veth),
                                 _match({"concat": [_meta("l4proto"), _th("dport")]},
                                        f"@own{i}-listen"), _ACCEPT], f"{svc.name}'s listen")
            doc.rule("forward", [_match(_meta("iifname"), svc.veth),
                                 _flow("ip", "daddr", "dport", f"own{i}-out4"), _ACCEPT],
                     f"{svc.name}'s connect")
        for i, lan in enumerate(spec.lans):
            oif = _match(_meta("oifname"), lan.interface)
            iif = _match(_meta("iifname"), lan.interface)
            for version, family in FAMILIES:
                into_lan = _flow(family, "daddr", "dport", f"lan{i}-in{version}")
                doc.rule("forward", [oif, into_lan, _ACCEPT], f"{lan.interface} services' listen")
            for version, family in FAMILIES:
                out_of_lan = _flow(family, "daddr", "dport", f"lan{i}-out{version}")
                doc.rule("forward", [iif, out_of_lan, _ACCEPT],
                         f"{lan.interface} services' connect")
    doc.deny("forward", [], "undeclared")
    return {"nftables": doc.cmds}


def management_first(ruleset: dict, spec: HostSpec) -> bool:
    """The invariant `apply` checks before touching the kernel: the first rules of input accept
    exactly the management entries (so nothing can drop them first), and prerouting accepts them
    before any drop."""
    cmds = [c["add"] for c in ruleset["nftables"] if "add" in c]
    sets = {c["set"]["name"]: c["set"].get("elem", []) for c in cmds if "set" in c}
    rules = [c["rule"] for c in cmds if "rule" in c]

    def first(chain: str, n: int) -> list[dict]:
        return [r for r in rules if r["chain"] == chain][:n]

    for version, _ in FAMILIES:
        want = [{"concat": [_addr(net), proto, _port(first, last)]}
                for net, proto, first, last in connect_boxes(spec.management, version)]
        if sets.get(f"mgmt{version}") != want:
            return False
    inputs = first("input", 2)
    pre = [r for r in rules if r["chain"] == "prerouting"]
    first_drop = next((i for i, r in enumerate(pre) if {"drop": None} in r["expr"]), len(pre))
    bypass = [i for i, r in enumerate(pre) if r.get("comment") == "management"]
    return (len(inputs) == 2 and all(r.get("comment") == "management" and r["expr"][-1] == _ACCEPT
                                     for r in inputs)
            and len(bypass) == 2 and max(bypass) < first_drop)

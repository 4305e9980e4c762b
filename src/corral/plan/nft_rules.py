"""Per-service nftables table: inclusive network filtering for each process's system user.

Every process of a service runs as its own user (corral-SERVICE-PROCESS) in the host's network
namespace, so the kernel can only tell processes apart by the socket owner (`meta skuid`).
For each service we install one table, `inet corral-SERVICE`:

    set P-connect4 / P-connect6   ipv4_addr|ipv6_addr . inet_proto . inet_service: exact entries
    set P-connect4-ranges / ...6-ranges   the same with flags interval: prefixes, port ranges
    set P-listen                  inet_proto . inet_service: single ports
    set P-listen-ranges           the same with flags interval: port ranges
    chain output   hook output, policy accept    meta skuid vmap { USER : goto proc-P, ... }
    chain proc-P   (isolated: a `counter drop` rule inserted here, host.nft.isolate)
                   ct direction reply, ct state established, (l4proto . sport) in P-listen
                                                 -> accept   (a server's replies: the fast path)
                   the same with P-listen-ranges -> accept
                   fib saddr type != local       -> goto deny-P-spoof
                   ct direction original, (daddr . l4proto . dport) in P-connect4/6(-ranges)
                                                 -> accept
                   ct direction reply, (l4proto . sport) in P-listen(-ranges)     -> accept
                   ct direction original -> goto deny-P-egress
                   ct direction reply    -> goto deny-P-listen   (serving an undeclared port)
                   anything else         -> goto deny-P-untracked
                                            (invalid or untracked by conntrack)
    chain deny-P-REASON                  log "corral S P REASON" (rate-limited); drop

Why this shape:
- Only the output hook: at input the receiving socket is not known yet, so inbound is enforced on
  the way back out (a server on an undeclared port cannot send its SYN-ACK / UDP answer).
  Consequence: a UDP datagram can still *reach* an undeclared socket; it just gets no reply.
- Policy accept and a per-user vmap: traffic of users we do not know (root, other services, the
  kernel's own control sockets) never enters a process chain. A drop in any table is final, so
  accepting here never overrides anybody else's drop and the chain priority does not matter.
- Related packets get no exemption. ICMP errors and RSTs the kernel generates for a flow come from
  kernel sockets with no owning user, so `meta skuid` never matches them; inbound ICMP errors are
  not filtered at all (no input hook). A *user's* socket can only emit related packets with
  CAP_NET_RAW or a conntrack helper; both are denied (they fall into egress/listen).
- Loopback is not special: 127.0.0.1 is just an address that must be declared.
- Anti-spoofing uses `fib saddr type != local` right in the output hook (the kernel accepts fib
  there and it works for IPv4 and IPv6): a contained user can only send from the host's addresses.
- `meta skuid` is the owner of the socket's *file* (the creator at socket() time; for a SYN-ACK,
  the listener). A socket created by another user and handed in (socket activation, SCM_RIGHTS) is
  attributed to its creator, so the launcher must not pass root-created sockets to a process.
- Sets keep the per-packet cost nearly flat however long the allow-list (measured, bench/nft.md:
  0.92 of the 10-entry rate at 100,000 entries, where a linear iptables chain keeps 0.007).
  Each allow-list is two sets: exact entries (one address, one port) in a hash set, prefixes
  and port ranges in an interval set. A concatenated interval set uses the kernel's pipapo
  backend, whose lookup grows with the element count and, with AVX2, saves the task's FPU state:
  ~0.4 us per packet on the test machine even with a single element, where a hash lookup costs
  ~0.05 (bench/nft_cost.py). The exact set is looked up first, so a server's replies from a
  single declared port never reach pipapo. Both sets always exist, whatever the manifest
  declares, so `sets_refill` (a reload) can move entries between them without changing the
  chains. Interval sets refuse partially overlapping elements, so entries are split into
  disjoint boxes (and a box is either exact or not: no element is in both sets).
- User names, not uids, go into the JSON (nft resolves them when the ruleset is applied, also in
  check mode; an unknown user is an error). The plan is computable before the users exist and the
  golden file holds no uids. Pass `uids` to embed numbers instead. The kernel stores the uid, so
  a user deleted and recreated with another uid needs the table applied again.
- The rules live in the kernel: they keep holding when corral is not running (fail closed).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from corral.core.netspec import Endpoint, PortSpec

# The groups and snapshot length the rules and the watcher agree on (re-exported here, where
# the rules' callers look for them).
from corral.core.nflog import LOG_SNAPLEN as LOG_SNAPLEN
from corral.core.nflog import NFLOG_GROUP as NFLOG_GROUP
from corral.core.nflog import nflog_group as nflog_group

# At most this many log messages per second per (process, reason); drops are always counted.
LOG_RATE = 10
LOG_BURST = 20

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_ANY = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ProcessFlows:
    process: str                   # "app"
    user: str                      # "corral-web-app" (system user name)
    listen: tuple[PortSpec, ...]   # inbound allowed to these ports
    connect: tuple[Endpoint, ...]  # egress allow-list (network None = any address)


def table_name(service: str) -> str:
    _check_name("service", service)
    return "corral-" + service


# ---------------------------------------------------------------- set contents (pure helpers)

def merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted union of inclusive ranges, adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of `ranges` not covered by `holes` (both merged, sorted)."""
    out = []
    for first, last in ranges:
        for hfirst, hlast in holes:
            if hlast < first or hfirst > last:
                continue
            if hfirst > first:
                out.append((first, hfirst - 1))
            first = hlast + 1
            if first > last:
                break
        if first <= last:
            out.append((first, last))
    return out


def connect_boxes(connect: Iterable[Endpoint], version: int) -> list[tuple[Network, str, int, int]]:
    """Disjoint (network, proto, first, last) boxes whose union is the allow-list of one family.

    Prefixes are either nested or disjoint, so a network only keeps the ports that no enclosing
    network already allows; the kernel rejects partially overlapping elements otherwise.
    """
    own: dict[tuple[str, Network], list[tuple[int, int]]] = {}
    for ep in connect:
        net = _ANY[version] if ep.network is None else ipaddress.ip_network(ep.network)
        if net.version == version:
            own.setdefault((ep.proto, net), []).append((ep.first, ep.last))
    boxes = []
    for (proto, net), ranges in own.items():
        covered = [r for (p, outer), rs in own.items()
                   if p == proto and outer != net and _subnet_of(net, outer) for r in rs]
        for first, last in subtract(merge(ranges), merge(covered)):
            boxes.append((net, proto, first, last))
    return sorted(boxes, key=lambda b: (b[0], b[1], b[2]))


def listen_boxes(listen: Iterable[PortSpec]) -> list[tuple[str, int, int]]:
    by_proto: dict[str, list[tuple[int, int]]] = {}
    for spec in listen:
        by_proto.setdefault(spec.proto, []).append((spec.first, spec.last))
    return [(proto, first, last)
            for proto in sorted(by_proto) for first, last in merge(by_proto[proto])]


def listen_elements(listen: Iterable[PortSpec]) -> tuple[list[dict], list[dict]]:
    """(exact, ranges): the elements of P-listen and P-listen-ranges."""
    exact: list[dict] = []
    ranges: list[dict] = []
    for proto, first, last in listen_boxes(listen):
        (exact if first == last else ranges).append({"concat": [proto, port(first, last)]})
    return exact, ranges


def connect_elements(connect: Iterable[Endpoint], version: int) -> tuple[list[dict], list[dict]]:
    """(exact, ranges): the elements of P-connectV and P-connectV-ranges. Exact: one address
    and one port; anything else (a prefix, a port range) needs the interval set."""
    exact: list[dict] = []
    ranges: list[dict] = []
    for net, proto, first, last in connect_boxes(connect, version):
        single = first == last and net.prefixlen == net.max_prefixlen
        (exact if single else ranges).append({"concat": [addr(net), proto, port(first, last)]})
    return exact, ranges


def flow_sets(flow: ProcessFlows) -> list[tuple[str, list[str], bool, list[dict]]]:
    """(name, type, interval, elements) of each of a process's allow-list sets, in order."""
    sets: list[tuple[str, list[str], bool, list[dict]]] = []
    for version, addr_type in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        exact, ranges = connect_elements(flow.connect, version)
        type_ = [addr_type, "inet_proto", "inet_service"]
        sets += [(f"{flow.process}-connect{version}", type_, False, exact),
                 (f"{flow.process}-connect{version}-ranges", type_, True, ranges)]
    exact, ranges = listen_elements(flow.listen)
    sets += [(f"{flow.process}-listen", ["inet_proto", "inet_service"], False, exact),
             (f"{flow.process}-listen-ranges", ["inet_proto", "inet_service"], True, ranges)]
    return sets


def port(first: int, last: int) -> int | dict:
    return first if first == last else {"range": [first, last]}


def _subnet_of(net: Network, outer: Network) -> bool:
    """net.subnet_of(outer), typed: both of one version (another version is never a subnet)."""
    if isinstance(net, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return net.subnet_of(outer)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return net.subnet_of(outer)
    return False


def addr(net: Network) -> str | dict:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


# ---------------------------------------------------------------- the ruleset (pure)

def _check_name(kind: str, name: str) -> None:
    # Names end up in set/chain names and in log prefixes that the watcher splits on spaces.
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f'{kind} name "{name}" must match [A-Za-z0-9][A-Za-z0-9_.-]*')


def match(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


_DIRECTION = {"ct": {"key": "direction"}}
_L4PROTO = {"meta": {"key": "l4proto"}}
_SPOOFED = match({"fib": {"flags": ["saddr"], "result": "type"}}, "local", "!=")


def th(field: str) -> dict:
    return {"payload": {"protocol": "th", "field": field}}


REASONS = ("spoof", "egress", "listen", "untracked")


def deny_chain(process: str, reason: str) -> str:
    return f"deny-{process}-{reason}"


def _deny(process: str, match: list[dict], reason: str) -> tuple[list, str | None]:
    """Count, then go to the reason's deny chain (log rate-limited, drop). One rule, so its
    match (a FIB lookup for `spoof`) is evaluated once per packet, not once for the log and
    again for the drop; the counter and comment stay here, in proc-PROCESS, for tests and
    operators."""
    return (match + [{"counter": None}, {"goto": {"target": deny_chain(process, reason)}}],
            reason)


def _deny_chain_rules(service: str, process: str, reason: str) -> list[list]:
    """The deny chain: the limit gates only the log, never the drop."""
    prefix = f"corral {service} {process} {reason}"
    return [[{"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}},
             {"log": {"prefix": prefix, "group": nflog_group(service), "snaplen": LOG_SNAPLEN}}],
            [{"drop": None}]]


def _process_rules(service: str, process: str) -> list[tuple[list, str | None]]:
    """(expressions, comment) of the rules in chain proc-PROCESS, in order. Each allow-list is
    an exact set then its -ranges set: two rules, the first decisive for exact entries."""
    sport = {"concat": [_L4PROTO, th("sport")]}
    listens = [match(sport, f"@{process}-listen"), match(sport, f"@{process}-listen-ranges")]
    reply, established = match(_DIRECTION, "reply"), match({"ct": {"key": "state"}}, "established")
    # First, the common case of a server: a reply on a flow the peer opened to a declared
    # port. Its source address is the one the peer's packet was delivered to, so it is the
    # host's own (conntrack matches the reply to that tuple; only TPROXY, which needs
    # CAP_NET_ADMIN, could deliver a foreign address): the FIB anti-spoof lookup below would
    # only repeat what conntrack already established. The ct matches come before the lookup:
    # they are cheaper, and they end the rule at once for a client's (original) packets.
    rules: list[tuple[list, str | None]] = [
        ([reply, established, listen, {"accept": None}], None) for listen in listens]
    rules.append(_deny(process, [_SPOOFED], "spoof"))  # before every other allow rule
    for version, family in ((4, "ip"), (6, "ip6")):
        dport = {"concat": [{"payload": {"protocol": family, "field": "daddr"}}, _L4PROTO,
                            th("dport")]}
        for suffix in ("", "-ranges"):
            rules.append(([match(_DIRECTION, "original"),
                           match(dport, f"@{process}-connect{version}{suffix}"),
                           {"accept": None}], None))
    rules += [([reply, listen, {"accept": None}], None) for listen in listens]
    rules.append(_deny(process, [match(_DIRECTION, "original")], "egress"))
    rules.append(_deny(process, [reply], "listen"))
    rules.append(_deny(process, [], "untracked"))
    return rules


def service_ruleset(service: str, flows: Sequence[ProcessFlows],
                    uids: Mapping[str, int] | None = None) -> dict:
    """libnftables JSON that atomically (re)creates table inet corral-SERVICE.

    add+delete+add of the table makes it idempotent whether or not the table exists, and nft
    applies one document as one transaction: on any error the previous table stays untouched.
    Output is deterministic (processes sorted by name, set elements sorted).
    """
    table = table_name(service)
    flows = sorted(flows, key=lambda f: f.process)
    for kind, names in (("process", [f.process for f in flows]), ("user", [f.user for f in flows])):
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate {kind} in service {service}: {sorted(names)}")
    base = {"family": "inet", "table": table}
    cmds: list[dict] = [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"delete": {"table": {"family": "inet", "name": table}}},
        {"add": {"table": {"family": "inet", "name": table}}},
    ]

    def add(kind: str, **obj) -> None:
        cmds.append({"add": {kind: {**base, **obj}}})

    for f in flows:
        _check_name("process", f.process)
        for name, type_, interval, elems in flow_sets(f):
            add("set", name=name, type=type_, **({"flags": ["interval"]} if interval else {}),
                **({"elem": elems} if elems else {}))

    # The watcher's `isolate` reaction inserts a drop rule at the head of each process chain
    # (host.nft.isolate), so that a service that is not isolated pays nothing for it: a set of
    # isolated uids checked on every packet cost up to ~0.2 us per round trip (bench/nft.md).
    add("chain", name="output", type="filter", hook="output", prio=0, policy="accept")
    for f in flows:
        add("chain", name=f"proc-{f.process}")
        for reason in REASONS:
            add("chain", name=deny_chain(f.process, reason))
    if flows:  # an anonymous vmap cannot be empty
        try:
            keys = [f.user if uids is None else uids[f.user] for f in flows]
        except KeyError as exc:
            raise ValueError(f"no uid given for user {exc}") from None
        dispatch = [[key, {"goto": {"target": f"proc-{f.process}"}}]
                    for key, f in zip(keys, flows, strict=True)]  # keys: one per flow
        add("rule", chain="output", comment="dispatch by socket owner",
            expr=[{"vmap": {"key": {"meta": {"key": "skuid"}}, "data": {"set": dispatch}}}])

    for f in flows:
        for expr, comment in _process_rules(service, f.process):
            add("rule", chain=f"proc-{f.process}", expr=expr,
                **({"comment": comment} if comment else {}))
        for reason in REASONS:
            for expr in _deny_chain_rules(service, f.process, reason):
                add("rule", chain=deny_chain(f.process, reason), expr=expr)
    return {"nftables": cmds}


def sets_refill(service: str, flows: Sequence[ProcessFlows]) -> dict:
    """libnftables JSON that empties and refills each process's connect and listen sets in one
    transaction (`corral reload`): the chains, counters and an isolation's rules stay as they are,
    and no packet ever meets a half-filled set. Needs the table made by `service_ruleset` with
    the same processes."""
    base = {"family": "inet", "table": table_name(service)}
    cmds: list[dict] = []
    for f in sorted(flows, key=lambda f: f.process):
        _check_name("process", f.process)
        for name, _type, _interval, elems in flow_sets(f):
            cmds.append({"flush": {"set": {**base, "name": name}}})
            if elems:
                cmds.append({"add": {"element": {**base, "name": name, "elem": elems}}})
    return {"nftables": cmds}

"""`network = "own"`: a service's own network namespace, its veth link to the host and the host
side's NAT table (docs/sandbox.md, "`network = "own"`: a network namespace per service").

    host namespace                                  the service's namespace (pinned by a bind
      crnXXXXXXXX  10.213.N.1/30  <-- veth -->        mount at /run/corral/NAME/netns)
      table ip corral-nat-NAME                        eth0  10.213.N.2/30, lo; default via .1
        prerouting/output: DNAT of the declared       table inet corral-NAME (the same per-
          listen ports on the host's addresses          process rules as on the host)
        postrouting: masquerade what it sends out     table ip corral-lo: declared connects to
        prerouting: from the veth, back to the          a host loopback address, DNAT'ed to the
          declared loopback address                     host side (route_localnet both ends)

The supervisor calls `create` while it is still in the host's mount namespace and `remove` at its
end (also after a failed start; `down` and `uninstall` for what a killed supervisor left). The
address pair is leased from the pool under a lock: a lease is /run/corral/NAME/network.json, and
a /30 that any other lease or any address of the host overlaps is skipped. Only IPv4: the
namespace has no IPv6 route (link-local only), and the host's 127.0.0.1 is not DNAT'ed to the
service (clients use the host's other addresses).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.core.fsio import write_json
from corral.core.names import veth_name
from corral.core.netspec import Endpoint, PortSpec
from corral.core.paths import run_dir, run_root
from corral.host import nft
from corral.kernel import syscalls as kernel
from corral.plan.nft_rules import ProcessFlows, listen_boxes, port

DEFAULT_POOL = "10.213.0.0/16"
INSIDE = "eth0"
LEASE = "network.json"
FORWARD = "/proc/sys/net/ipv4/ip_forward"
# The link's MTU: loopback's size, not Ethernet's 1500. Over the veth the host's own clients
# talk to the service as they would over lo; at 1500 each 4 KB answer took three segments, and
# nginx behind the veth used 2.9 times plain's CPU per request (bench/servers.py --own-netns).
# Flows beyond the host get the peer's MSS and the path's MTU as usual.
MTU = 65535


class NetnsError(OSError):
    """Setting up the namespace or its link failed; the message says which step."""


@dataclass(frozen=True)
class Link:
    service: str
    host_if: str  # the veth's host side
    host_addr: str  # its address; the service's default gateway
    addr: str  # the service's address (eth0)
    prefixlen: int = 30


def nat_table(service: str) -> str:
    return "corral-nat-" + service


def pin_path(service: str) -> Path:
    return Path(run_dir(service), "netns")  # = ServiceSpec.netns, which the launch path reads


# ---------------------------------------------------------------- address leases

def _leased(except_service: str) -> list[ipaddress.IPv4Network]:
    out = []
    for lease in Path(run_root()).glob(f"*/{LEASE}"):
        if lease.parent.name == except_service:
            continue
        try:
            data = json.loads(lease.read_text())
            out.append(ipaddress.IPv4Network(f"{data['addr']}/{data['prefixlen']}",
                                             strict=False))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a broken lease: its /30 is free again
    return out


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network on the host's interfaces (ours included, skipped as leases anyway)."""
    out = []
    for dev in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for info in dev.get("addr_info", []):
            out.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}",
                                             strict=False))
    return out


def choose(service: str, pool: str, taken: Iterable[ipaddress.IPv4Network]) -> Link:
    """The /30 of the pool for this service: from a place derived from its name (stable across
    restarts), the first one no taken network overlaps."""
    net = ipaddress.IPv4Network(pool)
    blocks = list(net.subnets(new_prefix=30)) if net.prefixlen < 30 else [net]
    taken = list(taken)
    start = int(hashlib.sha256(service.encode()).hexdigest(), 16) % len(blocks)
    for i in range(len(blocks)):
        block = blocks[(start + i) % len(blocks)]
        if not any(block.overlaps(other) for other in taken):
            hosts = list(block.hosts())
            return Link(service, veth_name(service), str(hosts[0]), str(hosts[1]))
    raise NetnsError(f"network_pool {pool}: no free /30 left (every one is leased by another "
                     "service or overlaps an address of this host)")


def leased(service: str) -> Link | None:
    """The link a running service leased (None: none, or an unreadable lease)."""
    try:
        return Link(**json.loads(Path(run_dir(service), LEASE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def lease(service: str, pool: str) -> Link:
    os.makedirs(run_dir(service), mode=0o700, exist_ok=True)
    with open(os.path.join(run_root(), "network.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two supervisors starting at once get two blocks
        link = choose(service, pool, _leased(service) + _host_networks())
        write_json(os.path.join(run_dir(service), LEASE), asdict(link))
    return link


# ---------------------------------------------------------------- the host side's NAT table

def nat_ruleset(link: Link, listen: Iterable[PortSpec],
                loopback: Iterable[tuple[str, int, int, str]] = ()) -> dict:
    """libnftables JSON (re)creating table ip corral-nat-NAME atomically: the declared listen
    ports on the host's own addresses DNAT'ed to the service (prerouting for other hosts,
    output for the host's own clients), and masquerade for what the service sends beyond the
    host. Packets from the service's own veth are never DNAT'ed back to it."""
    table = {"family": "ip", "name": nat_table(link.service)}
    base = {"family": "ip", "table": table["name"]}
    cmds: list[dict] = [{"add": {"table": table}}, {"delete": {"table": table}},
                        {"add": {"table": table}}]
    for name, hook, prio in (("prerouting", "prerouting", -100), ("output", "output", -100),
                             ("postrouting", "postrouting", 100)):
        cmds.append({"add": {"chain": {**base, "name": name, "type": "nat", "hook": hook,
                                       "prio": prio, "policy": "accept"}}})

    def rule(chain: str, expr: list, comment: str) -> None:
        cmds.append({"add": {"rule": {**base, "chain": chain, "expr": expr,
                                      "comment": comment}}})

    def match(left: dict, right: object, op: str = "==") -> dict:
        return {"match": {"op": op, "left": left, "right": right}}

    local = match({"fib": {"flags": ["daddr"], "result": "type"}}, "local")
    not_ours = match({"meta": {"key": "iifname"}}, link.host_if, "!=")
    not_loopback = match({"payload": {"protocol": "ip", "field": "daddr"}},
                         {"prefix": {"addr": "127.0.0.0", "len": 8}}, "!=")
    by_proto: dict[str, list] = {}
    for proto, first, last in listen_boxes(listen):
        by_proto.setdefault(proto, []).append(port(first, last))
    for proto, ports in sorted(by_proto.items()):
        dport = [match({"meta": {"key": "l4proto"}}, proto),
                 match({"payload": {"protocol": "th", "field": "dport"}}, {"set": ports})]
        dnat = {"dnat": {"addr": link.addr}}
        rule("prerouting", [not_ours, local, *dport, {"counter": None}, dnat],
             f"{proto} listen ports from other hosts")
        rule("output", [not_loopback, local, *dport, {"counter": None}, dnat],
             f"{proto} listen ports from this host")
    for proto, first, last, addr in loopback:  # loopback_ruleset's connects, back to lo
        rule("prerouting", [match({"meta": {"key": "iifname"}}, link.host_if),
                            match({"payload": {"protocol": "ip", "field": "daddr"}},
                                  link.host_addr),
                            match({"meta": {"key": "l4proto"}}, proto),
                            match({"payload": {"protocol": "th", "field": "dport"}},
                                  port(first, last)),
                            {"counter": None}, {"dnat": {"addr": addr}}],
             f"the service's connects to {addr}")
    rule("postrouting", [match({"payload": {"protocol": "ip", "field": "saddr"}}, link.addr),
                         match({"meta": {"key": "oifname"}}, link.host_if, "!="),
                         {"counter": None}, {"masquerade": None}], "the service's connects")
    return {"nftables": cmds}


# ---------------------------------------------------------------- host loopback services

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def loopback_targets(connects: Iterable[Endpoint]) -> list[tuple[str, int, int, str]]:
    """(proto, first, last, address) of each declared connect to one address of the host's
    loopback (a resolver on 127.0.0.53): inside the namespace that address is the service's own
    loopback, so these are carried to the host. One address per protocol and port: the first
    declared wins (the host side maps back by port)."""
    out: list[tuple[str, int, int, str]] = []
    for ep in connects:
        if ep.network is None:
            continue
        net = ipaddress.ip_network(ep.network)
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen == 32 \
                and net.subnet_of(LOOPBACK) and not any(
                    p == ep.proto and f <= ep.last and ep.first <= la for p, f, la, _ in out):
            out.append((ep.proto, ep.first, ep.last, str(net.network_address)))
    return out


def inside_flows(flows: Iterable[ProcessFlows], link: Link) -> list[ProcessFlows]:
    """The flows for the service table inside the namespace: the kernel's NAT of locally made
    packets runs before every filter chain of the output hook (at -100, whatever the nat
    chain's own priority), so the table sees a loopback connect already on its way to the host
    side's address. Each process's connects to a host loopback address are also allowed there,
    on the same ports: the host side sends those on to the declared address, nothing else."""
    out = []
    for flow in flows:
        mapped = tuple(Endpoint(proto, first, last, f"{link.host_addr}/32")
                       for proto, first, last, _ in loopback_targets(flow.connect))
        out.append(dataclasses.replace(flow, connect=flow.connect + mapped))
    return out


def loopback_ruleset(link: Link, targets: list[tuple[str, int, int, str]]) -> dict:
    """Inside the service's namespace, table ip corral-lo: a declared connect to a host loopback
    address goes to the host side's address instead (nat output), from the service's address
    (postrouting)."""
    table = {"family": "ip", "name": "corral-lo"}
    base = {"family": "ip", "table": "corral-lo"}
    cmds: list[dict] = [{"add": {"table": table}}, {"delete": {"table": table}},
                        {"add": {"table": table}}]
    for name, hook in (("output", "output"), ("postrouting", "postrouting")):
        cmds.append({"add": {"chain": {**base, "name": name, "type": "nat", "hook": hook,
                                       "prio": 100, "policy": "accept"}}})
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    for proto, first, last, addr in targets:
        cmds.append({"add": {"rule": {**base, "chain": "output", "expr": [
            _match(daddr, addr), _match({"meta": {"key": "l4proto"}}, proto),
            _match({"payload": {"protocol": "th", "field": "dport"}}, port(first, last)),
            {"counter": None}, {"dnat": {"addr": link.host_addr}}]}}})
    cmds.append({"add": {"rule": {**base, "chain": "postrouting", "expr": [
        _match({"meta": {"key": "oifname"}}, INSIDE),
        _match({"payload": {"protocol": "ip", "field": "saddr"}},
               {"prefix": {"addr": "127.0.0.0", "len": 8}}),
        {"counter": None}, {"snat": {"addr": link.addr}}]}}})
    return {"nftables": cmds}


def _match(left: dict, right: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _route_localnet(path: str) -> None:
    """Per interface, not host-wide: lets a loopback address be routed over this link (the
    host side's DNAT back to the loopback service, and its answers)."""
    with open(path, "w") as handle:
        handle.write("1")


# ---------------------------------------------------------------- create and remove

def _ip(*args: str, netns: Path | None = None, check: bool = True) -> str:
    cmd = ([] if netns is None else ["nsenter", f"--net={netns}"]) + ["ip", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(cmd)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _inside(path: Path, act: Callable[[], None]) -> None:
    """Run `act` in the namespace at `path`, in a helper thread (setns moves only the calling
    thread; ours must stay in the host's): its /proc/sys/net is that namespace's."""
    import threading

    failed: list[BaseException] = []

    def helper() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                kernel.setns(fd, kernel.CLONE_NEWNET)
            finally:
                os.close(fd)
            act()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=helper, name="corral-netns")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def _pin(path: Path) -> None:
    """A new network namespace, kept alive by a bind mount of its nsfs file at `path` (so it
    outlives the short-lived creator and `nsenter --net=PATH` reaches it)."""
    path.touch(mode=0o600)
    try:
        proc = subprocess.run(["unshare", f"--net={path}", "true"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"unshare --net={path}: {exc}") from exc
    if proc.returncode != 0:
        raise NetnsError(f"unshare --net={path} failed: {proc.stderr.strip()}")


def create(service: str, pool: str, listen: Iterable[PortSpec],
           connects: Iterable[Endpoint] = ()) -> Link:
    """The namespace, its link and the host side's NAT for `service`; what an earlier run left
    is removed first. On failure everything made here is removed again."""
    remove(service)
    link = lease(service, pool)
    path = pin_path(service)
    try:
        _pin(path)
        _ip("link", "set", "lo", "up", netns=path)
        # Made inside, the host side moved out to our namespace (the pid: ours is the host's).
        _ip("link", "add", INSIDE, "mtu", str(MTU), "type", "veth", "peer", "name",
            link.host_if, "mtu", str(MTU), "netns", str(os.getpid()), netns=path)
        _ip("addr", "add", f"{link.host_addr}/{link.prefixlen}", "dev", link.host_if)
        _ip("link", "set", link.host_if, "up")
        _ip("addr", "add", f"{link.addr}/{link.prefixlen}", "dev", INSIDE, netns=path)
        _ip("link", "set", INSIDE, "up", netns=path)
        _ip("route", "add", "default", "via", link.host_addr, netns=path)
        configure(link, listen, connects)
    except (OSError, nft.NftError) as exc:
        remove(service)
        raise NetnsError(f"network namespace of {service}: {exc}") from exc
    return link


def configure(link: Link, listen: Iterable[PortSpec], connects: Iterable[Endpoint]) -> None:
    """The NAT of a link, at the start and again at a reload: the host side's table, and the
    loopback carriage inside (route_localnet on both ends only when some connect needs it)."""
    path = pin_path(link.service)
    targets = loopback_targets(connects)
    if targets:
        _route_localnet(f"/proc/sys/net/ipv4/conf/{link.host_if}/route_localnet")
        _inside(path, lambda: _route_localnet(f"/proc/sys/net/ipv4/conf/{INSIDE}/route_localnet"))
    nft.apply(loopback_ruleset(link, targets), netns=str(path))
    nft.apply(nat_ruleset(link, listen, targets))


def remove(service: str) -> list[str]:
    """Undo `create` (idempotent): the NAT table, the veth (both ends go with either), the pin
    (the namespace itself ends with its last process) and the lease. Returns what it removed."""
    done = []
    try:
        if nat_table(service) in _ip_tables():
            nft.apply({"nftables": [{"delete": {"table": {"family": "ip",
                                                          "name": nat_table(service)}}}]})
            done.append(f"nftables table ip {nat_table(service)}")
    except (nft.NftError, ValueError):
        pass
    host_if = veth_name(service)
    if _ip("link", "show", "dev", host_if, check=False):
        _ip("link", "del", host_if, check=False)
        done.append(f"veth {host_if}")
    path = pin_path(service)
    try:
        kernel.umount2(str(path), kernel.MNT_DETACH)
        done.append(f"network namespace {path}")
    except OSError:
        pass  # not mounted
    for leftover in (path, Path(run_dir(service), LEASE)):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass
    return done


def _ip_tables() -> set[str]:
    listing = json.loads(nft.run(["-j", "list", "tables", "ip"], None) or '{"nftables": []}')
    return {item["table"]["name"] for item in listing["nftables"] if "table" in item}


def forwarding() -> bool:
    """net.ipv4.ip_forward of the host (of our namespace): the service's connects beyond this
    host and clients on other hosts need it; corral never sets it (a host-wide change)."""
    try:
        with open(FORWARD) as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False

"""Tests for corral.plan.nft_rules: golden file, pure properties, and the rules on a real kernel.

The kernel tests need root, nft, ip, useradd and setpriv. They never touch the host's ruleset:
everything is applied inside throwaway network namespaces (corral-t-*), deleted even on failure.
Test users corral-tstXXXXXX-{app,worker} are created with useradd and removed with userdel.

Lab topology:  netns MAIN (lo up, veth 10.77.0.1/24 fd77::1/64)  <->  netns PEER (10.77.0.2 fd77::2)
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core.netspec import Endpoint, PortSpec, parse_endpoint, parse_ports
from corral.host import nft
from corral.host.nft import NftError
from corral.plan import nft_rules as nftables
from corral.plan.nft_rules import ProcessFlows, service_ruleset
from netlab import (
    CLIENT,
    TCP_SERVERS,
    drop_counter,
    finish,
    need_root,
    netns,
    nft_in,
    run,
    settle,
    spawn,
    stop,
    system_users,
    veth_pair,
)

GOLDEN = Path(__file__).parent / "golden" / "nft_web.json"


def flows(service: str, app_listen, app_connect, worker_connect) -> list[ProcessFlows]:
    return [
        ProcessFlows("app", f"corral-{service}-app", tuple(parse_ports(p) for p in app_listen),
                     tuple(parse_endpoint(e) for e in app_connect)),
        ProcessFlows("worker", f"corral-{service}-worker", (),
                     tuple(parse_endpoint(e) for e in worker_connect)),
    ]


SAMPLE = flows("web", ["tcp/8080"],
               ["udp/53@127.0.0.53", "tcp/5432@10.0.0.5/32", "tcp/443@2001:db8::/32"],
               ["tcp/6379@127.0.0.1"])


# ---------------------------------------------------------------- golden and pure tests

def update_golden() -> None:
    """Regenerate tests/golden/nft_web.json (run with CORRAL_UPDATE_GOLDEN=1)."""
    GOLDEN.parent.mkdir(exist_ok=True)
    # One command per line: diffs show which set, chain or rule changed.
    cmds = service_ruleset("web", SAMPLE)["nftables"]
    GOLDEN.write_text('{"nftables": [\n' + ",\n".join(json.dumps(c) for c in cmds) + "\n]}\n")


def test_golden_web():
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        update_golden()
    assert service_ruleset("web", SAMPLE) == json.loads(GOLDEN.read_text())


def test_deterministic_and_order_independent():
    assert service_ruleset("web", SAMPLE) == service_ruleset("web", list(reversed(SAMPLE)))
    assert json.dumps(service_ruleset("web", SAMPLE)) == json.dumps(service_ruleset("web", SAMPLE))


def test_recreates_table_first():
    cmds = service_ruleset("web", SAMPLE)["nftables"]
    table = {"table": {"family": "inet", "name": "corral-web"}}
    assert cmds[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    # Everything else lives in our table only.
    assert all(next(iter(c["add"].values()))["table"] == "corral-web" for c in cmds[3:])


def test_uids_replace_user_names():
    doc = json.dumps(service_ruleset("web", SAMPLE,
                                     uids={"corral-web-app": 901, "corral-web-worker": 902}))
    assert "corral-web-app" not in doc and "[901, {" in doc
    with pytest.raises(ValueError, match="no uid"):
        service_ruleset("web", SAMPLE, uids={"corral-web-app": 901})


def test_rejects_bad_names_and_duplicates():
    with pytest.raises(ValueError):
        nftables.table_name("we b")
    with pytest.raises(ValueError, match="duplicate"):
        service_ruleset("web", [SAMPLE[0], SAMPLE[0]])
    with pytest.raises(ValueError):
        service_ruleset("web", [ProcessFlows('a"b', "u", (), ())])


def test_any_address_goes_to_both_families():
    eps = [parse_endpoint("udp/123")]
    assert ([(str(n), p, first, last) for n, p, first, last in nftables.connect_boxes(eps, 4)]
            == [("0.0.0.0/0", "udp", 123, 123)])
    assert ([(str(n), p, first, last) for n, p, first, last in nftables.connect_boxes(eps, 6)]
            == [("::/0", "udp", 123, 123)])


def test_listen_ranges_merge():
    specs = [PortSpec("tcp", 8000, 8010), PortSpec("tcp", 8011, 8012), PortSpec("udp", 53, 53),
             PortSpec("tcp", 8005, 8006)]
    assert nftables.listen_boxes(specs) == [("tcp", 8000, 8012), ("udp", 53, 53)]


_NETS = [
    "10.0.0.0/29",
    "10.0.0.0/30",
    "10.0.0.4/30",
    "10.0.0.2/31",
    "10.0.0.5/32",
    "10.0.0.7/32",
    None,
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 12), st.integers(0, 5),
                          st.sampled_from(_NETS)), max_size=8))
def test_connect_boxes_are_disjoint_and_exact(entries):
    """Splitting into boxes keeps exactly the allowed (addr, proto, port) points, without overlap
    (the kernel refuses partially overlapping elements in a concatenated interval set)."""
    eps = [Endpoint(proto, first, first + width, net) for proto, first, width, net in entries]
    boxes = nftables.connect_boxes(eps, 4)
    for i, (n1, p1, f1, l1) in enumerate(boxes):
        for n2, p2, f2, l2 in boxes[i + 1:]:
            assert not (p1 == p2 and n1.overlaps(n2) and f1 <= l2 and f2 <= l1)
    for addr in [ipaddress.ip_address(f"10.0.0.{i}") for i in range(9)]:
        for proto in ("tcp", "udp"):
            for port in range(1, 19):
                want = any(e.proto == proto and e.first <= port <= e.last
                           and (e.network is None or addr in ipaddress.ip_network(e.network))
                           for e in eps)
                got = any(p == proto and first <= port <= last and addr in n
                          for n, p, first, last in boxes)
                assert got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 12), st.integers(0, 5),
                          st.sampled_from(_NETS)), max_size=8))
def test_exact_entries_go_to_the_hash_set_the_rest_to_the_interval_set(entries):
    """The two sets of an allow-list split its boxes: one address and one port in the hash
    set (no interval flag: no pipapo lookup), prefixes and port ranges in the interval set,
    nothing in both, nothing lost."""
    eps = [Endpoint(proto, first, first + width, net) for proto, first, width, net in entries]
    exact, ranges = nftables.connect_elements(eps, 4)
    assert all(not isinstance(part, dict) for e in exact for part in e["concat"])
    assert all(any(isinstance(part, dict) for part in e["concat"]) for e in ranges)
    boxes = [{"concat": [nftables.addr(n), p, nftables.port(f, la)]}
             for n, p, f, la in nftables.connect_boxes(eps, 4)]
    assert sorted(map(json.dumps, exact + ranges)) == sorted(map(json.dumps, boxes))
    specs = [PortSpec(proto, first, first + width) for proto, first, width, _ in entries]
    exact, ranges = nftables.listen_elements(specs)
    assert [e["concat"] for e in exact + ranges] == sorted(
        ([p, nftables.port(f, la)] for p, f, la in nftables.listen_boxes(specs)),
        key=lambda c: isinstance(c[1], dict))
    assert all(isinstance(e["concat"][1], int) for e in exact)
    assert all(isinstance(e["concat"][1], dict) for e in ranges)


def test_set_types_do_not_depend_on_the_content():
    """Every process has the same six sets whatever it declares (a reload refills them without
    touching the chains): the exact ones without the interval flag, the -ranges ones with it."""
    def sets(flows_):
        return {(c["add"]["set"]["name"], tuple(c["add"]["set"].get("flags", ())))
                for c in service_ruleset("web", flows_)["nftables"] if "set" in c.get("add", {})}

    assert sets(SAMPLE) == sets(flows("web", ["udp/1000-2000"], ["tcp/1@10.0.0.0/8"], []))
    assert {name: flags for name, flags in sets(SAMPLE) if name.startswith("app-")} == {
        "app-connect4": (), "app-connect4-ranges": ("interval",),
        "app-connect6": (), "app-connect6-ranges": ("interval",),
        "app-listen": (), "app-listen-ranges": ("interval",)}
    refilled = {c.get("flush", c.get("add", {})).get("set", {}).get("name")
                for c in nftables.sets_refill("web", SAMPLE)["nftables"]} - {None}
    assert refilled == {name for name, _ in sets(SAMPLE)}


# ---------------------------------------------------------------- kernel helpers

def listing(ns: str, service: str) -> tuple[str, list]:
    """Text and handle-free JSON listing of our table (table handles differ between creations)."""
    table = nftables.table_name(service)
    text = nft_in(ns, "list", "table", "inet", table)
    items = json.loads(nft_in(ns, "-j", "list", "table", "inet", table))["nftables"]
    for item in items:
        for obj in item.values():
            obj.pop("handle", None)
    return text, items


def _rules(items: list) -> list:
    """The rules of a listing, their counters' values left out."""
    return [(i["rule"]["chain"], i["rule"].get("comment"),
             ["counter" if "counter" in e else e for e in i["rule"]["expr"]])
            for i in items if "rule" in i]


# TCP server for one connection on 0.0.0.0:PORT, run as a contained user.
LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4); s.settimeout(5)
print("ready", flush=True)
c, _ = s.accept(); c.sendall(b"ok"); c.close(); print("accepted", flush=True)
"""

# UDP receiver: prints the source address of the first datagram, or "timeout".
UDP_RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(1.5)
print("ready", flush=True)
try:
    print(s.recvfrom(64)[1][0])
except TimeoutError:
    print("timeout")
"""

# UDP sender with an arbitrary source address: IP_TRANSPARENT (needs CAP_NET_ADMIN) lets the
# socket bind to and send from an address the host does not own.
SPOOFER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.bind((sys.argv[1], 0))
try:
    s.sendto(b"x", (sys.argv[2], int(sys.argv[3]))); print("sent")
except OSError as e:
    print(type(e).__name__)
"""

# Minimal NFLOG listener: binds GROUP via nfnetlink_log, prints log prefixes until it sees WANTED.
NFLOG_LISTENER = r"""
import socket, struct, sys
group = int(sys.argv[1])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
s.bind((0, 0))
# NFULNL_MSG_CONFIG (subsystem ULOG=4, msg 1), nfgenmsg(res_id=group), attr NFULA_CFG_CMD=BIND
body = struct.pack("=BBH", 0, 0, socket.htons(group)) + struct.pack("=HHB3x", 5, 1, 1)
s.send(struct.pack("=IHHII", 16 + len(body), (4 << 8) | 1, 1 | 4, 1, 0) + body)
s.settimeout(3)
err = struct.unpack_from("=i", s.recv(4096), 16)[0]
print("ready" if err == 0 else f"bind error {err}", flush=True)
while True:
    data = s.recv(65536)
    off = 0
    while off + 20 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if mtype == (4 << 8) | 0:  # NFULNL_MSG_PACKET
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == 10:  # NFULA_PREFIX
                    prefix = data[a + 4:a + alen].rstrip(b"\0").decode()
                    print(prefix, flush=True)
                    if prefix == sys.argv[2]:
                        sys.exit(0)
                a += (alen + 3) & ~3
        off += max((length + 3) & ~3, 16)
"""


# ---------------------------------------------------------------- kernel fixtures

@pytest.fixture(scope="module")
def users():
    """Two real system users for service tstXXXXXX; removed again even on failure."""
    service = "tst" + secrets.token_hex(3)
    names = {p: f"corral-{service}-{p}" for p in ("app", "worker")}
    with system_users(*names.values()):
        yield service, names


@dataclass
class Lab:
    service: str
    users: dict
    ns: str
    peer: str


LAB_APP_LISTEN = ["tcp/8080"]
LAB_APP_CONNECT = ["tcp/9000@10.77.0.2", "tcp/9001@127.0.0.1", "tcp/9002@fd77::2",
                   "udp/9053@10.77.0.2", "tcp/9003@10.77.0.2"]   # nobody listens on 9003
LAB_WORKER_CONNECT = ["tcp/9000", "tcp/8080@127.0.0.1"]


@pytest.fixture(scope="module")
def lab(users):
    service, names = users
    tag = service[3:]
    procs: list[subprocess.Popen] = []
    with veth_pair(tag) as (ns, peer):
        try:
            procs.append(spawn(peer, None, TCP_SERVERS, "10.77.0.2:9000", "10.77.0.2:9009",
                               "fd77::2:9002", "fd77::2:9009"))
            # 5432 plays a host-only database on loopback that no process declared.
            procs.append(spawn(ns, None, TCP_SERVERS, "127.0.0.1:9001", "127.0.0.1:5432"))
            # Neighbour discovery on a fresh veth can take over a second: let root's traffic
            # settle it before any test counts a timeout as "blocked".
            settle(ns, "fd77::2", "9002")
            assert run(ns, None, CLIENT, "10.77.0.2", "9000") == "ok"
            nft.apply(service_ruleset(service, flows(service, LAB_APP_LISTEN, LAB_APP_CONNECT,
                                                          LAB_WORKER_CONNECT)), netns=ns)
            yield Lab(service, names, ns, peer)
        finally:
            for proc in procs:
                stop(proc)


BLOCKED = ("TimeoutError", "PermissionError")


# ---------------------------------------------------------------- kernel tests

@need_root
def test_check_mode_accepts_ruleset():
    with netns(f"corral-t-{secrets.token_hex(3)}") as ns:
        nft.check(service_ruleset("web", SAMPLE, uids={"corral-web-app": 64001,
                                                            "corral-web-worker": 64002}), netns=ns)
        # nft resolves user names even in check mode: an unknown user is an error, not a no-op rule.
        with pytest.raises(NftError, match="User does not exist"):
            nft.check(service_ruleset("web", SAMPLE), netns=ns)
        assert not nft.table_exists("web", netns=ns)


@need_root
def test_declared_egress_passes(lab):
    app, worker = lab.users["app"], lab.users["worker"]
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9000") == "ok"
    assert run(lab.ns, app, CLIENT, "127.0.0.1", "9001") == "ok"   # declared loopback
    assert run(lab.ns, app, CLIENT, "fd77::2", "9002") == "ok"     # IPv6 (fib saddr too)
    assert run(lab.ns, worker, CLIENT, "10.77.0.2", "9000") == "ok"  # no address = any address
    # Errors about allowed flows come back: RST from a declared but closed port is not filtered.
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9003") == "ConnectionRefusedError"


@need_root
def test_undeclared_egress_blocked(lab):
    app, worker = lab.users["app"], lab.users["worker"]
    before = drop_counter(lab.ns, lab.service, "app", "egress")
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9009") in BLOCKED     # other port
    assert run(lab.ns, app, CLIENT, "fd77::2", "9009") in BLOCKED       # other port, IPv6
    assert run(lab.ns, app, CLIENT, "127.0.0.1", "5432") in BLOCKED     # loopback is not special
    assert run(lab.ns, worker, CLIENT, "127.0.0.1", "9001") in BLOCKED  # other process's grant
    assert drop_counter(lab.ns, lab.service, "app", "egress") > before


@need_root
def test_root_unaffected(lab):
    assert run(lab.ns, None, CLIENT, "10.77.0.2", "9009") == "ok"
    assert run(lab.ns, None, CLIENT, "127.0.0.1", "5432") == "ok"


@need_root
def test_declared_listen_reachable(lab):
    server = spawn(lab.ns, lab.users["app"], LISTENER, "8080")
    try:
        assert run(lab.peer, None, CLIENT, "10.77.0.1", "8080") == "ok"
    finally:
        assert stop(server) == "accepted"
    server = spawn(lab.ns, lab.users["app"], LISTENER, "8080")
    try:  # another process of the service, over loopback, with both sides filtered
        assert run(lab.ns, lab.users["worker"], CLIENT, "127.0.0.1", "8080") == "ok"
    finally:
        assert stop(server) == "accepted"


@need_root
def test_undeclared_listen_unreachable(lab):
    before = drop_counter(lab.ns, lab.service, "app", "listen")
    server = spawn(lab.ns, lab.users["app"], LISTENER, "8081")
    try:
        assert run(lab.peer, None, CLIENT, "10.77.0.1", "8081") in BLOCKED
        assert run(lab.ns, None, CLIENT, "127.0.0.1", "8081") in BLOCKED
    finally:
        assert stop(server) == ""  # never accepted anything
    assert drop_counter(lab.ns, lab.service, "app", "listen") > before


@need_root
def test_spoofed_source_dropped(lab):
    """IP_TRANSPARENT (given to the test user as an ambient CAP_NET_ADMIN) is the way to send from a
    foreign source address; the destination is declared, so only the spoof rule can stop it."""
    app = lab.users["app"]
    before = drop_counter(lab.ns, lab.service, "app", "spoof")
    for source, expect in (("10.77.0.1", "10.77.0.1"), ("10.77.0.99", "timeout")):
        receiver = spawn(lab.peer, None, UDP_RECEIVER, "10.77.0.2", "9053")
        sent = run(lab.ns, app, SPOOFER, source, "10.77.0.2", "9053", caps="+net_admin")
        assert sent in ("sent", "PermissionError")
        assert finish(receiver) == expect
    assert drop_counter(lab.ns, lab.service, "app", "spoof") == before + 1


@need_root
def test_denied_packet_reaches_nflog(lab):
    wanted = f"corral {lab.service} worker egress"
    listener = spawn(lab.ns, None, NFLOG_LISTENER, str(nftables.nflog_group(lab.service)), wanted)
    try:
        assert run(lab.ns, lab.users["worker"], CLIENT, "10.77.0.2", "9009") in BLOCKED
        assert wanted in finish(listener).splitlines()
    finally:
        stop(listener)


@need_root
def test_isolate_cuts_the_service_users_only_and_release_restores(lab):
    """A drop rule at the head of the process's chain: an isolated user can neither start a
    declared connection nor answer on its declared port; root and the other process's user are
    untouched; isolating twice does not stack the rules; release lets everything through
    again and leaves the table as it was."""
    app, worker = lab.users["app"], lab.users["worker"]
    before = listing(lab.ns, lab.service)
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9000") == "ok"
    nft.isolate(lab.service, ["app"], netns=lab.ns)
    nft.isolate(lab.service, ["app"], netns=lab.ns)
    try:
        isolating = [r for r in listing(lab.ns, lab.service)[1] if "rule" in r
                     and r["rule"].get("comment") == "isolated"]
        assert [r["rule"]["chain"] for r in isolating] == ["proc-app"]
        assert run(lab.ns, app, CLIENT, "10.77.0.2", "9000") in BLOCKED
        server = spawn(lab.ns, app, LISTENER, "8080")
        try:
            assert run(lab.peer, None, CLIENT, "10.77.0.1", "8080") in BLOCKED
        finally:
            stop(server)
        assert run(lab.ns, worker, CLIENT, "10.77.0.2", "9000") == "ok"
        assert run(lab.ns, None, CLIENT, "10.77.0.2", "9000") == "ok"
    finally:
        nft.release(lab.service, netns=lab.ns)
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9000") == "ok"
    assert _rules(listing(lab.ns, lab.service)[1]) == _rules(before[1])
    nft.release(lab.service, netns=lab.ns)  # not isolated: nothing to do, no error


@need_root
def test_a_changed_table_applied_over_an_isolated_service_keeps_it_isolated(lab):
    """An install that changes the table makes it anew: the isolation's drop rule must be in
    the new table at once (one transaction), or re-installing would release what the watcher
    cut. The process's chain in the new table is isolated; the other's is not."""
    app, worker = lab.users["app"], lab.users["worker"]
    nft.isolate(lab.service, ["app"], netns=lab.ns)
    try:
        changed = service_ruleset(lab.service, flows(lab.service, LAB_APP_LISTEN,
                                                     [*LAB_APP_CONNECT, "tcp/9009@10.77.0.2"],
                                                     LAB_WORKER_CONNECT))
        nft.apply_service_table(lab.service, changed, exists=True, netns=lab.ns)
        assert run(lab.ns, app, CLIENT, "10.77.0.2", "9000") in BLOCKED
        assert run(lab.ns, worker, CLIENT, "10.77.0.2", "9000") == "ok"
        kept = [r["rule"]["chain"] for r in listing(lab.ns, lab.service)[1]
                if "rule" in r and r["rule"].get("comment") == "isolated"]
        assert kept == ["proc-app"]
    finally:
        nft.release(lab.service, netns=lab.ns)
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9000") == "ok"
    assert run(lab.ns, app, CLIENT, "10.77.0.2", "9009") == "ok"  # the changed table's entry


@need_root
def test_apply_twice_same_state_and_atomic_failure(users):
    service, names = users
    wanted = service_ruleset(service, flows(service, LAB_APP_LISTEN, LAB_APP_CONNECT,
                                            LAB_WORKER_CONNECT))
    with netns(f"corral-t-{secrets.token_hex(3)}") as ns:
        nft.apply(wanted, netns=ns)
        first = listing(ns, service)
        nft.apply(wanted, netns=ns)
        assert listing(ns, service) == first
        # A different plan replaces the table completely; re-applying the first one restores it.
        nft.apply(service_ruleset(service, flows(service, ["udp/1-2"], ["udp/7"], [])), netns=ns)
        assert listing(ns, service) != first
        nft.apply(wanted, netns=ns)
        assert listing(ns, service) == first
        # One transaction: a failing document leaves the installed table as it was.
        broken = service_ruleset(service, [ProcessFlows("app", "corral-no-such-user-x", (), ())])
        with pytest.raises(NftError, match="User does not exist"):
            nft.apply(broken, netns=ns)
        assert listing(ns, service) == first


@need_root
def test_delete_table_only_ours(users):
    service, _ = users
    with netns(f"corral-t-{secrets.token_hex(3)}") as ns:
        nft_in(ns, "add table inet othertable; "
               "add chain inet othertable out "
               "{ type filter hook output priority 0; policy accept; }; "
               "add rule inet othertable out counter")
        other = nft_in(ns, "list", "table", "inet", "othertable")
        assert not nft.delete_table(service, netns=ns)
        nft.apply(service_ruleset(service, flows(service, [], [], [])), netns=ns)
        assert nft.table_exists(service, netns=ns)
        assert nft.delete_table(service, netns=ns)
        assert not nft.table_exists(service, netns=ns)
        assert not nft.delete_table(service, netns=ns)
        assert nft_in(ns, "list", "table", "inet", "othertable") == other


@need_root
def test_reload_moves_entries_between_the_exact_and_the_range_sets(users):
    """sets_refill (corral reload) turns a single declared port into a range and back, for
    listen and connect: what the new declaration allows passes, what it no longer allows is
    dropped, with the chains left as they were."""
    service, names = users
    app = names["app"]
    with netns(f"corral-t-{secrets.token_hex(3)}") as ns:
        servers = spawn(ns, None, TCP_SERVERS, "127.0.0.1:9000", "127.0.0.1:9001")
        try:
            nft.apply(service_ruleset(service, flows(service, ["tcp/8080"],
                                                     ["tcp/9001@127.0.0.1"], [])), netns=ns)
            chains = listing(ns, service)[1]

            def reachable(port: str) -> bool:
                server = spawn(ns, app, LISTENER, port)
                try:
                    answer = run(ns, None, CLIENT, "127.0.0.1", port)
                finally:
                    stop(server)
                assert answer == "ok" or answer in BLOCKED
                return answer == "ok"

            def may_connect(port: str) -> bool:
                answer = run(ns, app, CLIENT, "127.0.0.1", port)
                assert answer == "ok" or answer in BLOCKED
                return answer == "ok"

            assert reachable("8080") and not reachable("8085")
            assert may_connect("9001") and not may_connect("9000")
            nft.apply(nftables.sets_refill(service, flows(
                service, ["tcp/8080-8090"], ["tcp/9000-9001@127.0.0.0/8"], [])), netns=ns)
            assert "8080-8090" in nft_in(ns, "list", "set", "inet", f"corral-{service}",
                                         "app-listen-ranges")
            assert reachable("8085") and reachable("8080") and not reachable("8091")
            assert may_connect("9000") and may_connect("9001")
            nft.apply(nftables.sets_refill(service, flows(
                service, ["tcp/8080"], ["tcp/9001@127.0.0.1"], [])), netns=ns)
            assert reachable("8080") and not reachable("8085")
            assert may_connect("9001") and not may_connect("9000")
            # The rules are the ones the table was made with (counter values aside).
            assert _rules(listing(ns, service)[1]) == _rules(chains)
        finally:
            stop(servers)

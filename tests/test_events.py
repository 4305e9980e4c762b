"""Tests for corral.watch.nflog (the NFLOG reader) and corral.cli.events (`corral host events`).

Pure tests parse hand-made packets. The kernel tests need root, nft, ip, useradd and setpriv; they
never touch the host: a throwaway netns MAIN (veth 10.77.0.1/24 fd77::1/64) with a peer netns
(10.77.0.2, fd77::2), a real corral service table applied in MAIN for a test user
corral-tstXXXXXX-app (removed with userdel), and the reader's socket opened inside MAIN (through
EventReader(netns_fd=...), or the CLI run under `ip netns exec`).
"""

from __future__ import annotations

import json
import math
import os
import pwd
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core.netspec import parse_endpoint
from corral.host import nft
from corral.plan.nft_rules import (
    LOG_BURST,
    LOG_RATE,
    NFLOG_GROUP,
    ProcessFlows,
    nflog_group,
    service_ruleset,
)
from corral.watch import nflog as events
from corral.watch.nflog import EventReader, EventsError, parse_headers, parse_packet, parse_prefix
from netlab import (
    TCP_SERVERS,
    drop_counter,
    need_root,
    run,
    spawn,
    stop,
    system_users,
    tcp_client,
    veth_pair,
)

# ---------------------------------------------------------------- pure: prefixes and headers

def test_parse_prefix():
    assert parse_prefix("corral web app egress") == ("web", "app", "egress")
    assert parse_prefix("corral host input") == ("host", None, "input")
    assert parse_prefix("corral host app listen") == ("host", "app", "listen")  # a service "host"
    for other in ("", "corral", "corral web", "ulogd says hi", "corral  web app egress", "x y z w"):
        assert parse_prefix(other) == (None, None, None)


def ipv4(proto: int, payload: bytes, src="10.0.0.1", dst="10.0.0.2", frag_offset=0) -> bytes:
    total = 20 + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, frag_offset, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


def ipv6(next_header: int, payload: bytes, src="fd77::1", dst="fd77::2") -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + payload)


TCP_SYN = struct.pack("!HHIIBBHHH", 40000, 9009, 1, 0, 0x50, 0x02, 1024, 0, 0)


def test_headers_ipv4_tcp_udp_icmp():
    assert parse_headers(ipv4(6, TCP_SYN), socket.AF_INET) == {
        "family": "ipv4",
        "proto": "tcp",
        "src": "10.0.0.1",
        "dst": "10.0.0.2",
        "sport": 40000,
        "dport": 9009,
    }
    udp = parse_headers(ipv4(17, struct.pack("!HHHH", 5353, 53, 8, 0)))   # family from the version
    assert (udp["proto"], udp["sport"], udp["dport"]) == ("udp", 5353, 53)
    icmp = parse_headers(ipv4(1, b"\x08\x00\x00\x00"), socket.AF_INET)
    assert ((icmp["proto"], icmp["sport"], icmp["dport"], icmp["dst"])
            == ("icmp", None, None, "10.0.0.2"))
    assert parse_headers(ipv4(132, b"\0" * 12), socket.AF_INET)["proto"] == "other"  # sctp
    # A later fragment has no transport header: addresses yes, ports no.
    frag = parse_headers(ipv4(6, TCP_SYN, frag_offset=185), socket.AF_INET)
    assert (frag["proto"], frag["src"], frag["sport"]) == ("tcp", "10.0.0.1", None)


def test_headers_ipv6_extension_headers():
    plain = parse_headers(ipv6(6, TCP_SYN), socket.AF_INET6)
    assert plain == {"family": "ipv6", "proto": "tcp", "src": "fd77::1", "dst": "fd77::2",
                     "sport": 40000, "dport": 9009}
    hop_by_hop = bytes([44, 0]) + b"\x01\x04\0\0\0\0"                    # next: fragment
    fragment = struct.pack("!BBHI", 17, 0, 0, 7)                         # offset 0, next: udp
    walked = parse_headers(ipv6(0, hop_by_hop + fragment + struct.pack("!HHHH", 1234, 53, 8, 0)))
    assert ((walked["family"], walked["proto"], walked["sport"], walked["dport"])
            == ("ipv6", "udp", 1234, 53))
    later = parse_headers(ipv6(44, struct.pack("!BBHI", 17, 0, 8 << 3, 7) + b"\0" * 8))
    assert (later["proto"], later["dport"]) == ("udp", None)
    icmp6 = parse_headers(ipv6(58, b"\x80\0\0\0"), socket.AF_INET6)
    assert (icmp6["proto"], icmp6["dport"]) == ("icmpv6", None)


def test_headers_cut_short():
    assert parse_headers(b"", None)["family"] is None
    short = parse_headers(ipv4(6, TCP_SYN)[:22], socket.AF_INET)   # IP header, 2 bytes of TCP
    assert (short["src"], short["proto"], short["sport"]) == ("10.0.0.1", "tcp", None)
    assert parse_headers(ipv6(6, TCP_SYN)[:30], socket.AF_INET6)["src"] is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=160), st.sampled_from([None, 0, socket.AF_INET, socket.AF_INET6, 7]))
def test_headers_never_raise(data, family):
    out = parse_headers(data, family)
    assert set(out) == {"family", "proto", "src", "dst", "sport", "dport"}


def nflog_message(prefix: bytes, payload: bytes, uid: int | None = None,
                  stamp: tuple[int, int] | None = None,
                  family: int = socket.AF_INET) -> bytes:
    def attr(kind: int, value: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)
    body = struct.pack("=BBH", family, 0, socket.htons(NFLOG_GROUP))
    body += attr(events.NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, 3))
    body += attr(events.NFULA_PREFIX, prefix + b"\0")
    if stamp:
        body += attr(events.NFULA_TIMESTAMP, struct.pack("!QQ", *stamp))
    if uid is not None:
        body += attr(events.NFULA_UID, struct.pack("!I", uid))
    body += attr(events.NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), events.MSG_PACKET, 0, 0, 0) + body


def test_parse_packet_message():
    msg = nflog_message(b"corral web app egress", ipv4(6, TCP_SYN), uid=4242,
                        stamp=(1700000000, 123456))
    event = parse_packet(msg, received=1800000000.5, user_name={4242: "corral-web-app"}.get)
    assert event == {"time": "2023-11-14T22:13:20.123456Z", "uid": 4242, "user": "corral-web-app",
                     "service": "web", "process": "app", "reason": "egress",
                     "prefix": "corral web app egress", "family": "ipv4", "proto": "tcp",
                     "src": "10.0.0.1", "sport": 40000, "dst": "10.0.0.2", "dport": 9009}
    # No kernel timestamp (the output hook has none), no socket owner, a foreign prefix.
    other = parse_packet(nflog_message(b"hello \xff", ipv4(17, b"\0" * 8)), received=1800000000.5)
    assert other["time"] == "2027-01-15T08:00:00.500000Z"
    assert ((other["uid"], other["user"], other["service"], other["prefix"])
            == (None, None, None, "hello \ufffd"))


def test_import_is_light():
    code = ("import sys, corral.watch.nflog, corral.cli.events; "
            "print(sorted(m for m in ('pyroute2', 'ctypes', 'rich', 'psutil', 'pydantic') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


# ---------------------------------------------------------------- kernel helpers

# A short connect timeout: an event is stamped when the reader reads it, after the client gave
# up, and the tests want that within a second of the attempt.
CLIENT = tcp_client(timeout=0.5)

# N UDP datagrams to HOST:PORT from one socket; prints "sent refused seconds".
UDP_FLOOD = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sent = refused = 0
start = time.monotonic()
for _ in range(n):
    try:
        s.sendto(b"x", (host, port)); sent += 1
    except OSError:
        refused += 1
print(sent, refused, time.monotonic() - start)
"""


def wait_for(reader: EventReader, match, seconds: float = 3.0) -> dict:
    """The first event for which match(event) holds, within `seconds`."""
    deadline = time.monotonic() + seconds
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        for event in reader.read(left):
            if match(event):
                return event
            seen.append(event)
    raise AssertionError(f"no matching event; got {seen}")


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass
class Lab:
    service: str
    user: str
    uid: int
    ns: str
    fd: int    # open fd of the MAIN namespace


@pytest.fixture(scope="module")
def lab():
    service = "tst" + secrets.token_hex(3)
    user = f"corral-{service}-app"
    with (system_users(user, comment="corral service events test"),
          veth_pair(service[3:]) as (ns, peer)):
        server = spawn(peer, None, TCP_SERVERS, "10.77.0.2:9000")
        try:
            flows = [ProcessFlows("app", user, (), (parse_endpoint("tcp/9000@10.77.0.2"),))]
            nft.apply(service_ruleset(service, flows), netns=ns)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                yield Lab(service, user, pwd.getpwnam(user).pw_uid, ns, fd)
            finally:
                os.close(fd)
        finally:
            stop(server)


@pytest.fixture
def reader(lab):
    with EventReader(nflog_group(lab.service), netns_fd=lab.fd) as r:
        yield r


# ---------------------------------------------------------------- kernel tests

@need_root
def test_reader_made_in_netns_leaves_thread_alone(lab):
    before = os.readlink("/proc/thread-self/ns/net")
    with EventReader(nflog_group(lab.service), netns_fd=lab.fd):
        assert os.readlink("/proc/thread-self/ns/net") == before


@need_root
def test_denied_tcp_connect_event(lab, reader):
    sent = time.time()
    assert run(lab.ns, lab.user, CLIENT, "10.77.0.2", "9009") in ("TimeoutError", "PermissionError")
    event = wait_for(reader, lambda e: e["dport"] == 9009)
    assert event["uid"] == lab.uid and event["user"] == lab.user
    assert (event["service"], event["process"], event["reason"]) == (lab.service, "app", "egress")
    assert event["prefix"] == f"corral {lab.service} app egress"
    assert (event["family"], event["proto"]) == ("ipv4", "tcp")
    assert (event["src"], event["dst"]) == ("10.77.0.1", "10.77.0.2")
    assert isinstance(event["sport"], int) and event["sport"] > 0
    assert event["time"].endswith("Z") and len(event["time"]) == len("2025-01-01T00:00:00.000000Z")
    assert abs(epoch(event["time"]) - sent) < 1.0


@need_root
def test_denied_udp_and_ipv6_events(lab, reader):
    sent = time.time()
    assert run(lab.ns, lab.user, UDP_FLOOD, "10.77.0.2", "9053", "1").split()[:2] == ["0", "1"]
    event = wait_for(reader, lambda e: e["dport"] == 9053)
    assert ((event["proto"], event["dst"], event["uid"], event["reason"])
            == ("udp", "10.77.0.2", lab.uid, "egress"))
    assert abs(epoch(event["time"]) - sent) < 1.0
    run(lab.ns, lab.user, CLIENT, "fd77::2", "9009")
    event = wait_for(reader, lambda e: e["family"] == "ipv6")
    assert ((event["proto"], event["src"], event["dst"], event["dport"])
            == ("tcp", "fd77::1", "fd77::2", 9009))
    assert (event["service"], event["reason"], event["uid"]) == (lab.service, "egress", lab.uid)


@need_root
def test_declared_traffic_and_root_give_no_event(lab, reader):
    assert run(lab.ns, lab.user, CLIENT, "10.77.0.2", "9000") == "ok"
    run(lab.ns, None, UDP_FLOOD, "10.77.0.2", "9053", "3")   # root: not in any table
    assert reader.read(0.5) == []


@need_root
def test_rate_limit_under_flood(lab, reader):
    before = drop_counter(lab.ns, lab.service, "app", "egress")
    sent, refused, seconds = run(lab.ns, lab.user, UDP_FLOOD, "10.77.0.2", "9054", "1000").split()
    assert (int(sent), int(refused)) == (0, 1000)
    got = []
    while batch := reader.read(1.0):
        got += batch
    assert drop_counter(lab.ns, lab.service, "app", "egress") - before == 1000
    flood = [e for e in got if e["dport"] == 9054]
    assert len(flood) == len(got) and reader.lost == 0
    # The token bucket holds LOG_RATE + LOG_BURST messages and refills at LOG_RATE per second.
    assert LOG_RATE <= len(flood) <= LOG_RATE + LOG_BURST + math.ceil(LOG_RATE * float(seconds)) + 1
    assert all(e["uid"] == lab.uid and e["proto"] == "udp" for e in flood)


@need_root
def test_one_listener_per_group(lab, reader):
    with pytest.raises(EventsError, match="another listener"):
        EventReader(nflog_group(lab.service), netns_fd=lab.fd)
    reader.close()
    reader.close()   # idempotent
    with EventReader(nflog_group(lab.service), netns_fd=lab.fd):   # the group is free again
        pass


@need_root
def test_stream_until_quiet(lab):
    def traffic():
        time.sleep(0.5)
        run(lab.ns, lab.user, UDP_FLOOD, "10.77.0.2", "9055", "2")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        got = list(events.stream(nflog_group(lab.service), follow=False, timeout=1.5,
                                 netns_fd=lab.fd))
    finally:
        thread.join()
    assert [e["dport"] for e in got] == [9055, 9055]


def cli(ns: str, *args: str) -> subprocess.Popen:
    code = "from corral.cli.events import events; events(prog_name='corral host events')"
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def poke_until_done(lab: Lab, proc: subprocess.Popen, port: int,
                    seconds: float = 10) -> tuple[str, str]:
    """Send a denied datagram every 0.3 s until the CLI exits (it binds at an unknown moment)."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        run(lab.ns, lab.user, UDP_FLOOD, "10.77.0.2", str(port), "1")
        time.sleep(0.3)
    out, err = proc.communicate(timeout=5)
    return out, err


@need_root
def test_cli_json_and_plain(lab):
    proc = cli(lab.ns, "--json", "--count", "1", "--timeout", "10", "--service", lab.service)
    out, err = poke_until_done(lab, proc, 9056)
    assert proc.returncode == 0, err
    event = json.loads(out)
    assert (event["service"], event["process"], event["reason"], event["dport"], event["uid"]) == \
        (lab.service, "app", "egress", 9056, lab.uid)

    proc = cli(lab.ns, "--count", "1", "--timeout", "10", "--service", lab.service)
    out, err = poke_until_done(lab, proc, 9057)
    assert proc.returncode == 0, err
    header, line = out.splitlines()
    assert header.split()[:3] == ["TIME", "(UTC)", "SERVICE"]
    assert line.split()[1:6] == [lab.service, "app", "egress", "udp",
                                 "10.77.0.1:" + line.split()[5].split(":")[1]]
    assert line.split()[6:] == ["10.77.0.2:9057", lab.user, f"({lab.uid})"]
    assert header.index("DESTINATION") == line.index("10.77.0.2:9057")   # aligned


@need_root
def test_cli_filters_and_times_out(lab):
    proc = cli(lab.ns, "--json", "--timeout", "1.5", "--service", "not-this-one")
    out, err = poke_until_done(lab, proc, 9058, seconds=5)
    assert (proc.returncode, out) == (0, "")


@need_root
def test_cli_reports_busy_group(lab, reader):
    proc = cli(lab.ns, "--timeout", "1", "--service", lab.service)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and f"cannot bind NFLOG group {nflog_group(lab.service)}" in err

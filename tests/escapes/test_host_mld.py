"""Covert MLD reports past the host table (issue 16 / red team finding 7, second half): the
kernel announces every IPv6 group joined on the host in MLD reports, which no socket owns
(`meta skuid` matches none, checked below), so a group address chosen to encode data leaves the
host. Contained processes cannot join (seccomp, test_refusals), but one that declares
`multicast = true`, or any host process, can. The host table's output chain must let out only
the reports neighbour discovery needs: its solicited-node groups (ff02::1:ffXX:XXXX).

A host namespace with `table inet corral-host` (server role) and a veth to a peer namespace that
sniffs; the joins are made by an unprivileged user (nobody) on the host side."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time

import pytest

from corral.core.netspec import parse_endpoint
from corral.plan.host_rules import HostSpec, host_ruleset

from .test_refusals import sniff, sniffed

pytestmark = pytest.mark.root

JOIN = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for group in sys.argv[2:]:
    mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", int(sys.argv[1]))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
time.sleep(1.5)
"""

# Counts MLD reports by socket owner: the kernel's own socket has none.
OWNERS = """
table inet corral-t-mld-owner {
  chain output { type filter hook output priority -10; policy accept;
    icmpv6 type mld2-listener-report meta skuid 65534 counter comment "nobody"
    icmpv6 type mld2-listener-report meta skuid != 65534 counter comment "other user"
    icmpv6 type mld2-listener-report counter comment "all"
  }
}
"""


def sh(*args: str, **kw) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def counters(ns: str, table: str) -> dict[str, int]:
    out = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", table))
    found = {}
    for item in out["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment"):
            for expr in rule["expr"]:
                if "counter" in expr:
                    found[rule["comment"]] = expr["counter"]["packets"]
    return found


@pytest.fixture(scope="module")
def lan():
    host, peer = (f"corral-t-mld{secrets.token_hex(3)}{s}" for s in ("h", "p"))
    try:
        for ns in (host, peer):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", host, "link", "add", "ml0", "type", "veth", "peer", "name", "ml1",
           "netns", peer)
        sh("ip", "-n", host, "addr", "add", "fd79::1/64", "dev", "ml0", "nodad")
        sh("ip", "-n", peer, "addr", "add", "fd79::2/64", "dev", "ml1", "nodad")
        sh("ip", "-n", host, "link", "set", "ml0", "up")
        sh("ip", "-n", peer, "link", "set", "ml1", "up")
        time.sleep(1)  # the interface's own reports at link-up: before the table
        spec = HostSpec("server", (parse_endpoint("tcp/22@fd79::2/128"),), (), True, ())
        sh("ip", "netns", "exec", host, "nft", "-j", "-f", "-",
           input=json.dumps(host_ruleset(spec)))
        sh("ip", "netns", "exec", host, "nft", "-f", "-", input=OWNERS)
        ifindex = json.loads(sh("ip", "-j", "-n", host, "link", "show", "ml0"))[0]["ifindex"]
        yield {"host": host, "peer": peer, "ifindex": ifindex}
    finally:
        for ns in (host, peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def join_as_nobody(lan: dict, *groups: str) -> None:
    sh("ip", "netns", "exec", lan["host"], "setpriv", "--reuid", "65534", "--regid", "65534",
       "--clear-groups", "/usr/bin/python3.11", "-c", JOIN, str(lan["ifindex"]), *groups)


def test_mld_reports_have_no_socket_owner(lan):
    """Why per-user rules cannot stop the channel: the joiner's uid is not on its reports."""
    before = counters(lan["host"], "corral-t-mld-owner")
    join_as_nobody(lan, "ff0e::c0de:1")
    after = counters(lan["host"], "corral-t-mld-owner")
    assert after["all"] > before["all"]
    assert after["nobody"] == before["nobody"] and after["other user"] == before["other user"]


def test_a_covert_group_does_not_leave_the_host(lan):
    secret = b"TOPSECRET-mld!"
    group = socket.inet_ntop(socket.AF_INET6, b"\xff\x0e" + secret)
    proc = sniff(lan["peer"], [secret])
    try:
        join_as_nobody(lan, group)
    finally:
        seen = sniffed(proc)
    assert secret.hex() not in seen, "the secret left the host in an MLD report"
    assert counters(lan["host"], "corral-host").get("mld", 0) > 0  # dropped and counted


def test_link_local_groups_other_than_nd_do_not_leave(lan):
    fake = socket.inet_ntop(socket.AF_INET6, bytes.fromhex("ff020000000000000000000000c0ffee"))
    proc = sniff(lan["peer"], [socket.inet_pton(socket.AF_INET6, fake)])
    try:
        join_as_nobody(lan, fake)
    finally:
        seen = sniffed(proc)
    assert not seen, "ff02::c0ff:ee (not a solicited-node group) left the host"


def test_neighbour_discovery_reports_still_leave(lan):
    """A new address: the kernel joins its solicited-node group and reports it."""
    solicited = bytes.fromhex("ff0200000000000000000001ffab1234")
    proc = sniff(lan["peer"], [solicited])
    try:
        sh("ip", "-n", lan["host"], "addr", "add", "fd79::ab:1234/64", "dev", "ml0")
    finally:
        seen = sniffed(proc, wait=2.5)
    assert solicited.hex() in seen, "the solicited-node report of a new address was dropped"
    # and the address works: the peer reaches it (ND through the table)
    code = ("import socket; s = socket.create_connection(('fd79::ab:1234', 22), timeout=3)")
    done = subprocess.run(["ip", "netns", "exec", lan["peer"], sys.executable, "-c", code],
                          capture_output=True, text=True)
    assert "refused" in done.stderr.lower() or done.returncode == 0, done.stderr

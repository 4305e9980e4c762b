"""Throwaway network namespaces, veth links and nft calls for the kernel tests (test_nftables,
test_events, test_hostfw), and the small helper scripts run inside them. Everything set up here
is cleaned up even when a test fails: namespaces deleted, helper processes killed, users removed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from contextlib import contextmanager

import pytest

from corral.plan import nft_rules as nftables

# Test users must run a python they can read; pyenv shims under /root are not readable.
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"

need_root = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("nft", "ip", "useradd", "userdel", "setpriv")),
    reason="needs root, nft, ip, useradd and setpriv")


def sh(*cmd: str, check: bool = True, timeout: float = 15) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr}")
    return proc.stdout


@contextmanager
def netns(name: str):
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def nft_in(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", *args)


def link(a: str, dev_a: str, b: str, dev_b: str) -> None:
    """A veth pair: DEV_A in namespace A, DEV_B in namespace B, both up."""
    sh("ip", "-n", a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", b)
    sh("ip", "-n", a, "link", "set", dev_a, "up")
    sh("ip", "-n", b, "link", "set", dev_b, "up")


def addr(ns: str, dev: str, *cidrs: str) -> None:
    for cidr in cidrs:
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))


@contextmanager
def veth_pair(tag: str):
    """Yield (MAIN, PEER): netns corral-t-TAG (v0 10.77.0.1/24 fd77::1/64) linked to
    corral-t-TAG-p (v1 10.77.0.2/24 fd77::2/64)."""
    with netns(f"corral-t-{tag}") as ns, netns(f"corral-t-{tag}-p") as peer:
        link(ns, "v0", peer, "v1")
        addr(ns, "v0", "10.77.0.1/24", "fd77::1/64")
        addr(peer, "v1", "10.77.0.2/24", "fd77::2/64")
        yield ns, peer


@contextmanager
def system_users(*names: str, comment: str | None = None):
    """Real system users (no home, no login shell), removed again on the way out."""
    created = []
    try:
        for name in names:
            sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
               *(["--comment", comment] if comment else []), name)
            created.append(name)
        yield names
    finally:
        for name in created:
            sh("userdel", name, check=False)


def drop_counter(ns: str, service: str, process: str, reason: str) -> int:
    """Packets counted by the rule commented REASON in a service table's chain proc-PROCESS."""
    chain = json.loads(nft_in(ns, "-j", "list", "chain", "inet", nftables.table_name(service),
                              f"proc-{process}"))
    for item in chain["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == reason:
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no drop rule {reason} in proc-{process}")


# ---------------------------------------------------------------- helper scripts

def as_user(ns: str, user: str | None, script: str, *args: str, caps: str = "") -> list[str]:
    """argv running the python SCRIPT in NS, as root or as USER (with ambient CAPS if given)."""
    cmd = ["ip", "netns", "exec", ns]
    if user is not None:
        pw = pwd.getpwnam(user)
        cmd += ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid), "--clear-groups"]
        if caps:
            cmd += ["--inh-caps", caps, "--ambient-caps", caps]
    return cmd + [PY, "-c", script, *args]


def run(ns: str, user: str | None, script: str, *args: str, caps: str = "",
        timeout: float = 20) -> str:
    return sh(*as_user(ns, user, script, *args, caps=caps), timeout=timeout).strip()


def spawn(ns: str, user: str | None, script: str, *args: str) -> subprocess.Popen:
    """Start a long-running helper and wait for its "ready" line."""
    proc = subprocess.Popen(as_user(ns, user, script, *args), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise AssertionError(f"helper did not start: {line!r}")
    return proc


def stop(proc: subprocess.Popen) -> str:
    """Kill a helper if it still runs; its output."""
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=5)
    return out.strip()


def finish(proc: subprocess.Popen, timeout: float = 10) -> str:
    """Output of a helper that ends by itself (its own timeout bounds the wait)."""
    out, _ = proc.communicate(timeout=timeout)
    return out.strip()


# Root-owned TCP servers: answer "ok" on every ADDR:PORT given ([::]:PORT for IPv6 only).
TCP_SERVERS = r"""
import socket, sys, threading
def serve(s):
    while True:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in host: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, int(port))); s.listen(16)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def tcp_client(timeout: float = 1.0) -> str:
    """TCP client script, arguments HOST PORT [SOURCE]: prints "ok", or the exception's name
    (TimeoutError = silently dropped, PermissionError = refused by the local output chain)."""
    return rf"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout({timeout})
if len(sys.argv) > 3: s.bind((sys.argv[3], 0))
try:
    s.connect((host, port)); print("ok" if s.recv(8) == b"ok" else "bad answer")
except OSError as e:
    print(type(e).__name__)
"""


CLIENT = tcp_client()


def settle(ns: str, host: str, port: str) -> None:
    """Fresh veths need neighbour discovery before timeouts mean "blocked"."""
    for _ in range(10):
        if run(ns, None, CLIENT, host, port) == "ok":
            return
    raise AssertionError(f"{ns} cannot reach {host}:{port} before any table")

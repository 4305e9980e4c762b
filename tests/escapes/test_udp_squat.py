"""UDP port squatting across services (issue 16, finding 7): the sample service (the attacker)
binds the UDP port ANOTHER service declares, to take its datagrams (SO_REUSEADDR: the last
socket bound gets the unicast datagrams; SO_REUSEPORT) or, while that service is down, to keep
it from starting. Landlock has no UDP bind rules and nftables never sees a bind; the process's
cgroup carries a BPF bind program that lets it bind only its own declared UDP ports (and 0)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest

from conftest import write_manifest

from .attack import (
    CORRAL,
    EPILOGUE,
    MARK,
    PRELUDE,
    WATCH,
    blocked,
    in_netns,
    new_service_name,
    returned,
)

pytestmark = pytest.mark.root

VPORT = 7790

# The victim: a UDP echo on its declared port, bound with SO_REUSEADDR as the red team's
# rtudp was (so a second socket with SO_REUSEADDR, of any user, could share the port).
ECHO = rf'''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {VPORT}))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"victim:" + data, peer)
'''

# Held in the background while the victim is down: a plain bind, kept for HOLD seconds.
SQUAT = rf'''
held = []
@attempt("squat_while_down")
def _():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", {VPORT}))
    held.append(s)
    return s.getsockname()[1]
print({MARK!r} + json.dumps(_RESULTS), flush=True)
import time
time.sleep(float(PARAMS["hold"]))
'''

# While the victim is up: every way to share its port; then listen on whatever was bound.
STEAL = rf'''
import select, time
I4, I6, DG = socket.AF_INET, socket.AF_INET6, socket.SOCK_DGRAM
bound = []
def grab(family, addr, *options):
    s = socket.socket(family, DG)
    for option in options:
        s.setsockopt(socket.SOL_SOCKET, option, 1)
    s.bind((addr, {VPORT}))
    bound.append(s)
    return s.getsockname()[1]

@attempt("bind_reuseaddr")
def _():
    return grab(I4, "0.0.0.0", socket.SO_REUSEADDR)

@attempt("bind_reuseaddr_loopback")
def _():
    return grab(I4, "127.0.0.1", socket.SO_REUSEADDR)

@attempt("bind_reuseport")
def _():
    return grab(I4, "0.0.0.0", socket.SO_REUSEADDR, socket.SO_REUSEPORT)

@attempt("bind_reuseaddr_ipv6")
def _():
    return grab(I6, "::", socket.SO_REUSEADDR)

@attempt("bind_udplite")
def _():
    s = socket.socket(I4, DG, 136)  # IPPROTO_UDPLITE
    s.bind(("0.0.0.0", {VPORT}))
    bound.append(s)
    return s.getsockname()[1]

@attempt("bind_port_zero")  # a UDP client's own socket: still allowed
def _():
    s = socket.socket(I4, DG)
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1] > 0

print("BOUND", flush=True)
got = []
deadline = time.time() + float(PARAMS["listen"])
while bound and time.time() < deadline:
    ready, _, _ = select.select(bound, [], [], max(0.0, deadline - time.time()))
    for s in ready:
        got.append(s.recv(2048).decode(errors="replace"))

@attempt("received")
def _():
    return got
'''

SEND = rf'''
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
echoes = []
for i in range(3):
    s.sendto(b"secret-metric-%d" % i, ("127.0.0.1", {VPORT}))
    try:
        echoes.append(s.recv(2048).decode())
    except OSError as exc:
        echoes.append(repr(exc))
print(json.dumps(echoes))
'''


def _script(body: str, params: dict) -> list[str]:
    given = f"PARAMS = json.loads({json.dumps(params)!r})\n"
    return ["/usr/bin/python3.11", "-I", "-c", PRELUDE + given + body + EPILOGUE]


def _results(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        if line.startswith(MARK):
            out.update(json.loads(line[len(MARK):]))
    return out


@pytest.fixture(scope="module")
def victim_svc(escape_env):
    """A second service declaring udp/VPORT, installed but not started."""
    name = new_service_name()
    manifest = write_manifest(escape_env.tmp, name, f'''
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11"]
[process.app]
command = ["/usr/bin/python3.11", "-I", "-c", {json.dumps(ECHO)}]
listen = ["udp/{VPORT}"]
limits = {{ memory = "64M", pids = 16, open_files = 64, cpu = 0.5 }}
''' + WATCH)
    prefix = in_netns(escape_env.netns)

    def corral(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(prefix + CORRAL + list(args), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    try:
        done = corral("install", str(manifest))
        assert done.returncode == 0, done.stderr
        yield corral, name, manifest
    finally:
        corral("down", name)
        corral("uninstall", name, "--purge")
        subprocess.run(["userdel", f"corral-{name}-app"], capture_output=True)


@pytest.fixture(scope="module")
def outcome(svc, victim_svc, escape_env):
    corral, name, manifest = victim_svc
    exec_argv = svc.prefix() + CORRAL + ["exec", svc.name, "app", "--"]
    # 1. The victim is down: the attacker holds its port with a plain bind.
    squatter = subprocess.Popen(exec_argv + _script(SQUAT, {"hold": 25}), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([squatter.stdout], [], [], 30)
        squat = _results(squatter.stdout.readline() if ready else "")
        # 2. The victim starts while the squatter still runs.
        up = corral("up", str(manifest))
        # 3. With the victim up: every way of sharing its port, and what arrives meanwhile.
        thief = subprocess.Popen(exec_argv + _script(STEAL, {"listen": 4}), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL)
        try:
            lines = []
            deadline = time.time() + 30
            while time.time() < deadline:
                ready, _, _ = select.select([thief.stdout], [], [], 1)
                line = thief.stdout.readline() if ready else ""
                lines.append(line)
                if line.strip() == "BOUND":
                    break
            sent = subprocess.run(in_netns(escape_env.netns) + [sys.executable, "-c", SEND],
                                  capture_output=True, text=True, timeout=30)
            thief.wait(timeout=30)  # then read: lines already buffered by readline stay there
            out, err = thief.stdout.read(), thief.stderr.read()
        finally:
            thief.kill()
            thief.wait()
    finally:
        squatter.kill()
        squatter.wait()
    return {"squat": squat, "up": up, "steal": _results("".join(lines) + out), "steal_err": err,
            "echoes": json.loads(sent.stdout or "null"), "send_err": sent.stderr}


def test_squatting_the_port_while_its_service_is_down_is_refused(outcome):
    blocked(outcome["squat"], "squat_while_down", "EPERM")


def test_the_service_starts_although_another_service_tried_to_squat(outcome):
    up = outcome["up"]
    assert up.returncode == 0, f"up failed: {up.stdout} {up.stderr}"


@pytest.mark.parametrize("name", ["bind_reuseaddr", "bind_reuseaddr_loopback", "bind_reuseport",
                                  "bind_reuseaddr_ipv6", "bind_udplite"])
def test_sharing_its_port_is_refused(outcome, name):
    blocked(outcome["steal"], name, "EPERM")


def test_its_datagrams_reach_only_it(outcome):
    assert returned(outcome["steal"], "received") == [], outcome["steal_err"]
    assert outcome["echoes"] == [f"victim:secret-metric-{i}" for i in range(3)], \
        outcome["send_err"]


def test_udp_clients_still_bind_port_zero(outcome):
    assert returned(outcome["steal"], "bind_port_zero") is True


def test_refused_binds_are_listen_incidents(svc, outcome):
    """Every refused bind leaves a trace (issue 16: the supervisor running, an incident
    written): the bind program reports each refusal through its ring buffer, and the
    attacker's supervisor makes it a `listen` incident, its act time the kernel's stamp."""
    blocked(outcome["squat"], "squat_while_down", "EPERM")  # the act under test happened

    def found() -> list[dict]:
        run = svc.corral("incidents", svc.name, "--json", check=True)
        return [i for i in json.loads(run.stdout)["incidents"]
                if i["tripwire"] == "listen" and i["detail"].get("refused_by") == "bpf"
                and i["detail"].get("sport") == VPORT]

    deadline = time.time() + 10
    listen = found()
    while sum(i["count"] for i in listen) < 6 and time.time() < deadline:
        time.sleep(0.2)
        listen = found()
    assert listen, "no listen incident for the refused UDP binds"
    first = listen[0]
    assert first["process"] == "app"
    assert first["detail"]["proto"] in ("udp", "udplite")
    assert first["detail"]["src"] in ("0.0.0.0", "127.0.0.1", "::")
    assert first["pid"] and first["act_clock"] == "bpf"
    assert first["act_at"] <= first["detected_at"]
    # squat + five ways to share: six refusals, coalesced into the open incident(s)
    assert sum(i["count"] for i in listen) >= 6
    assert svc.status()["state"] == "running"

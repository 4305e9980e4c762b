"""Tests for `corral host` (hostfw, hostfw_rules, cli_host): golden rulesets, pure properties, and
the table on a real kernel in throwaway network namespaces (never the host's ruleset).

Router topology (all namespaces corral-h-XXXXXX-*):

    up  198.51.100.2  2001:db8:100::2 --- up0 [ rt ] lan0 --- 10.10.0.2 fd10::2  srv
                                          (.1/::1) vic0
                                              |
                                          203.0.113.2  vic

`rt` forwards (its kernel rp_filter is off, so only corral's rules drop anything) and gets the
router table from `corral host apply`; `srv` runs plain root servers standing in for the LAN's
service, whose manifest (app.toml) the router's host file lists. The server-role lab is a pair
`s` (the host under test) <-> `c` (admin at 192.0.2.2, anyone else at 192.0.2.3).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cli.host import host as host_cli
from corral.core.netspec import parse_endpoint, parse_ports
from corral.plan import host_rules as hostfw_rules
from corral.plan.host_rules import HostSpec, ServiceFlows, host_ruleset, management_first
from netlab import (
    CLIENT,
    TCP_SERVERS,
    addr,
    finish,
    link,
    netns,
    nft_in,
    run,
    settle,
    sh,
    spawn,
    stop,
)

GOLDEN = Path(__file__).parent / "golden"
PY = sys.executable
HOST_CLI = [PY, "-m", "corral.cli.host"]

APP = """name = "app"
[process.web]
command = ["/usr/bin/python3"]
listen = ["tcp/8080", "udp/7000"]
connect = ["tcp/9000@203.0.113.2", "udp/9053@203.0.113.2", "tcp/9000@2001:db8:113::2",
           "udp/53@127.0.0.53", "tcp/5432@10.0.0.5/32"]
[process.worker]
command = ["/usr/bin/python3"]
connect = ["tcp/443"]
"""

ROUTER = """role = "router"
management = ["tcp/22@198.51.100.0/24", "tcp/22@2001:db8:100::/64"]
allow_out = ["udp/53@192.0.2.53"]
anti_spoofing = true
[[lan]]
interface = "lan0"
prefixes = ["10.10.0.0/24", "fd10::/64"]
services = ["app.toml"]
"""

SERVER = """role = "server"
management = ["tcp/22@192.0.2.2/32", "tcp/22@fd77::2/128"]
allow_out = ["tcp/9000@192.0.2.2", "udp/123"]
anti_spoofing = true
"""

# The server's installed service: its listen is opened inbound, its connect outbound.
SVC = """name = "svc"
[process.app]
command = ["/usr/bin/python3"]
listen = ["tcp/8080"]
connect = ["tcp/9002@192.0.2.2", "udp/53@127.0.0.53"]
"""


def install_record(root: Path, name: str, manifest: Path) -> None:
    """What `corral install` leaves behind, as far as the host table is concerned."""
    state = root / "var/lib/corral" / name
    state.mkdir(parents=True)
    (state / "install.json").write_text(json.dumps({"service": name, "manifest": str(manifest)}))


@pytest.fixture
def files(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("CORRAL_ROOT", str(root))
    (tmp_path / "app.toml").write_text(APP)
    (tmp_path / "svc.toml").write_text(SVC)
    (tmp_path / "router.toml").write_text(ROUTER)
    (tmp_path / "server.toml").write_text(SERVER)
    return tmp_path


def plan_of(path: Path):
    from corral.host.firewall import plan_host

    return plan_host(str(path))


# ---------------------------------------------------------------- golden and pure tests

def golden_text(ruleset: dict) -> str:
    # One command per line, as tests/golden/nft_web.json: diffs show which set or rule changed.
    return '{"nftables": [\n' + ",\n".join(json.dumps(c) for c in ruleset["nftables"]) + "\n]}\n"


@pytest.mark.parametrize("kind", ["server", "router"])
def test_golden(files, kind):
    if kind == "server":
        install_record(Path(os.environ["CORRAL_ROOT"]), "svc", files / "svc.toml")
    ruleset = plan_of(files / f"{kind}.toml").ruleset
    golden = GOLDEN / f"host_{kind}.json"
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        golden.write_text(golden_text(ruleset))
    assert ruleset == json.loads(golden.read_text())
    assert golden_text(ruleset) == golden.read_text()  # byte for byte: deterministic


def test_interval_sets_only_for_prefixes_and_ranges(files):
    """A set is an interval set (pipapo for a concatenation: dearer per lookup) exactly when one
    of its elements is a prefix or a range; single addresses and ports go to hash sets."""
    def ranged(elem) -> bool:
        parts = elem["concat"] if isinstance(elem, dict) and "concat" in elem else [elem]
        return any(isinstance(part, dict) for part in parts)

    kinds = set()
    for cmd in plan_of(files / "router.toml").ruleset["nftables"]:
        obj = cmd.get("add", {}).get("set")
        if obj is not None:
            interval = "interval" in obj.get("flags", [])
            assert interval == any(ranged(e) for e in obj.get("elem", [])), obj["name"]
            kinds.add(interval)
    assert kinds == {True, False}  # the router's plan has both kinds


def test_only_our_table(files):
    cmds = plan_of(files / "router.toml").ruleset["nftables"]
    table = {"table": {"family": "inet", "name": "corral-host"}}
    assert cmds[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    assert all(next(iter(c["add"].values()))["table"] == "corral-host" for c in cmds[3:])


def test_router_sets(files):
    plan = plan_of(files / "router.toml")
    sets = {c["add"]["set"]["name"]: c["add"]["set"].get("elem", [])
            for c in plan.ruleset["nftables"] if "set" in c.get("add", {})}
    assert sets["lan0-in4"] == [
        {"concat": [{"prefix": {"addr": "10.10.0.0", "len": 24}}, "tcp", 8080]},
        {"concat": [{"prefix": {"addr": "10.10.0.0", "len": 24}}, "udp", 7000]},
    ]
    # Loopback destinations never cross the router; "tcp/443" (any address) goes to both families.
    out4 = json.dumps(sets["lan0-out4"])
    assert "127.0.0.53" not in out4 and '"0.0.0.0", "len": 0}}, "tcp", 443' in out4
    assert '"::", "len": 0}}, "tcp", 443' in json.dumps(sets["lan0-out6"])
    # A declared upstream destination (10.0.0.5) is carved out of the bogons; loopback is not.
    assert {"range": ["10.0.0.0", "10.0.0.4"]} in sets["bogons4"]
    assert {"range": ["10.0.0.6", "10.255.255.255"]} in sets["bogons4"]
    assert {"prefix": {"addr": "127.0.0.0", "len": 8}} in sets["bogons4"]
    # Documentation ranges stand in for public addresses (see BOGONS4): never bogons.
    assert not any("198.51.100" in json.dumps(e) or "203.0.113" in json.dumps(e)
                   for e in sets["bogons4"])


def test_server_has_no_forwarding(files):
    install_record(Path(os.environ["CORRAL_ROOT"]), "svc", files / "svc.toml")
    rules = [c["add"]["rule"] for c in plan_of(files / "server.toml").ruleset["nftables"]
             if "rule" in c.get("add", {})]
    forward = [r for r in rules if r["chain"] == "forward"]
    # log, then drop: nothing else
    assert [r.get("comment") for r in forward] == [None, "undeclared"]


_ENDPOINTS = st.builds(
    lambda proto, port, width, net: f"{proto}/{port}-{port + width}" + (f"@{net}" if net else ""),
    st.sampled_from(["tcp", "udp"]), st.integers(1, 60000), st.integers(0, 3),
    st.sampled_from([None, "10.0.0.0/8", "10.1.0.0/16", "203.0.113.7", "2001:db8::/32", "fd00::1"]))


@settings(max_examples=100, deadline=None)
@given(mgmt=st.lists(_ENDPOINTS, max_size=5), out=st.lists(_ENDPOINTS, max_size=5),
       router=st.booleans(), anti=st.booleans())
def test_management_always_first(mgmt, out, router, anti):
    """Whatever the host file says, the generated ruleset accepts exactly the management entries
    first in input and before any drop in prerouting."""
    svc = ServiceFlows("s", "/s.toml", (parse_ports("tcp/8080"),),
                       tuple(parse_endpoint(e) for e in out))
    lans = (hostfw_rules.LanSpec("eth1", ("10.20.0.0/24",), (svc,)),) if router else ()
    spec = HostSpec("router" if router else "server", tuple(parse_endpoint(e) for e in mgmt),
                    tuple(parse_endpoint(e) for e in out), anti, (svc,), lans)
    assert management_first(host_ruleset(spec), spec)
    # The check notices a ruleset that does not.
    broken = host_ruleset(spec)
    rules = broken["nftables"]
    first_input = next(i for i, c in enumerate(rules)
                       if c.get("add", {}).get("rule", {}).get("chain") == "input")
    rules.insert(first_input, {"add": {"rule": {"family": "inet", "table": "corral-host",
                                                "chain": "input", "expr": [{"drop": None}]}}})
    assert not management_first(broken, spec)


def run_cli(*args: str) -> object:
    return CliRunner().invoke(host_cli, list(args), catch_exceptions=False)


def test_cli_plan_text_and_json(files):
    result = run_cli("plan", str(files / "router.toml"))
    assert result.exit_code == 0, result.output
    assert "lan lan0" in result.output and "tcp/8080" in result.output
    result = run_cli("plan", str(files / "router.toml"), "--json")
    doc = json.loads(result.output)
    assert doc["role"] == "router" and doc["lan"][0]["services"][0]["name"] == "app"
    assert doc["ruleset"] == plan_of(files / "router.toml").ruleset


def test_cli_bad_host_file_exit_2(files):
    bad = files / "bad.toml"
    bad.write_text('role = "server"\nmanagement = ["tcp/99999@203.0.113.0/24"]\n')
    for command in (["plan"], ["apply", "--confirm-timeout", "5"]):
        result = subprocess.run(HOST_CLI + command + [str(bad)], capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.strip() == (f'{bad}: management[0]: "tcp/99999@203.0.113.0/24": '
                                         "port out of range (1-65535)")
    result = subprocess.run(HOST_CLI + ["apply", "--confirm-timeout", "0",
                                        str(files / "server.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "confirm-timeout" in result.stderr


def test_installed_service_named_host_refused(files):
    install_record(Path(os.environ["CORRAL_ROOT"]), "host", files / "svc.toml")
    result = subprocess.run(HOST_CLI + ["plan", str(files / "server.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'named "host"' in result.stderr


def test_invalid_installed_manifest_named(files):
    install_record(Path(os.environ["CORRAL_ROOT"]), "svc", files / "svc.toml")
    (files / "svc.toml").write_text(SVC.replace('"tcp/8080"', '"tcp/0"'))
    result = subprocess.run(HOST_CLI + ["plan", str(files / "server.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{files / 'svc.toml'}: manifest of installed service svc" in result.stderr
    assert f"{files / 'svc.toml'}: process.app.listen[0]" in result.stderr


def test_cli_imports_only_click():
    code = ("import sys; import corral.cli.host; "
            "print(sorted(m for m in sys.modules if m.startswith(('corral.', 'pydantic'))))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    # The shared error contract (cli_common, errors, and core.record for errors' Problem) is
    # plain Python: no pydantic, no netlink.
    assert out.strip() == ("['corral.cli', 'corral.cli.base', 'corral.cli.common', "
                           "'corral.cli.host', 'corral.core', 'corral.core.errors', "
                           "'corral.core.record']")


# ---------------------------------------------------------------- kernel helpers

# nft and ip: make test installs them
need_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def table_text(ns: str, table: str = "corral-host") -> str | None:
    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", table],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def counter(ns: str, chain: str, reason: str) -> int:
    """Packets dropped in CHAIN by the rules commented REASON (v4 and v6 rules summed)."""
    items = json.loads(nft_in(ns, "-j", "list", "chain", "inet", "corral-host", chain))["nftables"]
    return sum(e["counter"]["packets"]
               for item in items if item.get("rule", {}).get("comment") == reason
               for e in item["rule"]["expr"] if "counter" in e)


def host_cmd(ns: str, root: Path, *args: str, wait: bool = True, extra_env: dict | None = None):
    env = dict(os.environ, CORRAL_ROOT=str(root), **(extra_env or {}))
    env.pop("CORRAL_DEBUG", None)
    argv = ["ip", "netns", "exec", ns] + HOST_CLI + list(args)
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def applied(ns: str, root: Path, host_file: Path, timeout: float = 60, confirm: bool = True) -> str:
    result = host_cmd(ns, root, "apply", str(host_file), "--confirm-timeout", str(timeout))
    assert result.returncode == 0, result.stderr
    if confirm:
        result = host_cmd(ns, root, "confirm", str(host_file))
        assert result.returncode == 0, result.stderr
    return table_text(ns)


def state(root: Path, name: str) -> dict | None:
    path = root / "var/lib/corral/host" / name
    return json.loads(path.read_text()) if path.exists() else None


def wait_rolled_back(root: Path, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record = state(root, "rolled_back.json")
        if record and state(root, "pending.json") is None:
            return record
        time.sleep(0.1)
    raise AssertionError(f"no rollback within {seconds} s; guard log: "
                         f"{(root / 'var/lib/corral/host/guard.log').read_text()}")


def kill_guards(*roots: Path) -> None:
    """Teardown: no guard of ours may outlive the test."""
    for root in roots:
        pending = state(root, "pending.json")
        if pending:
            try:
                cmdline = Path(f"/proc/{pending['guard_pid']}/cmdline").read_bytes()
            except OSError:
                continue
            if pending["token"].encode() in cmdline:
                os.kill(pending["guard_pid"], signal.SIGKILL)


def alive(pid: int, settle: float = 2.0) -> bool:
    """Is PID running? A process expected to end gets SETTLE seconds to do so (a guard logs its
    outcome after releasing the lock; a killed one takes a moment to go)."""
    deadline = time.monotonic() + settle
    while True:
        try:
            running = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (OSError, IndexError):
            running = False
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


# UDP receiver: for WINDOW seconds, the source addresses of the datagrams that arrive.
UDP_SOURCES = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2]); seen = set()
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try: seen.add(s.recvfrom(64)[1][0])
    except TimeoutError: break
print(" ".join(sorted(seen)))
"""

# UDP sender from arbitrary sources: IP_TRANSPARENT (root has CAP_NET_ADMIN) binds to any address.
UDP_FROM = r"""
import socket, sys
dst, port = sys.argv[1], int(sys.argv[2])
for src in sys.argv[3:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    s.bind((src, 0))
    try: s.sendto(b"x", (dst, port))
    except PermissionError: pass  # dropped by this host's own output chain
    s.close()
print("sent")
"""


# ICMPv6 echo (no ping binary needed): "reply" or "timeout". The kernel fills in the checksum.
PING6 = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); s.settimeout(2)
s.sendto(bytes([128, 0, 0, 0, 0x12, 0x34, 0, 1]) + b"corral", (sys.argv[1], 0))
try:
    while s.recv(128)[0] != 129: pass
    print("reply")
except TimeoutError:
    print("timeout")
"""


OTHER_TABLE = ("add table inet othertable; "
               "add chain inet othertable out "
               "{ type filter hook output priority 10; policy accept; }; "
               "add rule inet othertable out tcp dport 4444 counter accept comment \"theirs\"")
BLOCKED = "TimeoutError"


def lab_dir(tmp_path_factory, name: str, files: dict[str, str]) -> tuple[Path, Path]:
    """For a module-wide lab (root only): a fresh directory holding FILES, and an empty
    CORRAL_ROOT in it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp = tmp_path_factory.mktemp(name)
    for file, text in files.items():
        (tmp / file).write_text(text)
    root = tmp / "root"
    root.mkdir()
    return tmp, root


def namespaces(stack: ExitStack, *names: str) -> list[str]:
    """Namespaces corral-h-TAG-NAME (one fresh TAG), deleted when STACK closes."""
    tag = secrets.token_hex(3)
    return [stack.enter_context(netns(f"corral-h-{tag}-{n}")) for n in names]


def serve(stack: ExitStack, ns: str, *specs: str) -> None:
    """Root TCP servers in NS answering "ok" on every ADDR:PORT of SPECS, stopped when STACK
    closes."""
    stack.callback(stop, spawn(ns, None, TCP_SERVERS, *specs))


# ---------------------------------------------------------------- the router lab

@dataclass
class RouterLab:
    up: str
    rt: str
    srv: str
    vic: str
    root: Path
    host_file: Path
    other: str


@pytest.fixture(scope="module")
def router_lab(tmp_path_factory):
    tmp, root = lab_dir(tmp_path_factory, "router", {"app.toml": APP, "router.toml": ROUTER})
    with ExitStack() as stack:
        up, rt, srv, vic = namespaces(stack, "up", "rt", "srv", "vic")
        link(up, "u1", rt, "up0")
        link(rt, "lan0", srv, "eth0")
        link(rt, "vic0", vic, "v1")
        addr(up, "u1", "198.51.100.2/24", "2001:db8:100::2/64")
        addr(rt, "up0", "198.51.100.1/24", "2001:db8:100::1/64")
        addr(rt, "lan0", "10.10.0.1/24", "fd10::1/64")
        addr(rt, "vic0", "203.0.113.1/24", "2001:db8:113::1/64")
        addr(srv, "eth0", "10.10.0.2/24", "fd10::2/64")
        addr(vic, "v1", "203.0.113.2/24", "2001:db8:113::2/64")
        for ns, gw4, gw6 in ((up, "198.51.100.1", "2001:db8:100::1"), (srv, "10.10.0.1", "fd10::1"),
                             (vic, "203.0.113.1", "2001:db8:113::1")):
            sh("ip", "-n", ns, "route", "add", "default", "via", gw4)
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", gw6)
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                    "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
            sh("ip", "netns", "exec", rt, "sysctl", "-qw", key)
        serve(stack, srv, "0.0.0.0:8080", "0.0.0.0:8081", "0.0.0.0:22", "[::]:8080", "[::]:8081")
        serve(stack, rt, "0.0.0.0:22", "0.0.0.0:23")
        serve(stack, vic, "0.0.0.0:9000", "0.0.0.0:9001", "[::]:9000")
        stack.callback(kill_guards, root)
        settle(up, "10.10.0.2", "8080")
        settle(up, "fd10::2", "8080")
        settle(srv, "203.0.113.2", "9001")
        settle(srv, "2001:db8:113::2", "9000")
        # Before: the router forwards everything (the undeclared port is open).
        assert run(up, None, CLIENT, "10.10.0.2", "8081") == "ok"
        nft_in(rt, OTHER_TABLE)
        other = table_text(rt, "othertable")
        applied(rt, root, tmp / "router.toml")
        yield RouterLab(up, rt, srv, vic, root, tmp / "router.toml", other)


@need_root
def test_router_declared_inbound_passes(router_lab):
    lab = router_lab
    assert run(lab.up, None, CLIENT, "10.10.0.2", "8080") == "ok"
    assert run(lab.up, None, CLIENT, "fd10::2", "8080") == "ok"  # IPv6 through ND and forwarding


@need_root
def test_router_undeclared_inbound_blocked(router_lab):
    lab = router_lab
    before = counter(lab.rt, "forward", "undeclared")
    assert run(lab.up, None, CLIENT, "10.10.0.2", "8081") == BLOCKED
    assert run(lab.up, None, CLIENT, "fd10::2", "8081") == BLOCKED
    assert run(lab.vic, None, CLIENT, "10.10.0.2", "8081") == BLOCKED
    assert counter(lab.rt, "forward", "undeclared") >= before + 2


@need_root
def test_router_lan_egress_only_declared(router_lab):
    lab = router_lab
    assert run(lab.srv, None, CLIENT, "203.0.113.2", "9000") == "ok"      # declared connect
    assert run(lab.srv, None, CLIENT, "2001:db8:113::2", "9000") == "ok"
    assert run(lab.srv, None, CLIENT, "203.0.113.2", "9001") == BLOCKED   # the victim's other port
    assert run(lab.srv, None, CLIENT, "198.51.100.2", "9000") == BLOCKED  # another host, same port


@need_root
def test_router_management_kept(router_lab):
    lab = router_lab
    assert run(lab.up, None, CLIENT, "198.51.100.1", "22") == "ok"          # the router itself
    assert run(lab.up, None, CLIENT, "10.10.0.1", "22") == "ok"             # its LAN address too
    assert run(lab.up, None, CLIENT, "10.10.0.2", "22") == "ok"             # forwarded into the LAN
    assert run(lab.up, None, CLIENT, "198.51.100.1", "23") == BLOCKED       # not management
    # not from the admins' network:
    assert run(lab.vic, None, CLIENT, "203.0.113.1", "22") == BLOCKED
    assert run(lab.vic, None, CLIENT, "10.10.0.2", "22") == BLOCKED


@need_root
def test_router_drops_forged_sources(router_lab):
    """Each forged source is sent to a declared flow (the LAN's udp/7000, the server's declared
    udp/9053 at the victim), next to a genuine datagram: only the genuine ones arrive, and the
    counter of the rule that must have dropped each forgery moved."""
    lab = router_lab
    before = {r: counter(lab.rt, "prerouting", r) for r in ("bcp38", "lan-prefix", "bogon")}
    at_srv = spawn(lab.srv, None, UDP_SOURCES, "7000", "2")
    at_vic = spawn(lab.vic, None, UDP_SOURCES, "9053", "2")
    # From upstream: genuine, an RFC 1918 bogon, a source claiming the LAN's prefix.
    assert run(lab.up, None, UDP_FROM, "10.10.0.2", "7000", "198.51.100.2", "10.66.0.1",
               "10.10.0.77") == "sent"
    # From the LAN server: genuine, and a source outside the LAN's prefix (BCP 38).
    assert run(lab.srv, None, UDP_FROM, "203.0.113.2", "9053", "10.10.0.2", "10.99.0.2") == "sent"
    assert finish(at_srv) == "198.51.100.2"
    assert finish(at_vic) == "10.10.0.2"
    after = {r: counter(lab.rt, "prerouting", r) for r in before}
    assert after == {r: n + 1 for r, n in before.items()}


@need_root
def test_router_other_table_untouched(router_lab):
    assert table_text(router_lab.rt, "othertable") == router_lab.other


# ---------------------------------------------------------------- the server lab

@dataclass
class ServerLab:
    s: str
    c: str
    root: Path
    host_file: Path


@pytest.fixture(scope="module")
def server_lab(tmp_path_factory):
    tmp, root = lab_dir(tmp_path_factory, "server", {"svc.toml": SVC, "server.toml": SERVER})
    install_record(root, "svc", tmp / "svc.toml")
    with ExitStack() as stack:
        s, c = namespaces(stack, "s", "c")
        link(s, "eth0", c, "eth0")
        addr(s, "eth0", "192.0.2.1/24", "fd77::1/64")
        addr(c, "eth0", "192.0.2.2/24", "192.0.2.3/24", "fd77::2/64", "fd77::3/64")
        serve(stack, s, "0.0.0.0:22", "0.0.0.0:8080", "0.0.0.0:8081", "[::]:22")
        serve(stack, c, "0.0.0.0:9000", "0.0.0.0:9001", "0.0.0.0:9002")
        stack.callback(kill_guards, root)
        settle(c, "192.0.2.1", "8081")
        settle(c, "fd77::1", "22")
        settle(s, "192.0.2.2", "9001")
        applied(s, root, tmp / "server.toml")
        yield ServerLab(s, c, root, tmp / "server.toml")


@need_root
def test_server_input_default_deny(server_lab):
    lab = server_lab
    before = counter(lab.s, "input", "undeclared")
    # management:
    assert run(lab.c, None, CLIENT, "192.0.2.1", "22", "192.0.2.2") == "ok"
    # the service's listen:
    assert run(lab.c, None, CLIENT, "192.0.2.1", "8080", "192.0.2.3") == "ok"
    # undeclared, even for the admin:
    assert run(lab.c, None, CLIENT, "192.0.2.1", "8081", "192.0.2.2") == BLOCKED
    # management only from admins:
    assert run(lab.c, None, CLIENT, "192.0.2.1", "22", "192.0.2.3") == BLOCKED
    assert counter(lab.s, "input", "undeclared") >= before + 2


@need_root
def test_server_ipv6_keeps_working(server_lab):
    """Neighbour discovery passes the default-deny chains: flush the neighbour cache, then reach
    the host over IPv6 (management from the admin's v6 address, denied from another)."""
    lab = server_lab
    sh("ip", "-n", lab.s, "neigh", "flush", "all")
    sh("ip", "-n", lab.c, "neigh", "flush", "all")
    assert run(lab.c, None, CLIENT, "fd77::1", "22", "fd77::2") == "ok"
    assert run(lab.c, None, CLIENT, "fd77::1", "22", "fd77::3") == BLOCKED
    assert run(lab.c, None, PING6, "fd77::1") == "reply"  # echo-request accepted


@need_root
def test_server_output_default_deny(server_lab):
    lab = server_lab
    before = counter(lab.s, "output", "undeclared")
    assert run(lab.s, None, CLIENT, "192.0.2.2", "9000") == "ok"  # allow_out
    assert run(lab.s, None, CLIENT, "192.0.2.2", "9002") == "ok"  # the service's connect
    assert run(lab.s, None, CLIENT, "192.0.2.2", "9001") in ("PermissionError", BLOCKED)
    assert counter(lab.s, "output", "undeclared") > before


@need_root
def test_server_egress_own_address_only(server_lab):
    lab = server_lab
    before = counter(lab.s, "output", "spoof")
    # udp/123 is allowed out to any address: only the own-address check can stop these.
    receiver = spawn(lab.c, None, UDP_SOURCES, "123", "1.5")
    assert run(lab.s, None, UDP_FROM, "192.0.2.2", "123", "192.0.2.1", "192.0.2.99") == "sent"
    assert finish(receiver) == "192.0.2.1"
    assert counter(lab.s, "output", "spoof") == before + 1


# ---------------------------------------------------------------- apply / confirm / rollback

@dataclass
class Box:
    ns: str
    root: Path
    a: Path   # a host file
    b: Path   # a different one
    c: Path   # and a third
    other: str


@pytest.fixture
def box(tmp_path):
    """A lone namespace with somebody else's table in it, and three different host files."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path / "root"
    root.mkdir()
    files = []
    for name, port in (("a", 22), ("b", 2222), ("c", 2200)):
        path = tmp_path / f"{name}.toml"
        path.write_text(f'role = "server"\nmanagement = ["tcp/{port}@203.0.113.0/24"]\n')
        files.append(path)
    with netns(f"corral-h-{secrets.token_hex(3)}") as ns:
        nft_in(ns, OTHER_TABLE)
        try:
            yield Box(ns, root, *files, other=table_text(ns, "othertable"))
        finally:
            kill_guards(root)


def apply_killed(box: Box, file: Path, timeout: float, step: str = "applied") -> dict:
    """Apply, and SIGKILL corral at STEP (while it still holds everything in hand)."""
    proc = host_cmd(box.ns, box.root, "apply", str(file), "--confirm-timeout", str(timeout),
                    wait=False, extra_env={"CORRAL_TEST_HOSTFW_PAUSE": step})
    assert proc.stderr.readline().strip() == f"paused after {step}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    pending = state(box.root, "pending.json")
    assert alive(pending["guard_pid"], settle=0)
    return pending


@need_root
def test_rollback_to_absent_after_sigkill(box):
    assert table_text(box.ns) is None
    pending = apply_killed(box, box.a, 2)
    assert table_text(box.ns) is not None                                     # applied
    record = wait_rolled_back(box.root, 10)
    assert record["restored"] == "absent" and record["identical"]
    assert table_text(box.ns) is None
    assert not alive(pending["guard_pid"])
    assert table_text(box.ns, "othertable") == box.other
    # Confirming after the fact says it is too late (exit 1).
    result = host_cmd(box.ns, box.root, "confirm", str(box.a))
    assert result.returncode == 1 and "rolled back" in result.stderr


@need_root
def test_rollback_restores_previous_table_byte_identical(box):
    first = applied(box.ns, box.root, box.a)
    # Killed before the new table even went in: the guard must still be armed and harmless.
    apply_killed(box, box.b, 1.5, step="pending")
    wait_rolled_back(box.root, 10)
    assert table_text(box.ns) == first
    # Killed after: the new table is in, then the old one comes back exactly.
    result = host_cmd(box.ns, box.root, "apply", str(box.b), "--confirm-timeout", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["previous"] == "table" and not report["chained"]
    assert table_text(box.ns) != first
    record = wait_rolled_back(box.root, 10)
    assert record["restored"] == "table" and record["identical"]
    assert table_text(box.ns) == first
    assert table_text(box.ns, "othertable") == box.other


@need_root
def test_confirm_prevents_rollback(box):
    applied(box.ns, box.root, box.a)
    result = host_cmd(box.ns, box.root, "apply", str(box.b), "--confirm-timeout", "2")
    assert result.returncode == 0 and "confirm" in result.stdout
    pid = state(box.root, "pending.json")["guard_pid"]
    second = table_text(box.ns)
    result = host_cmd(box.ns, box.root, "confirm", str(box.b))
    assert result.returncode == 0 and "confirmed" in result.stdout
    time.sleep(3)
    assert table_text(box.ns) == second
    assert not alive(pid) and state(box.root, "pending.json") is None
    assert state(box.root, "rolled_back.json") is None
    assert table_text(box.ns, "othertable") == box.other
    # Nothing pending any more; and confirming another file than the pending one is refused.
    assert host_cmd(box.ns, box.root, "confirm", str(box.b)).returncode == 1
    host_cmd(box.ns, box.root, "apply", str(box.c), "--confirm-timeout", "30")
    result = host_cmd(box.ns, box.root, "confirm", str(box.a))
    assert result.returncode == 2 and "pending apply is of" in result.stderr


@need_root
def test_rollback_command_and_chained_apply(box):
    first = applied(box.ns, box.root, box.a)
    # rollback now, while the apply is pending.
    host_cmd(box.ns, box.root, "apply", str(box.b), "--confirm-timeout", "30")
    pid = state(box.root, "pending.json")["guard_pid"]
    result = host_cmd(box.ns, box.root, "rollback", str(box.b))
    assert result.returncode == 0, result.stderr
    assert table_text(box.ns) == first and not alive(pid)
    # nothing saved any more:
    assert host_cmd(box.ns, box.root, "rollback", str(box.b)).returncode == 1
    # Chained: b pending, then c applied on top; the rollback goes to a (the confirmed state).
    host_cmd(box.ns, box.root, "apply", str(box.b), "--confirm-timeout", "30")
    pid_b = state(box.root, "pending.json")["guard_pid"]
    result = host_cmd(box.ns, box.root, "apply", str(box.c), "--confirm-timeout", "2", "--json")
    assert json.loads(result.stdout)["chained"]
    assert not alive(pid_b)
    assert "2200" in table_text(box.ns)
    wait_rolled_back(box.root, 10)
    assert table_text(box.ns) == first
    assert table_text(box.ns, "othertable") == box.other

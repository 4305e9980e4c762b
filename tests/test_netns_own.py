"""network = "own" (issue 16, "the walls to add"): the service in a network namespace of its own,
joined to the host by a veth, its declared ports DNAT'ed from the host's addresses and its
connects masqueraded.

The "host" is a throwaway namespace (HOST: 10.77.0.1 on a veth to WORLD, 10.77.0.2, another
throwaway namespace standing for the rest of the network); forwarding is switched on in HOST
only. Root listeners run in HOST on loopback and on an abstract UNIX socket: what a service in
the host's namespace could reach or squat. One service for the module, its attempts batched
into `corral exec` runs; everything is removed at the end, also on failure."""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    CORRAL,
    corral,
    in_netns,
    installed_and_up,
    notes_manifest,
    remove_test_users,
    throwaway_root,
)

pytestmark = pytest.mark.root

LOOPBACK_PORT, WORLD_PORT, UNDECLARED_PORT, UDP_PORT = 7741, 7742, 7743, 7744
HOST_ADDR, WORLD_ADDR = "10.77.0.1", "10.77.0.2"

# A root listener: prints READY, then one JSON line per contact.
LISTENER = r'''
import json, select, socket, sys
addr, port, abstract = sys.argv[1], int(sys.argv[2]), sys.argv[3]
socks = []
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(8); socks.append(s)
if abstract:
    u = socket.socket(socket.AF_UNIX); u.bind(b"\0" + abstract.encode()); u.listen(8)
    socks.append(u)
print("READY", flush=True)
while True:
    for r in select.select(socks, [], [])[0]:
        conn, peer = r.accept()
        print(json.dumps({"on": str(r.getsockname()), "peer": str(peer)}), flush=True)
        conn.sendall(b"host\n"); conn.close()
'''


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {result.stderr}")
    return result


def listener(ns: str, addr: str, port: int, abstract: str = "") -> subprocess.Popen:
    proc = subprocess.Popen(in_netns(ns) + [sys.executable, "-c", LISTENER, addr, str(port),
                                            abstract], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def contacts(proc: subprocess.Popen) -> list[dict]:
    """What the listener logged so far (it is killed afterwards)."""
    assert proc.stdout is not None
    lines = []
    while select.select([proc.stdout], [], [], 0.5)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(json.loads(line))
    return lines


class Own:
    def __init__(self, name: str, host: str, world: str, root: Path, manifest: Path):
        self.name, self.host, self.world, self.root = name, host, world, root
        self.manifest = manifest

    def corral(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return corral(*args, netns=self.host, check=check)

    def inside(self, code: str) -> dict:
        """Run python in the service (as its app user, contained); its last line is JSON."""
        result = subprocess.run(in_netns(self.host) + CORRAL + [
            "exec", self.name, "app", "--", "/usr/bin/python3.11", "-I", "-c", code],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def incidents(self) -> list[dict]:
        return json.loads(self.corral("incidents", self.name, "--json", check=True).stdout)[
            "incidents"]


def http_get(ns: str, url: str) -> str:
    code = ("import sys, urllib.request as u; "
            "sys.stdout.write(u.urlopen(sys.argv[1], timeout=10).read().decode())")
    return sh(*in_netns(ns), sys.executable, "-c", code, url).stdout


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with throwaway_root(tmp_path_factory, "netns-own") as (tmp, root):
        yield from _own_service(tmp, root)


def _own_service(tmp: Path, root: Path) -> Iterator[Own]:
    """The test's host and world namespaces joined by a veth, and the sample with
    network = "own" in the host one; all removed afterwards."""
    tag = secrets.token_hex(4)
    host, world = f"corral-t-{tag}", f"corral-t-{tag}-w"
    name = "tst" + secrets.token_hex(3)
    made: list[str] = []
    try:
        for ns in (host, world):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", host, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
           "netns", world)
        sh("ip", "-n", host, "addr", "add", f"{HOST_ADDR}/24", "dev", "v0")
        sh("ip", "-n", world, "addr", "add", f"{WORLD_ADDR}/24", "dev", "v1")
        sh("ip", "-n", host, "link", "set", "v0", "up")
        sh("ip", "-n", world, "link", "set", "v1", "up")
        # per namespace: this changes the test's HOST only, never the machine's own
        sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        manifest = notes_manifest(tmp, name)
        text = manifest.read_text().replace(  # the sample's resolver, and a peer out there
            'connect = ["udp/53@127.0.0.53"]',
            f'connect = ["udp/53@127.0.0.53", "tcp/{WORLD_PORT}@{WORLD_ADDR}"]')
        manifest.write_text(text.replace("[image]", 'network = "own"\n\n[watch]\nreact = "log"'
                                         "\n\n[image]", 1))
        svc = Own(name, host, world, root, manifest)
        try:
            with installed_and_up(svc):
                yield svc
        finally:
            remove_test_users(name)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_namespace_and_its_link(own):
    pin = own.root / "run/corral" / own.name / "netns"
    assert os.path.ismount(pin)
    seen = own.inside("import json, os; print(json.dumps({"
                      "'net': os.readlink('/proc/self/ns/net'),"
                      "'links': sorted(l.split(':')[0].strip() for l in "
                      "open('/proc/net/dev').read().splitlines()[2:])}))")
    assert seen["net"] == f"net:[{os.stat(pin).st_ino}]"  # corral exec joined the pinned one
    assert seen["net"] != f"net:[{os.stat(f'/run/netns/{own.host}').st_ino}]"
    assert seen["links"] == ["eth0", "lo"]
    links = json.loads(sh("ip", "-n", own.host, "-j", "link", "show").stdout)
    veths = [link["ifname"] for link in links if link["ifname"].startswith("crn")]
    assert len(veths) == 1 and len(veths[0]) <= 15
    status = json.loads(own.corral("status", own.name, "--json", check=True).stdout)
    state = status["services"][0]
    assert state["network"]["mode"] == "own" and state["network"]["host_if"] == veths[0]
    assert not [w for w in state["warnings"] if "ip_forward" in w]  # HOST forwards
    text = own.corral("status", own.name, check=True).stdout
    assert f"{state['network']['addr']} behind veth {veths[0]}" in text


def test_cannot_see_host_sockets(own):
    probe = listener(own.host, "127.0.0.1", LOOPBACK_PORT)
    try:
        # the listener is in the host's /proc/net/tcp ...
        host_tcp = sh(*in_netns(own.host), "cat", "/proc/net/tcp").stdout
        assert f":{LOOPBACK_PORT:04X} " in host_tcp
        seen = own.inside(f"""
import json, socket
tcp = open('/proc/net/tcp').read()
s = socket.socket(); s.settimeout(5)
try:
    s.connect(('127.0.0.1', {LOOPBACK_PORT})); got = 'connected'
except OSError as exc:
    got = type(exc).__name__ + ':' + str(exc.errno)
print(json.dumps({{'listed': ':{LOOPBACK_PORT:04X} ' in tcp, 'connect': got}}))
""")
        assert not seen["listed"], "the host's loopback listener is visible in /proc/net/tcp"
        assert seen["connect"] != "connected"
        time.sleep(0.5)
        assert contacts(probe) == [], "a contained process reached a host loopback service"
    finally:
        probe.kill()
        probe.wait()


def test_cannot_squat_a_host_abstract_socket(own):
    """A name the host's root clients use: the service binding it binds its own namespace's
    name, so the host's clients never reach the service; nor does the service reach the
    host's listener on it."""
    name = "corral-own-" + secrets.token_hex(4)
    squat = subprocess.Popen(in_netns(own.host) + CORRAL + [
        "exec", own.name, "app", "--", "/usr/bin/python3.11", "-I", "-c", f"""
import socket, time
u = socket.socket(socket.AF_UNIX); u.bind(b'\\0{name}'); u.listen(1)
print('READY', flush=True)
u.settimeout(8)
try:
    u.accept(); print('ACCEPTED', flush=True)
except OSError:
    print('NOBODY', flush=True)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert squat.stdout is not None and squat.stdout.readline().strip() == "READY"
        client = sh(*in_netns(own.host), sys.executable, "-c",
                    "import socket, sys; u = socket.socket(socket.AF_UNIX); "
                    "u.connect(b'\\0' + sys.argv[1].encode())", name, check=False)
        assert client.returncode != 0 and "ConnectionRefused" in client.stderr, client.stderr
        assert squat.stdout.readline().strip() == "NOBODY"
    finally:
        squat.kill()
        squat.wait()
    host = listener(own.host, "127.0.0.1", LOOPBACK_PORT + 10, abstract=name)
    try:
        seen = own.inside(f"""
import json, socket
u = socket.socket(socket.AF_UNIX)
try:
    u.connect(b'\\0{name}'); got = 'connected'
except OSError as exc:
    got = type(exc).__name__
print(json.dumps({{'connect': got}}))
""")
        assert seen["connect"] == "ConnectionRefusedError"
        assert contacts(host) == []
    finally:
        host.kill()
        host.wait()


def test_listen_port_serves_host_and_world_clients(own):
    assert http_get(own.host, f"http://{HOST_ADDR}:8080/health") == "ok\n"
    assert http_get(own.world, f"http://{HOST_ADDR}:8080/health") == "ok\n"


def wait_incident(own: Own, dport: int) -> set:
    deadline = time.time() + 15
    while True:
        found = {(i["tripwire"], i["detail"].get("dport")) for i in own.incidents()}
        if ("egress", dport) in found or time.time() > deadline:
            return found
        time.sleep(0.3)


def test_declared_connect_leaves_masqueraded_undeclared_is_an_incident(own):
    world = listener(own.world, "0.0.0.0", WORLD_PORT)
    try:
        seen = own.inside(f"""
import json, socket
out = {{}}
for port in ({WORLD_PORT}, {UNDECLARED_PORT}):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect(('{WORLD_ADDR}', port)); out[port] = s.recv(10).decode()
    except OSError as exc:
        out[port] = type(exc).__name__ + ':' + str(exc.errno)
print(json.dumps(out))
""")
        assert seen[str(WORLD_PORT)] == "host\n"
        assert seen[str(UNDECLARED_PORT)] == "PermissionError:13"  # Landlock's EACCES
        peers = [c["peer"] for c in contacts(world)]
        assert peers and all(HOST_ADDR in p for p in peers)  # masqueraded: the host's address
    finally:
        world.kill()
        world.wait()
    found = wait_incident(own, UNDECLARED_PORT)  # from Landlock's audit record
    assert ("egress", UNDECLARED_PORT) in found, found
    time.sleep(2.5)  # past the watcher's coalescing window (2 s): the next act is its own
    # UDP has no Landlock rule: the service's table inside its namespace drops the datagram
    # (EPERM) and logs it to NFLOG there, where the watcher's second socket reads it.
    sent = own.inside(f"""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b'x', ('{WORLD_ADDR}', {UDP_PORT})); out = 'sent'
except OSError as exc:
    out = type(exc).__name__
print(json.dumps({{'udp': out}}))
""")
    assert sent["udp"] == "PermissionError"
    found = wait_incident(own, UDP_PORT)
    assert ("egress", UDP_PORT) in found, found


UDP_ECHO = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    data, peer = s.recvfrom(512)
    s.sendto(b"answer:" + data, peer)
'''


def test_a_declared_connect_to_a_host_loopback_service_reaches_it(own):
    """The sample's resolver on the host's 127.0.0.53: carried over the veth (DNAT inside to
    the host side, DNAT back to 127.0.0.53 on the host), transparent to the service."""
    echo = subprocess.Popen(in_netns(own.host) + [sys.executable, "-c", UDP_ECHO, "127.0.0.53",
                                                  "53"], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "READY"
        seen = own.inside("""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b'q', ('127.0.0.53', 53))
data, peer = u.recvfrom(512)
t = socket.socket(); t.settimeout(5)
try:
    t.connect(('127.0.0.53', 53)); tcp = 'connected'
except OSError as exc:
    tcp = type(exc).__name__
print(json.dumps({'data': data.decode(), 'peer': list(peer), 'tcp': tcp}))
""")
    finally:
        echo.kill()
        echo.wait()
    assert seen["data"] == "answer:q" and seen["peer"] == ["127.0.0.53", 53]
    assert seen["tcp"] != "connected"  # tcp/53 is not declared: neither allowed nor carried


def test_the_host_table_lets_its_declared_flows_cross_the_veth(own, tmp_path):
    """With the host's own table applied (policy drop in input, output and forward), what the
    service declares still passes its veth, and nothing else reaches the host."""
    host_file = tmp_path / "host.toml"
    host_file.write_text(f'role = "server"\nmanagement = ["tcp/22@{WORLD_ADDR}/32"]\n'
                         'anti_spoofing = true\n')
    env = dict(os.environ, CORRAL_ROOT=str(own.root))
    env.pop("CORRAL_DEBUG", None)
    for args in (["apply", str(host_file), "--confirm-timeout", "120"],
                 ["confirm", str(host_file)]):
        result = subprocess.run(in_netns(own.host) + CORRAL + ["host", *args], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    try:
        assert http_get(own.world, f"http://{HOST_ADDR}:8080/health") == "ok\n"  # forward
        assert http_get(own.host, f"http://{HOST_ADDR}:8080/health") == "ok\n"  # output
        echo = subprocess.Popen(in_netns(own.host) + [sys.executable, "-c", UDP_ECHO,
                                                      "127.0.0.53", "53"],
                                stdout=subprocess.PIPE, text=True)
        world = listener(own.world, "0.0.0.0", WORLD_PORT)
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "READY"
            seen = own.inside(f"""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b'q', ('127.0.0.53', 53))
t = socket.socket(); t.settimeout(5); t.connect(('{WORLD_ADDR}', {WORLD_PORT}))
print(json.dumps({{'dns': u.recvfrom(512)[0].decode(), 'world': t.recv(10).decode()}}))
""")
        finally:
            for proc in (echo, world):
                proc.kill()
                proc.wait()
        assert seen == {"dns": "answer:q", "world": "host\n"}  # input, forward
        # the table is live: an undeclared port of the host stays closed to the world
        probe = listener(own.host, "0.0.0.0", LOOPBACK_PORT + 20)
        try:
            code = ("import socket, sys; s = socket.socket(); s.settimeout(3); "
                    "s.connect((sys.argv[1], int(sys.argv[2])))")
            blocked = sh(*in_netns(own.world), sys.executable, "-c", code, HOST_ADDR,
                         str(LOOPBACK_PORT + 20), check=False)
            assert blocked.returncode != 0 and "timed out" in blocked.stderr
        finally:
            probe.kill()
            probe.wait()
    finally:
        sh("ip", "netns", "exec", own.host, "nft", "delete", "table", "inet", "corral-host",
           check=False)


def test_reload_takes_new_listen_ports_into_the_nat_table(own):
    def nat() -> str:
        return sh("ip", "netns", "exec", own.host, "nft", "list", "table", "ip",
                  f"corral-nat-{own.name}").stdout

    assert "8080" in nat() and "8090" not in nat()
    own.manifest.write_text(own.manifest.read_text().replace(
        'listen = ["tcp/8080"]', 'listen = ["tcp/8080", "tcp/8090"]'))
    own.corral("install", str(own.manifest), check=True)
    own.corral("reload", own.name, check=True)
    assert "8090" in nat()
    inside = sh("nsenter", f"--net={own.root}/run/corral/{own.name}/netns", "nft", "list",
                "set", "inet", f"corral-{own.name}", "app-listen").stdout
    assert "8090" in inside  # the sets in the service's namespace were refilled too


def test_down_removes_namespace_link_and_table(own):
    own.corral("down", own.name, check=True)
    pin = own.root / "run/corral" / own.name / "netns"
    assert not pin.exists()
    links = json.loads(sh("ip", "-n", own.host, "-j", "link", "show").stdout)
    assert not [link for link in links if link["ifname"].startswith("crn")]
    tables = sh("ip", "netns", "exec", own.host, "nft", "list", "tables").stdout
    assert f"corral-nat-{own.name}" not in tables


def test_the_pool_skips_leased_and_host_networks():
    import ipaddress

    from corral.host import netns

    first = netns.choose("web", "10.213.0.0/16", [])
    block = ipaddress.IPv4Network(f"{first.addr}/30", strict=False)
    assert block.subnet_of(ipaddress.IPv4Network("10.213.0.0/16"))
    assert netns.choose("web", "10.213.0.0/16", []) == first  # stable across restarts
    # the same start, but that /30 leased (or on a host interface): the next free one
    second = netns.choose("web", "10.213.0.0/16", [block])
    assert ipaddress.IPv4Address(second.addr) not in block
    with pytest.raises(netns.NetnsError, match="no free /30"):
        netns.choose("web", "10.213.0.0/29", [ipaddress.IPv4Network("10.213.0.0/28")])
    assert len(netns.veth_name("a" * 32)) <= 15


@pytest.mark.parametrize("line, message", [
    ('network = "bridge"', "network"),
    ('network_pool = "10.213.0.1/16"', "host bits"),
    ('network_pool = "10.213.0.0/31"', "too small"),
])
def test_bad_network_keys_are_refused(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\n{line}\n[process.app]\ncommand = ["/bin/true"]\n')
    result = corral("check", str(path))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_without_forwarding_status_warns_and_host_clients_still_reach_it(
        tmp_path, start_service, netns, service_name):
    """A fresh namespace as the host: net.ipv4.ip_forward is 0 there and corral leaves it."""
    sh("ip", "-n", netns, "addr", "add", "10.78.0.1/32", "dev", "lo")  # a host address
    manifest = notes_manifest(tmp_path, service_name)
    manifest.write_text(manifest.read_text().replace("[image]", 'network = "own"\n\n[image]', 1))
    svc = start_service(manifest)
    status = svc.status()
    assert [w for w in status["warnings"] if "ip_forward is 0" in w], status["warnings"]
    forward = sh("ip", "netns", "exec", netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout
    assert forward.strip() == "0"
    assert http_get(netns, "http://10.78.0.1:8080/health") == "ok\n"


def test_down_after_a_killed_supervisor_removes_what_it_left(
        tmp_path, start_service, netns, service_name, corral_root):
    manifest = notes_manifest(tmp_path, service_name)
    manifest.write_text(manifest.read_text().replace("[image]", 'network = "own"\n\n[image]', 1))
    svc = start_service(manifest)
    pin = corral_root / "run/corral" / service_name / "netns"
    supervisor = svc.status()["supervisor"]
    assert os.path.ismount(pin)
    os.kill(supervisor, 9)  # no teardown: the pin, the veth and the NAT table stay behind
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{supervisor}") and time.time() < deadline:
        time.sleep(0.1)
    links = json.loads(sh("ip", "-n", netns, "-j", "link", "show").stdout)
    assert [link for link in links if link["ifname"].startswith("crn")]
    svc.corral("down", service_name, check=True)
    assert not os.path.exists(pin)
    links = json.loads(sh("ip", "-n", netns, "-j", "link", "show").stdout)
    assert not [link for link in links if link["ifname"].startswith("crn")]
    tables = sh("ip", "netns", "exec", netns, "nft", "list", "tables").stdout
    assert f"corral-nat-{service_name}" not in tables


def test_plan_shows_the_network(tmp_path):
    path = notes_manifest(tmp_path, "ownplan")
    path.write_text(path.read_text().replace("[image]", 'network = "own"\n'
                                             'network_pool = "10.99.0.0/24"\n\n[image]', 1))
    data = json.loads(corral("plan", str(path), "--json", check=True).stdout)
    assert data["network"] == {"mode": "own", "pool": "10.99.0.0/24"}
    assert "(network: own, behind a veth)" in corral("plan", str(path), check=True).stdout
    host = notes_manifest(tmp_path, "hostplan")
    assert json.loads(corral("plan", str(host), "--json", check=True).stdout)["network"] == {
        "mode": "host"}


def test_two_services_lease_two_links(tmp_path, corral_root, netns):
    """Two services whose names would start at the same /30 (a pool of two): each gets its
    own, and each serves on its own port from the host."""
    names = ["tst" + secrets.token_hex(3) for _ in range(2)]
    started = []
    try:
        for i, name in enumerate(names):
            path = notes_manifest(tmp_path, name)
            text = path.read_text().replace('"8080"]', f'"{8080 + i}"]').replace(
                'listen = ["tcp/8080"]', f'listen = ["tcp/{8080 + i}"]').replace(
                "/srv/notes", f"/srv/notes{i}")
            path.write_text(text.replace("[image]", 'network = "own"\n'
                                         'network_pool = "10.213.7.0/29"\n\n[image]', 1))
            corral("install", str(path), netns=netns, check=True)
            started.append(name)
            corral("up", str(path), netns=netns, check=True)
        sh("ip", "-n", netns, "addr", "add", "10.78.0.1/32", "dev", "lo")
        links = [json.loads(corral("status", name, "--json", netns=netns, check=True).stdout)[
            "services"][0]["network"] for name in names]
        assert {link["addr"] for link in links} == {"10.213.7.2", "10.213.7.6"}
        assert len({link["host_if"] for link in links}) == 2
        for i in range(2):
            assert http_get(netns, f"http://10.78.0.1:{8080 + i}/health") == "ok\n"
    finally:
        for name in started:
            corral("down", name, netns=netns)
            corral("uninstall", name, "--purge", netns=netns)
            remove_test_users(name)


def test_isolate_cuts_the_service_inside_its_namespace(
        tmp_path, start_service, netns, service_name, corral_root):
    """react = "isolate": a drop rule heads the process's chain in the table in the service's
    namespace (the host's copy sees none of its packets), so its answers stop."""
    sh("ip", "-n", netns, "addr", "add", "10.78.0.1/32", "dev", "lo")
    manifest = notes_manifest(tmp_path, service_name)
    manifest.write_text(manifest.read_text().replace(
        "[image]", 'network = "own"\n\n[watch]\nreact = "isolate"\n\n[image]', 1))
    svc = start_service(manifest)
    assert http_get(netns, "http://10.78.0.1:8080/health") == "ok\n"
    svc.exec("import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
             ".sendto(b'x', ('10.78.0.1', 7799))\nexcept OSError:\n    pass\n")
    deadline = time.time() + 15
    while not svc.status()["isolated"] and time.time() < deadline:
        time.sleep(0.2)
    assert svc.status()["isolated"]
    process = svc.status()["processes"][0]["name"]
    inside = sh("nsenter", f"--net={corral_root}/run/corral/{service_name}/netns", "nft", "-j",
                "list", "chain", "inet", f"corral-{service_name}", f"proc-{process}").stdout
    rules = [item["rule"] for item in json.loads(inside)["nftables"] if "rule" in item]
    assert rules[0]["comment"] == "isolated" and {"drop": None} in rules[0]["expr"]
    code = ("import socket; s = socket.socket(); s.settimeout(3); "
            "s.connect(('10.78.0.1', 8080)); s.sendall(b'GET /health HTTP/1.0\\r\\n\\r\\n'); "
            "print(s.recv(100))")
    cut = sh(*in_netns(netns), sys.executable, "-c", code, check=False)
    assert cut.returncode != 0, cut.stdout  # no answer (no SYN-ACK, or no reply)

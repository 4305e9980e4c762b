"""`corral learn`: observe the sample service on the host while a workload exercises it, write
the minimal manifest, then run the service contained by that manifest under the same workload:
no incident, the workload succeeds, and the image is smaller than the hand-written one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from conftest import NOTES_PY, REPO, corral, in_netns, notes_manifest

pytestmark = pytest.mark.root

PYTHON = "/usr/bin/python3.11"
LEARN = [sys.executable, "-c", "from corral.cli.learn import learn; learn()"]

WORKLOAD = """
import sys, urllib.request as u
base = 'http://127.0.0.1:%s' % sys.argv[1]
assert u.urlopen(base + '/health', timeout=5).read() == b'ok\\n'
for i in range(5):
    r = u.urlopen(u.Request(base + '/notes', data=b'note %d' % i), timeout=5).read()
    assert r == b'stored\\n', r
body = u.urlopen(base + '/notes', timeout=5).read()
assert body.count(b'note ') == 5, body
try:
    u.urlopen(base + '/nowhere', timeout=5)
except u.HTTPError as e:
    assert e.code == 404
print('workload ok')
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def workload(port: int, netns: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", WORKLOAD, str(port)]
    if netns:
        argv = in_netns(netns) + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def plan_entries(manifest: Path) -> int:
    data = json.loads(corral("plan", str(manifest), "--json", check=True).stdout)
    return len(data["image"]["entries"]) + len(data["image"]["added"])


@pytest.fixture
def notes_dir():
    """The service's data directory: outside /tmp (writes to /tmp are scratch, not state)."""
    path = tempfile.mkdtemp(prefix="corral-tst-learn-", dir="/srv")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def learn_notes(out: Path, notes_dir: str, port: int) -> tuple[subprocess.CompletedProcess, str]:
    """Run `corral learn` on the sample service, drive the workload, stop it with SIGINT."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(LEARN + ["--out", str(out), "--env", f"NOTES_DIR={notes_dir}",
                                     "--writable", notes_dir,
                                     "--", PYTHON, "-I", str(NOTES_PY), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        result = workload(port)
        assert result.returncode == 0, result.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), result.stdout


def test_learn_writes_a_manifest_that_runs_the_service_contained(
        tmp_path, corral_root, netns, service_name, notes_dir):
    port = free_port()
    learned = tmp_path / "learned.toml"
    result, _ = learn_notes(learned, notes_dir, port)
    assert result.returncode == 0, result.stderr
    text = learned.read_text()
    assert text.startswith("# Learned by `corral learn` on ")
    assert "REVIEW" in text and "Capabilities cannot be learned" in text
    assert corral("check", str(learned)).returncode == 0
    data = tomllib.loads(text)

    assert data["image"]["from"] == "closure"
    include = data["image"]["include"]
    assert PYTHON in include
    assert str(NOTES_PY) in include  # opened, so in the image at its host path
    # The stdlib it used: its landmark, the encodings, the http server's modules.
    assert "/usr/lib/python3.11/os.py" in include
    assert any(p.startswith("/usr/lib/python3.11/encodings/") for p in include)
    assert any(p.startswith("/usr/lib/python3.11/http") for p in include)
    assert not any(p.startswith(("/proc", "/sys", "/dev", notes_dir)) for p in include)
    assert "/etc/passwd" not in include
    assert data["volume"] == [{"path": notes_dir, "owner": "app", "mode": "0750"}]
    app = data["process"]["app"]
    assert app["command"] == [PYTHON, "-I", str(NOTES_PY), str(port)]
    assert app["listen"] == [f"tcp/{port}"]
    assert app["connect"] == [] and app["capabilities"] == []
    assert app["exec"] == [PYTHON]
    assert app["environment"]["NOTES_DIR"] == notes_dir
    for call in ("bind", "listen", "accept4", "openat", "exit_group", "rt_sigreturn", "execve"):
        assert call in app["syscalls"], call
    assert app["syscalls"] == sorted(app["syscalls"])
    assert "ptrace" not in app["syscalls"] and "mount" not in app["syscalls"]

    # Install the learned manifest under a test name and run the same workload, contained.
    manifest = tmp_path / f"{service_name}.toml"
    manifest.write_text(text.replace(f'name = "{data["name"]}"', f'name = "{service_name}"', 1))
    try:
        corral("install", str(manifest), netns=netns, check=True)
        corral("up", str(manifest), netns=netns, check=True)
        run = workload(port, netns)
        assert run.returncode == 0, run.stderr
        assert "workload ok" in run.stdout
        time.sleep(1.0)  # let the watcher see anything the workload caused
        incidents = json.loads(corral("incidents", service_name, "--json", netns=netns,
                                      check=True).stdout)["incidents"]
        assert incidents == []
        status = json.loads(corral("status", service_name, "--json", netns=netns,
                                   check=True).stdout)["services"][0]
        assert status["state"] == "running" and status["reverts"] == 0

        # Smaller than the hand-written image (all of /usr/lib/python3.11).
        reference = notes_manifest(tmp_path, service_name + "r")
        learned_n, reference_n = plan_entries(manifest), plan_entries(reference)
        print(f"image entries: learned {learned_n}, examples/notes {reference_n}")
        assert learned_n < reference_n / 3
    finally:
        corral("down", service_name, netns=netns)
        corral("uninstall", service_name, "--purge", netns=netns)


def test_learn_stops_after_duration_and_infers_net_bind_service(tmp_path, notes_dir):
    """A port below 1024 gives NET_BIND_SERVICE; --duration ends the observation."""
    port = 1000 + free_port() % 23  # below 1024
    out = tmp_path / "low.toml"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    started = time.time()
    result = subprocess.run(LEARN + ["--out", str(out), "--name", "lowport", "--duration", "3",
                                     "--env", f"NOTES_DIR={notes_dir}",
                                     "--writable", notes_dir, "--",
                                     PYTHON, "-I", str(NOTES_PY), str(port)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.time() - started < 20
    data = tomllib.loads(out.read_text())
    assert data["name"] == "lowport"
    assert data["process"]["app"]["listen"] == [f"tcp/{port}"]
    assert data["process"]["app"]["capabilities"] == ["NET_BIND_SERVICE"]
    assert corral("check", str(out)).returncode == 0


def test_a_dangerous_call_during_learn_is_exit_3(tmp_path):
    """A program that does what containment never allows (here ptrace): manifest written
    without it, the reason in it, exit code 3."""
    out = tmp_path / "bad.toml"
    code = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
            "libc.syscall(101, 0, 0, 0, 0)")
    result = subprocess.run(LEARN + ["--out", str(out), "--", PYTHON, "-I", "-c", code],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert result.returncode == 3, result.stderr
    assert "violation during learn" in result.stderr and "ptrace" in result.stderr
    text = out.read_text()
    assert "VIOLATION: system call ptrace" in text
    assert "ptrace" not in tomllib.loads(text)["process"]["app"]["syscalls"]


def tree_digest(top: str) -> str:
    """Names, owners, modes and contents below `top`: what a learned program could change."""
    import hashlib

    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for name in [base] + [os.path.join(base, f) for f in sorted(files)]:
            st = os.lstat(name)
            digest.update(f"{name} {st.st_uid} {st.st_gid} {st.st_mode:o}\n".encode())
            if os.path.isfile(name):
                digest.update(Path(name).read_bytes())
    return digest.hexdigest()


WRITER = """
import os, sys, time
d = sys.argv[1]
with open(os.path.join(d, 'state'), 'w') as f: f.write('new')
with open(os.path.join(d, 'old'), 'a') as f: f.write('more')
os.mkdir(os.path.join(d, 'sub'))
print('uid', os.getuid(), os.getgid(), flush=True)
time.sleep(30)
"""


def test_learn_runs_as_a_user_in_a_throwaway_view(tmp_path, notes_dir):
    """The program runs as a uid that is not root, its writes land in the view: the host's
    directory it wrote to hashes the same afterwards; the learned volume is that directory."""
    Path(notes_dir, "old").write_text("before")
    before = tree_digest(notes_dir)
    out = tmp_path / "writer.toml"
    result = subprocess.run(LEARN + ["--out", str(out), "--duration", "3", "--writable",
                                     notes_dir, "--", PYTHON, "-I", "-c", WRITER, notes_dir],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert result.returncode == 0, result.stderr
    uid, gid = (int(x) for x in result.stdout.split()[1:3])
    assert uid != 0 and gid != 0, result.stdout
    assert tree_digest(notes_dir) == before  # nothing of the host changed
    assert Path(notes_dir, "old").read_text() == "before"
    data = tomllib.loads(out.read_text())
    assert data["volume"] == [{"path": notes_dir, "owner": "app", "mode": "0750"}]
    assert f"(uid {uid}) in a throwaway view" in out.read_text()


def test_learn_never_runs_as_root_and_says_when_the_program_did_not_start(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = tmp_path / "pg.toml"
    root = subprocess.run(LEARN + ["--out", str(out), "--user", "root", "--", PYTHON, "-c", ""],
                          capture_output=True, text=True, timeout=60, env=env)
    assert root.returncode == 2 and "--user" in root.stderr and "Traceback" not in root.stderr
    # PostgreSQL refuses root; as the throwaway user it starts, finds no cluster and exits:
    # not a manifest with listen = [] and exit 0, but a clear failure.
    postgres = "/usr/lib/postgresql/15/bin/postgres"
    if not Path(postgres).exists():
        pytest.fail("postgresql-15 not installed (make test installs it)")
    failed = subprocess.run(LEARN + ["--out", str(out), "--", postgres, "-D",
                                     "/nonexistent/corral-tst-cluster"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert failed.returncode == 1, failed.stderr
    assert "exited with status 2" in failed.stderr and "(uid 6" in failed.stderr
    assert "no manifest written" in failed.stderr and "Traceback" not in failed.stderr
    assert not out.exists()


def test_parse_trace_reads_sockets_writes_and_resumed_calls():
    from corral.learn.trace import parse_trace

    trace = [
        '10 execve("/usr/bin/prog", ["prog"], 0x7ffd /* 1 var */) = 0',
        '10 openat(-100</srv>, "data/x.db", O_RDWR|O_CREAT|O_CLOEXEC, 0644) = 3</srv/data/x.db>',
        '10 openat(AT_FDCWD</>, "/etc/hosts", O_RDONLY) = 4</etc/hosts>',
        '11 connect(5<UDP:[123]>, {sa_family=AF_INET, sin_port=htons(53), '
        'sin_addr=inet_addr("192.0.2.53")}, 16 <unfinished ...>',
        '10 bind(6<TCP:[456]>, {sa_family=AF_INET6, sin6_port=htons(8443), sin6_flowinfo=0, '
        'inet_pton(AF_INET6, "::", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '11 <... connect resumed>) = 0',
        '12 connect(7<TCP:[789]>, {sa_family=AF_INET, sin_port=htons(5432), '
        'sin_addr=inet_addr("10.0.0.5")}, 16) = -1 EINPROGRESS (Operation now in progress)',
        '10 openat(AT_FDCWD</>, "/nonexistent", O_RDONLY) = -1 ENOENT (No such file)',
        '10 +++ exited with 0 +++',
    ]
    obs = parse_trace(trace)
    assert obs.executed == ["/usr/bin/prog"]
    assert obs.written == {"/srv/data/x.db"}
    assert "/etc/hosts" in obs.opened and "/nonexistent" not in obs.opened
    assert obs.listen == {("tcp", 8443)}
    assert obs.connect == {("udp", 53, "192.0.2.53"), ("tcp", 5432, "10.0.0.5")}
    assert {"execve", "openat", "connect", "bind"} <= obs.syscalls


DNS_CLIENT = """
import socket, struct, sys
port = int(sys.argv[1])
def query(name, qid):
    q = struct.pack('>HHHHHH', qid, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\\0'
    return q + struct.pack('>HH', 1, 1)
def answer(reply):
    assert reply[-4:] == socket.inet_aton('192.0.2.7'), reply
for i in range(3):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
    u.sendto(query('host%d.test.lan' % i, i + 1), ('127.0.0.1', port))
    answer(u.recv(512))
    t = socket.create_connection(('127.0.0.1', port), timeout=5)
    q = query('tcp%d.test.lan' % i, i + 100)
    t.sendall(struct.pack('>H', len(q)) + q)
    size = struct.unpack('>H', t.recv(2))[0]
    data = b''
    while len(data) < size:
        data += t.recv(size - len(data))
    answer(data)
    t.close()
print('dns ok')
"""


@pytest.mark.skipif(not os.path.exists("/usr/sbin/dnsmasq"),
                    reason="dnsmasq is not installed (apt-get install dnsmasq-base)")
def test_learn_a_real_debian_daemon_dnsmasq(tmp_path, corral_root, netns, service_name):
    """A real daemon from Debian, over UDP and TCP: learned, then contained with no incident."""
    port = free_port()
    out = tmp_path / "dnsmasq.toml"
    daemon = ["/usr/sbin/dnsmasq", "--keep-in-foreground", f"--port={port}",
              "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
              "--conf-file=/dev/null", "--address=/test.lan/192.0.2.7", "--pid-file=",
              "--user=root", "--log-facility=-"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(LEARN + ["--out", str(out), "--", *daemon], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        client = [sys.executable, "-c", DNS_CLIENT, str(port)]
        done = subprocess.run(client, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    data = tomllib.loads(out.read_text())
    app = data["process"]["app"]
    assert app["listen"] == [f"tcp/{port}", f"udp/{port}"]
    assert app["connect"] == []  # its answers to clients are replies, not egress
    assert "/usr/sbin/dnsmasq" in data["image"]["include"]
    assert corral("check", str(out)).returncode == 0

    manifest = tmp_path / f"{service_name}.toml"
    manifest.write_text(out.read_text().replace(f'name = "{data["name"]}"',
                                                f'name = "{service_name}"', 1))
    try:
        corral("install", str(manifest), netns=netns, check=True)
        corral("up", str(manifest), netns=netns, check=True)
        time.sleep(0.5)
        done = subprocess.run(in_netns(netns) + client, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        time.sleep(1.0)
        incidents = json.loads(corral("incidents", service_name, "--json", netns=netns,
                                      check=True).stdout)["incidents"]
        assert incidents == []
        print(f"dnsmasq image entries: {plan_entries(manifest)}")
    finally:
        corral("down", service_name, netns=netns)
        corral("uninstall", service_name, "--purge", netns=netns)


def test_render_writes_valid_toml_whatever_the_names(tmp_path):
    """Review 6.4: quotes, backslashes, newlines, ESC, DEL and bytes that are not UTF-8 in the
    argv, the traced paths and the environment still give a manifest that parses, with the
    comments kept as comments (a newline in the command must not end the header comment)."""
    import datetime

    from corral.learn.trace import Observed, render

    odd = ['say "hi"', "back\\slash", "two\nlines", "esc\x1b[31m", "del\x7f", "tab\there"]
    not_utf8 = os.fsdecode(b"latin\xe9")  # surrogate-escaped, as Python hands argv over
    files = []
    for i, name in enumerate(odd + [not_utf8]):
        path = tmp_path / f"{i}-{name}"
        path.write_text("x")
        files.append(str(path))
    program = files[0]
    command = [program, *odd, not_utf8, "name = \"injected\""]
    obs = Observed(executed=[program], opened=set(files),
                   written={"/srv/we\"ird\ndir/data", "/run/pid\x1bdir/x.pid"},
                   listen={("tcp", 8080)}, connect={("udp", 53, "127.0.0.53")},
                   unix_connect={"/run/so\nck"}, syscalls={"read", "write"})
    learned = render("odd", "app", command, obs, {"LANG": "C.UTF-8", "NOTE": "a\nb\x7f\""},
                     0, datetime.datetime.now(datetime.UTC), 1.0)
    data = tomllib.loads(learned.text)
    assert data["name"] == "odd"
    app = data["process"]["app"]
    assert app["command"][:-2] == [program, *odd]
    assert app["command"][-2] == "latin\ufffd"  # TOML holds Unicode only; the comment says so
    assert app["command"][-1] == 'name = "injected"'
    assert app["environment"] == {"LANG": "C.UTF-8", "NOTE": "a\nb\x7f\""}
    assert data["volume"] == [{"path": "/srv/we\"ird\ndir", "owner": "app", "mode": "0750"}]
    assert app["writable"] == ["/run/pid\x1bdir"]
    included = data["image"]["include"]  # the files, or their directory collapsed
    assert all(any(f == i or f.startswith(i + "/") for i in included) for f in files)
    assert data["watch"] == {"react": "revert"}
    assert "NOT valid UTF-8" in learned.text and "latin\\xe9" in learned.text
    header = learned.text.split("\nname = ")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert "Capabilities cannot be learned" in learned.text

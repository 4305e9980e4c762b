"""The production life cycle against the real kernel: stop signals, reload, a one-shot setup in
the containment, the boot unit, the logs, and what `up` tells its user."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import CORRAL, corral, in_netns, write_manifest

pytestmark = pytest.mark.root

PY = ["/usr/bin/python3.11", "-I"]


def life_manifest(tmp_path: Path, name: str, script: str, extra: str = "",
                  top: str = "", files: dict[str, str] | None = None) -> Path:
    """One python process `app` running `script` (from /opt/t), a volume /srv/data it owns."""
    (tmp_path / "app.py").write_text(script)
    adds = {"/opt/t/app.py": str(tmp_path / "app.py")}
    for dest, text in (files or {}).items():
        src = tmp_path / os.path.basename(dest)
        src.write_text(text)
        adds[dest] = str(src)
    add = ", ".join(f'"{k}" = "{v}"' for k, v in adds.items())
    return write_manifest(tmp_path, name, f"""
{top}
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11"]
add = {{ {add} }}
[[volume]]
path = "/srv/data"
owner = "app"
mode = "0750"
[process.app]
command = ["/usr/bin/python3.11", "-I", "/opt/t/app.py"]
limits = {{ memory = "128M", pids = 32 }}
{extra}
[watch]
react = "log"
""")


@pytest.fixture
def installed(tmp_path, corral_root, netns, service_name):
    made: list[str] = []

    def install(script: str, **kw) -> Path:
        manifest = life_manifest(tmp_path, service_name, script, **kw)
        corral("install", str(manifest), netns=netns, check=True)
        made.append(service_name)
        return manifest

    yield install
    for name in made:
        corral("down", name, netns=netns)
        corral("uninstall", name, "--purge", netns=netns)


def volume(corral_root: Path, name: str) -> Path:
    return corral_root / "var/lib/corral" / name / "volumes/srv-data"


def wait_for(check, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


RECORD_SIGNALS = """
import os, signal, sys, time
def got(sig, frame):
    with open("/srv/data/signals", "a") as f:
        f.write(f"{sig}\\n")
    if sig != signal.SIGHUP:
        sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, got)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_stop_signal_is_the_declared_one(installed, netns, service_name, corral_root):
    installed(RECORD_SIGNALS, extra='stop_signal = "SIGINT"\nstop_timeout = "20s"')
    corral("up", service_name, netns=netns, check=True)
    started = time.monotonic()
    corral("down", service_name, netns=netns, check=True)
    assert (volume(corral_root, service_name) / "signals").read_text() == f"{signal.SIGINT}\n"
    assert time.monotonic() - started < 10  # it stopped on the signal, not at the timeout


def test_reload_signals_each_process_and_sighup_to_the_supervisor(installed, netns,
                                                                  service_name, corral_root):
    installed(RECORD_SIGNALS)
    corral("up", service_name, netns=netns, check=True)
    status = json.loads(corral("status", service_name, "--json", netns=netns).stdout)
    pid = status["services"][0]["processes"][0]["pid"]
    result = corral("reload", service_name, "--json", netns=netns, check=True)
    data = json.loads(result.stdout)
    assert data["service"] == service_name and data["firewall"] == "refilled"
    assert data["processes"][0]["action"] == "sent SIGHUP"
    signals = volume(corral_root, service_name) / "signals"
    wait_for(lambda: signals.exists() and signals.read_text().count("\n") == 1)
    # SIGHUP to the supervisor itself means reload, as for most daemons, never stop.
    os.kill(status["services"][0]["supervisor"], signal.SIGHUP)
    wait_for(lambda: signals.read_text().count("\n") == 2)
    time.sleep(0.5)
    after = json.loads(corral("status", service_name, "--json", netns=netns).stdout)
    assert after["services"][0]["state"] == "running"
    assert after["services"][0]["processes"][0]["pid"] == pid
    assert signals.read_text() == f"{signal.SIGHUP}\n" * 2


UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in sys.argv[1:]:
    try:
        s.sendto(b"hi", ("127.0.0.1", int(port)))
    except PermissionError:  # the output hook's drop: EPERM for a local sender
        pass
"""
UDP_RECEIVE = """
import select, socket, sys, time
socks = []
for port in (19401, 19402):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port)); socks.append(s)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for s in select.select(socks, [], [], 0.1)[0]:
        s.recv(100); print(s.getsockname()[1], flush=True)
"""


def _udp_reaches(netns: str, name: str) -> set[int]:
    receiver = subprocess.Popen(in_netns(netns) + [sys.executable, "-c", UDP_RECEIVE, "3"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline() == "ready\n"
        sent = subprocess.run(in_netns(netns) + CORRAL + ["exec", name, "app", "--", *PY, "-c",
                              UDP_SEND, "19401", "19402"], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        out, _ = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return {int(line) for line in out.split()}


def test_reload_applies_a_changed_connect_without_a_restart(installed, netns, service_name):
    manifest = installed(RECORD_SIGNALS, extra='connect = ["udp/19401@127.0.0.1"]')
    corral("up", service_name, netns=netns, check=True)
    pid = json.loads(corral("status", service_name, "--json", netns=netns).stdout)[
        "services"][0]["processes"][0]["pid"]
    assert _udp_reaches(netns, service_name) == {19401}
    manifest.write_text(manifest.read_text().replace("udp/19401@", "udp/19402@"))
    corral("install", str(manifest), netns=netns, check=True)
    result = json.loads(corral("reload", service_name, "--json", netns=netns,
                               check=True).stdout)
    assert result["processes"][0]["restart_needed"] == []  # UDP: no Landlock rule to change
    assert _udp_reaches(netns, service_name) == {19402}
    after = json.loads(corral("status", service_name, "--json", netns=netns).stdout)
    assert after["services"][0]["processes"][0]["pid"] == pid


SETUP = """
import os, sys
with open("/srv/data/setup-runs", "a") as f:
    f.write(f"{os.getuid()}\\n")
if os.environ.get("FAIL_SETUP"):
    print("boom: cannot initialise", flush=True)
    sys.exit(3)
open("/srv/data/initialized", "w").close()
"""
SERVE = """
import os, time
assert os.path.exists("/srv/data/initialized")
while True:
    time.sleep(1)
"""


def test_setup_runs_once_inside_the_containment(installed, netns, service_name, corral_root):
    installed(SERVE, files={"/opt/t/setup.py": SETUP},
              extra='setup = { command = ["/usr/bin/python3.11", "-I", "/opt/t/setup.py"], '
                    'creates = "/srv/data/initialized" }')
    corral("up", service_name, netns=netns, check=True)
    runs = volume(corral_root, service_name) / "setup-runs"
    status = json.loads(corral("status", service_name, "--json", netns=netns).stdout)
    uid = status["services"][0]["processes"][0]["uid"]
    assert runs.read_text() == f"{uid}\n"  # as the process's user, into its volume
    corral("down", service_name, netns=netns, check=True)
    corral("up", service_name, netns=netns, check=True)
    assert runs.read_text() == f"{uid}\n"  # not again: /srv/data/initialized exists


def test_a_failing_setup_keeps_the_service_down_and_says_why(installed, netns, service_name):
    installed(SERVE, files={"/opt/t/setup.py": SETUP},
              extra='environment = { FAIL_SETUP = "1" }\n'
                    'setup = { command = ["/usr/bin/python3.11", "-I", "/opt/t/setup.py"], '
                    'creates = "/srv/data/initialized" }')
    result = corral("up", service_name, netns=netns)
    assert result.returncode == 1
    assert "setup /usr/bin/python3.11 exited with code 3" in result.stderr
    assert "boom: cannot initialise" in result.stderr and "Traceback" not in result.stderr


def test_setup_must_be_executable_by_the_process(tmp_path, corral_root):
    manifest = life_manifest(tmp_path, "tstsetup", SERVE,
                             extra='setup = { command = ["/usr/bin/initdb"] }')
    result = corral("check", str(manifest))
    assert result.returncode == 2
    assert "process.app.setup.command[0]" in result.stderr and "not in exec" in result.stderr


def test_setup_exec_is_checked_against_its_command_and_the_image(tmp_path, corral_root):
    manifest = life_manifest(tmp_path, "tstsetup", SERVE,
                             extra='setup = { command = ["/usr/bin/python3.11"], '
                                   'exec = ["/usr/bin/dash"] }')
    result = corral("check", str(manifest))
    assert result.returncode == 2
    assert "process.app.setup.exec: does not include setup.command[0]" in result.stderr
    manifest = life_manifest(tmp_path, "tstsetup", SERVE,
                             extra='setup = { command = ["/usr/bin/python3.11"], '
                                   'exec = ["/usr/bin/python3.11", "/usr/bin/dash"] }')
    result = corral("plan", str(manifest))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert 'process.app.setup.exec[1]: "/usr/bin/dash": not in the image' in result.stderr


def test_enable_writes_a_unit_systemd_accepts(installed, netns, service_name, corral_root):
    installed(RECORD_SIGNALS, extra='stop_timeout = "60s"')
    result = json.loads(corral("enable", service_name, "--json", netns=netns,
                               check=True).stdout)
    unit = Path(result["unit"])
    assert unit == corral_root / "etc/systemd/system" / f"corral-{service_name}.service"
    text = unit.read_text()
    assert f"run {service_name}" in text and f"reload {service_name}" in text
    assert "TimeoutStopSec=90" in text and "KillMode=mixed" in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    status = json.loads(corral("status", service_name, "--json", netns=netns).stdout)
    assert status["services"][0]["enabled"] is True
    assert json.loads(corral("disable", service_name, "--json", netns=netns,
                             check=True).stdout)["changed"] is True
    assert not unit.exists()
    status = json.loads(corral("status", service_name, "--json", netns=netns).stdout)
    assert status["services"][0]["enabled"] is False


FLOOD = """
import sys, time
for n in range(20000):
    sys.stdout.write(f"line {n:05d} " + "x" * 90 + "\\n")
sys.stdout.flush()
while True:
    print("tick", flush=True)
    time.sleep(0.2)
"""


def test_logs_rotate_under_a_cap_and_follow(installed, netns, service_name, corral_root):
    installed(FLOOD, top='[log]\nsize = "64K"\nfiles = 2\nrate = 0')
    corral("up", service_name, netns=netns, check=True)
    directory = corral_root / "var/log/corral" / service_name
    wait_for(lambda: "line 19999" in corral("logs", service_name, "app", netns=netns).stdout)
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["app.log", "app.log.1", "app.log.2"]
    assert sum(p.stat().st_size for p in directory.iterdir()) <= 3 * (64 << 10) + 200
    data = json.loads(corral("logs", service_name, "--json", "--since", "1h",
                             netns=netns).stdout)
    assert data["service"] == service_name and data["lines"][-1]["process"] == "app"
    assert data["lines"][-1]["at"].endswith("Z")
    followed = corral("logs", service_name, "-f", "--timeout", "2", netns=netns)
    new = [line for line in followed.stdout.splitlines() if line.endswith("app| tick")]
    assert len(new) >= 4  # the backlog's ticks and those written while following


def test_up_says_why_a_daemonizing_server_ended(installed, netns, service_name):
    installed("import os\nif os.fork():\n    os._exit(0)\nimport time\ntime.sleep(60)\n")
    result = corral("up", service_name, netns=netns)
    assert result.returncode == 1
    assert "daemonizes" in result.stderr and "PID namespace" in result.stderr


def test_up_quotes_this_runs_output_only(installed, netns, service_name):
    installed("import os, sys\nfirst = not os.path.exists('/srv/data/ran')\n"
              "open('/srv/data/ran', 'w').close()\n"
              "print('first run' if first else 'second run', flush=True)\nsys.exit(1)\n")
    assert corral("up", service_name, netns=netns).returncode == 1
    result = corral("up", service_name, netns=netns)
    assert result.returncode == 1
    assert "second run" in result.stderr and "first run" not in result.stderr


def test_up_does_not_report_started_for_a_revert_loop(installed, netns, service_name):
    # Sends to an undeclared port right after it listens: the egress tripwire reverts it.
    script = ("import socket, time\ns = socket.socket(); s.bind(('127.0.0.1', 19411)); "
              "s.listen()\ntime.sleep(0.05)\nu = socket.socket(socket.AF_INET, "
              "socket.SOCK_DGRAM)\ntry:\n    u.sendto(b'x', ('127.0.0.1', 19412))\n"
              "except OSError:\n    pass\ntime.sleep(60)\n")
    manifest = installed(script, extra='listen = ["tcp/19411"]')
    manifest.write_text(manifest.read_text().replace('react = "log"', 'react = "revert"'))
    corral("install", str(manifest), netns=netns, check=True)
    result = corral("up", service_name, netns=netns)
    assert result.returncode == 1, result.stdout
    assert "revert" in result.stderr and "egress" in result.stderr


UDP_HOLD = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 19411))
while True:
    time.sleep(1)
"""
UDP_BIND = """
import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("127.0.0.1", 19412))
    print("bound")
except OSError as exc:
    print(exc.errno)
"""


def test_reload_applies_a_changed_udp_listen_to_binds(installed, netns, service_name):
    """The cgroup's bind program (kernel.bindguard) follows `listen` at a reload, like nft."""
    manifest = installed(UDP_HOLD, extra='listen = ["udp/19411"]')
    corral("up", service_name, netns=netns, check=True)

    def bind_19412() -> str:
        done = subprocess.run(in_netns(netns) + CORRAL + ["exec", service_name, "app", "--",
                              *PY, "-c", UDP_BIND], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert bind_19412() == "1"  # EPERM: not declared
    manifest.write_text(manifest.read_text().replace('"udp/19411"', '"udp/19411", "udp/19412"'))
    corral("install", str(manifest), netns=netns, check=True)
    corral("reload", service_name, "--json", netns=netns, check=True)
    assert bind_19412() == "bound"

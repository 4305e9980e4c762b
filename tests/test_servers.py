"""Debian 12's nginx, redis-server and PostgreSQL 15 run contained from examples/, with the
default tripwires and react = "revert", for their whole life: install, up, a few seconds of load
from their real client on loopback (zero incidents, the same process), an attack from inside
(contained and reported), reload (same pid), down + up keeping the data, a boot unit systemd
accepts, and uninstall --purge leaving the host as it was.

Each test runs in its own network namespace and CORRAL_ROOT, under a "tst" name; the load
figures go to the test's output (`pytest -s`) for the notes."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CORRAL, EXAMPLES, Service, in_netns

pytestmark = pytest.mark.root

# The servers and their clients come from Debian (`make test` installs them: TEST_PACKAGES).
NEEDS = {"nginx": ["/usr/sbin/nginx", "/usr/bin/wrk"],
         "redis": ["/usr/bin/redis-server", "/usr/bin/redis-benchmark", "/usr/bin/redis-cli"],
         "postgresql": ["/usr/lib/postgresql/15/bin/postgres", "/usr/bin/pgbench"]}
LOAD_SECONDS = 3


def need(server: str) -> None:
    missing = [p for p in NEEDS[server] if not Path(p).exists()]
    if missing:
        pytest.fail(f"{server}: {missing} not installed (make test installs them)")


def run_in(netns: str, *argv: str, timeout: float = 60, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """A client on the namespace's loopback, as the host's administrator would run it."""
    result = subprocess.run(in_netns(netns) + list(argv), capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def incidents(svc: Service) -> list[dict]:
    return json.loads(svc.corral("incidents", svc.name, "--json", check=True).stdout)["incidents"]


def pid_of(svc: Service, process: str) -> int:
    status = svc.status()
    assert status["state"] == "running", status
    return next(p["pid"] for p in status["processes"] if p["name"] == process)


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def host_traces(name: str, netns: str) -> dict:
    """What of a service can be seen on the host: users, groups, its table, mounts."""
    def lines(path: str) -> list[str]:
        return [line for line in Path(path).read_text().splitlines() if f"-{name}-" in line
                or f"/{name}/" in line or line.endswith(f"/{name}")]
    tables = run_in(netns, "nft", "list", "tables").stdout
    return {"passwd": lines("/etc/passwd"), "group": lines("/etc/group"),
            "shadow": lines("/etc/shadow"), "gshadow": lines("/etc/gshadow"),
            "tables": [t for t in tables.splitlines() if name in t],
            "mounts": lines("/proc/self/mountinfo")}


@pytest.fixture
def server(tmp_path, service_name, start_service):
    """The example's manifest and files under the test's name, installed and up."""
    def start(example: str, before_up=None) -> Service:
        need(example)
        directory = tmp_path / example
        shutil.copytree(EXAMPLES / example, directory)
        manifest = directory / f"{example}.toml"
        text = manifest.read_text()
        manifest.write_text(re.sub(r'^name = ".*"$', f'name = "{service_name}"', text,
                                   count=1, flags=re.M))
        return start_service(manifest, before_up)

    return start


def life(svc: Service, process: str, load, write, read, attack, tripwire: str,
         reload: str = "sent SIGHUP", shell=None) -> None:
    """The checks every server gets; `load` returns its figures, printed for the notes.
    `shell`: the check that the process cannot run a shell, where the image has one (for its
    setup); it leaves the incidents it raised, which the attack's check then skips."""
    pid = pid_of(svc, process)
    figures = load()
    print(f"\n{svc.name} ({process}) load: {figures}")
    assert incidents(svc) == [], "a tripwire fired on the server's normal work"
    assert pid_of(svc, process) == pid and svc.status()["reverts"] == 0

    # Reload: the declared signal, the same process, still serving.
    result = json.loads(svc.corral("reload", svc.name, "--json", check=True).stdout)
    assert [p["action"] for p in result["processes"]] == [reload], result
    assert result["firewall"] == "refilled"
    time.sleep(1.0)
    assert pid_of(svc, process) == pid
    assert incidents(svc) == []

    # The data outlives a stop and a start.
    write()
    svc.corral("down", svc.name, check=True)
    svc.corral("up", svc.name, check=True)
    assert read()
    assert incidents(svc) == []

    # A boot unit systemd accepts.
    unit = Path(json.loads(svc.corral("enable", svc.name, "--json", check=True).stdout)["unit"])
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    assert svc.status()["enabled"] is True
    svc.corral("disable", svc.name, check=True)

    # An attacker inside: no shell to run; what it tries is refused and reported.
    if shell is None:
        ran = svc.corral("exec", svc.name, process, "--", "/bin/sh", "-c", "id")
        assert ran.returncode == 127, ran  # no shell in the image
        before = 0
    else:
        shell()
        before = len(incidents(svc))
    reverts = svc.status()["reverts"]
    attack()
    found = wait_for(lambda: incidents(svc)[before:], what="an incident")
    assert (found[0]["process"], found[0]["tripwire"]) == (process, tripwire), found
    print(f"{svc.name} attack: {found[0]['tripwire']} {found[0]['detail']} -> "
          f"{found[0]['reaction']} in {found[0]['latency_ms']} ms")
    # It reverts (fine), and the server comes back from the clean base.
    wait_for(lambda: svc.status()["state"] == "running"
             and svc.status()["reverts"] >= reverts + 1, what="the revert")


def svc_exec(svc: Service, process: str, *cmd: str) -> list[str]:
    return CORRAL + ["exec", svc.name, process, "--", *cmd]


def uninstall_leaves_nothing(svc: Service) -> None:
    svc.corral("down", svc.name, check=True)
    svc.corral("uninstall", svc.name, "--purge", check=True)
    assert host_traces(svc.name, svc.netns) == {
        "passwd": [], "group": [], "shadow": [], "gshadow": [], "tables": [], "mounts": []}
    assert not (svc.root / "var/lib/corral" / svc.name).exists()
    assert not any(p.pw_name.startswith(f"corral-{svc.name}-") for p in pwd.getpwall())


def test_nginx(server, netns):
    svc = server("nginx")
    volume = svc.state_dir / "volumes/var-log-nginx"
    page = run_in(netns, "curl", "-sS", "-m", "5", "http://127.0.0.1/").stdout
    assert "Welcome to nginx" in page

    def load() -> str:
        out = run_in(netns, "wrk", "-t2", "-c16", f"-d{LOAD_SECONDS}s", "--latency",
                     "http://127.0.0.1/", timeout=60).stdout
        assert "Non-2xx" not in out and "Socket errors" not in out, out
        return " ".join(re.findall(r"Requests/sec:\s+\S+|99%\s+\S+", out))

    def write() -> None:
        run_in(netns, "curl", "-sS", "-m", "5", "http://127.0.0.1/?before-restart")
        wait_for(lambda: "before-restart" in (volume / "access.log").read_text(),
                 what="the access log line")

    def read() -> bool:
        return "before-restart" in (volume / "access.log").read_text()

    def attack() -> None:
        # The server's own binary, pointed at an undeclared destination: its error log to a
        # syslog server on 127.0.0.1:514 (UDP, so the packet reaches the firewall's log).
        run_in(netns, *svc_exec(svc, "web", "/usr/sbin/nginx", "-c", "/etc/nginx/corral.conf",
                                "-g", "error_log syslog:server=127.0.0.1:514; daemon off;"),
               check=False, timeout=60)

    life(svc, "web", load, write, read, attack, "egress")
    uninstall_leaves_nothing(svc)


def test_redis(server, netns):
    svc = server("redis")
    cli = ["redis-cli", "-h", "127.0.0.1", "-p", "6379"]
    assert run_in(netns, *cli, "ping").stdout.strip() == "PONG"

    def load() -> str:
        out = run_in(netns, "redis-benchmark", "-h", "127.0.0.1", "-p", "6379", "-q",
                     "-c", "20", "-n", "40000", "-t", "set,get,incr,lpush", "--csv",
                     timeout=120).stdout
        # BGSAVE forks and renames inside the state directory: part of normal work too.
        run_in(netns, *cli, "bgsave")
        wait_for(lambda: "rdb_bgsave_in_progress:0" in run_in(netns, *cli, "info",
                 "persistence").stdout, what="bgsave")
        return " ".join(line.replace('"', "").split(",")[0] + "=" + line.split(",")[1]
                        .strip('"') for line in out.splitlines()[1:])

    def write() -> None:
        run_in(netns, *cli, "set", "corral:kept", "before-restart")

    def read() -> bool:
        return run_in(netns, *cli, "get", "corral:kept").stdout.strip() == "before-restart"

    def attack() -> None:
        # Through the server: replicate from an undeclared address (TCP egress).
        run_in(netns, *cli, "replicaof", "127.0.0.1", "6380", check=False)

    # redis has no reload (Debian's unit has no ExecReload; settings change by CONFIG SET):
    # corral says so and does not send a signal that would kill it.
    life(svc, "db", load, write, read, attack, "egress",
         reload="not sent: the program does not handle SIGHUP")
    uninstall_leaves_nothing(svc)


def test_postgresql(server, netns):
    # The cluster comes from the setup: initdb, inside the containment, into the state
    # directory, with /bin/sh and postgres that only the setup may execute.
    svc = server("postgresql")
    cluster = svc.state_dir / "volumes/var-lib-postgresql/15/main"
    user = pwd.getpwnam(f"corral-{svc.name}-db")
    assert (cluster / "PG_VERSION").read_text().strip() == "15"
    assert os.stat(cluster).st_uid == user.pw_uid
    psql = ["/usr/lib/postgresql/15/bin/psql", "-h", "/run/postgresql", "-U", "postgres",
            "-v", "ON_ERROR_STOP=1", "-Atc"]
    # The one way in without a password: the socket, inside the service.
    svc.corral("exec", svc.name, "db", "--", *psql, "ALTER ROLE postgres PASSWORD 'bench'",
               check=True)
    env = {"PGPASSWORD": "bench", "PATH": "/usr/bin:/bin"}
    conn = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]

    def load() -> str:
        run_in(netns, "pgbench", *conn, "-i", "-s", "2", "-q", "postgres", env=env, timeout=120)
        out = run_in(netns, "pgbench", *conn, "-c", "4", "-j", "2", "-T", str(LOAD_SECONDS),
                     "postgres", env=env, timeout=120).stdout
        assert "number of failed transactions: 0" in out, out
        return " ".join(re.findall(r"tps = \S+|latency average = \S+ ms", out))

    def sql(query: str) -> str:
        return run_in(netns, "psql", *conn, "-Atc", query, "postgres", env=env).stdout.strip()

    def write() -> None:
        sql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before-restart')")

    def read() -> bool:
        return sql("SELECT v FROM kept") == "before-restart" and \
            sql("SELECT count(*) FROM pgbench_accounts") == "200000"

    def shell() -> None:
        # /bin/sh is in the image for the setup, but the server may not run it: the server
        # itself asked for a program (COPY TO PROGRAM: popen, /bin/sh -c) is refused and trips.
        out = run_in(netns, "psql", *conn, "-Atc", "COPY (SELECT 1) TO PROGRAM 'id'",
                     "postgres", env=env, check=False)
        assert out.returncode != 0, out
        found = wait_for(lambda: incidents(svc), what="the exec incident")
        assert (found[0]["process"], found[0]["tripwire"]) == ("db", "exec"), found
        assert found[0]["detail"]["path"] in ("/bin/sh", "/usr/bin/dash"), found
        assert not found[0]["detail"].get("setup"), found
        wait_for(lambda: svc.status()["state"] == "running" and svc.status()["reverts"] >= 1,
                 what="the revert")
        wait_for(lambda: run_in(netns, "psql", *conn, "-Atc", "select 1", "postgres",
                                env=env, check=False).returncode == 0, what="postgres back")
        # The same through corral exec: refused and reported, never run (137: the revert it
        # trips kills the command's session before its own 126 gets out).
        direct = svc.corral("exec", svc.name, "db", "--", "/bin/sh", "-c", "id")
        assert direct.returncode in (126, 137) and "uid=" not in direct.stdout, direct
        found = wait_for(lambda: incidents(svc)[1:], what="the second exec incident")
        assert (found[0]["tripwire"], found[0]["detail"]["path"]) == ("exec", "/bin/sh"), found
        wait_for(lambda: svc.status()["state"] == "running" and svc.status()["reverts"] >= 2,
                 what="the second revert")

    def attack() -> None:
        # Through the server: a superuser's dblink-style client call to an undeclared port.
        svc.corral("exec", svc.name, "db", "--", "/usr/lib/postgresql/15/bin/psql",
                   "-h", "127.0.0.1", "-p", "6380", "-c", "select 1")

    life(svc, "db", load, write, read, attack, "egress", shell=shell)
    uninstall_leaves_nothing(svc)

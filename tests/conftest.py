"""Shared fixtures. Tests run as root against the real kernel, in a throwaway CORRAL_ROOT and
their own network namespaces, with service names that start with "tst" (users corral-tst*-*);
everything they create is removed even when they fail."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CORRAL = [sys.executable, "-m", "corral.cli.entry"]  # the `corral` executable's entry point
TEST_PREFIX = "corral-tst"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="corral's tests need root (real users, nftables, mounts)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "root: needs root and the real kernel")


def remove_test_users(service: str) -> None:
    """Remove the users a failed test left behind: only that service's, with corral's marker."""
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(f"corral-{service}-") and \
                entry.pw_gecos.startswith("corral service"):
            subprocess.run(["userdel", entry.pw_name], capture_output=True)


@pytest.fixture
def corral_root(tmp_path, monkeypatch):
    root = tmp_path / "corral-root"
    root.mkdir()
    monkeypatch.setenv("CORRAL_ROOT", str(root))
    yield root


@pytest.fixture
def service_name():
    name = "tst" + secrets.token_hex(3)
    yield name
    remove_test_users(name)


@pytest.fixture
def netns():
    name = "corral-t-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_netns(netns: str) -> list[str]:
    """Enter only the network namespace. (`ip netns exec` also remounts /sys, which hides
    the cgroup file systems from corral: no limits could be applied under it.)"""
    return ["nsenter", f"--net=/run/netns/{netns}"]


def corral(*args: str, netns: str | None = None, check: bool = False,
           env: dict[str, str] | None = None, cwd: str | None = None,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (in `netns` if given) and return its result."""
    argv = list(CORRAL) + list(args)
    if netns:
        argv = in_netns(netns) + argv
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.pop("CORRAL_DEBUG", None)
    result = subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd,
                            input=input, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"corral {' '.join(args)} -> {result.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def write_manifest(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(f'name = "{name}"\n' + body)
    return path


NOTES_PY = EXAMPLES / "notes" / "notes.py"


def notes_manifest(directory: Path, name: str, extra_process: str = "",
                   app_extra: str = "") -> Path:
    """The sample notes service under a test name (same containment as examples/notes)."""
    return write_manifest(directory, name, f"""
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11"]
add = {{ "/opt/notes/notes.py" = "{NOTES_PY}" }}
[[volume]]
path = "/srv/notes"
owner = "app"
mode = "0750"
[process.app]
command = ["/usr/bin/python3.11", "-I", "/opt/notes/notes.py", "8080"]
listen = ["tcp/8080"]
connect = ["udp/53@127.0.0.53"]
limits = {{ memory = "128M", pids = 32, open_files = 256, cpu = 0.5 }}
environment = {{ LANG = "C.UTF-8", NOTES_DIR = "/srv/notes" }}
{app_extra}
{extra_process}
""")


class Service:
    """A running, contained service in its own network namespace, for tests."""

    def __init__(self, name: str, netns: str, root: Path, manifest: Path):
        self.name, self.netns, self.root, self.manifest = name, netns, root, manifest

    def corral(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return corral(*args, netns=self.netns, **kw)

    def exec(self, code: str, process: str = "app", timeout: int = 60,
             argv: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run Python code as an attacker who owns the process would: its interpreter, inside."""
        cmd = argv or ["/usr/bin/python3.11", "-I", "-c", code]
        argv_full = in_netns(self.netns) + CORRAL + [
            "exec", self.name, process, "--"] + cmd
        return subprocess.run(argv_full, capture_output=True, text=True, timeout=timeout)

    def http(self, path: str = "/health", data: bytes | None = None, timeout: float = 5) -> bytes:
        code = ("import sys, urllib.request as u; r = u.Request('http://127.0.0.1:8080' + "
                "sys.argv[1], data=sys.stdin.buffer.read() or None); "
                "sys.stdout.buffer.write(u.urlopen(r, timeout=float(sys.argv[2])).read())")
        result = subprocess.run(in_netns(self.netns) + [sys.executable, "-c", code,
                                 path, str(timeout)], input=data or b"", capture_output=True,
                                timeout=timeout + 5)
        if result.returncode != 0:
            raise AssertionError(f"GET {path} failed: {result.stderr.decode()[-500:]}")
        return result.stdout

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/corral" / self.name

    def status(self) -> dict:
        import json

        result = self.corral("status", self.name, "--json", check=True)
        return json.loads(result.stdout)["services"][0]


@contextlib.contextmanager
def installed_and_up(svc):
    """Install and start `svc` (anything with `name`, `manifest` and a `corral(*args, check)`
    that runs in its namespace); down and uninstall --purge on the way out, even on failure."""
    try:
        svc.corral("install", str(svc.manifest), check=True)
        svc.corral("up", str(svc.manifest), check=True)
        yield svc
    finally:
        svc.corral("down", svc.name)
        svc.corral("uninstall", svc.name, "--purge")


@contextlib.contextmanager
def throwaway_root(tmp_path_factory, label: str):
    """For a module's or package's shared service: (a temp dir, a CORRAL_ROOT in it), that root
    in the environment (CORRAL_DEBUG out of it) until the end."""
    tmp = tmp_path_factory.mktemp(label)
    root = tmp / "corral-root"
    root.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("CORRAL_ROOT", str(root))
    patch.delenv("CORRAL_DEBUG", raising=False)
    try:
        yield tmp, root
    finally:
        patch.undo()


@pytest.fixture
def notes(tmp_path, corral_root, netns, service_name):
    """The sample service installed and up, contained, in a throwaway namespace and root."""
    manifest = notes_manifest(tmp_path, service_name)
    with installed_and_up(Service(service_name, netns, corral_root, manifest)) as svc:
        yield svc


@pytest.fixture
def start_service(corral_root, netns, service_name):
    """Install and start a manifest as `service_name` in `netns`; every service started is
    taken down and uninstalled (--purge) afterwards, even when the test fails."""
    started: list[Service] = []

    def start(manifest, before_up=None) -> Service:
        """`before_up(svc)`, if given, runs between install and up."""
        corral("install", str(manifest), netns=netns, check=True)
        svc = Service(service_name, netns, corral_root, manifest)
        started.append(svc)
        if before_up:
            before_up(svc)
        svc.corral("up", str(manifest), check=True)
        return svc

    yield start
    for svc in started:
        svc.corral("down", svc.name)
        svc.corral("uninstall", svc.name, "--purge")

"""Helpers of the escape corpus: a contained service the tests can attack, the prelude every
attack script starts with, and checks of the host's state.

An attack script is Python that runs INSIDE the service (`corral exec NAME app -- python3.11`),
as the service's own user with everything the containment applies. Each attempt is a function
decorated with `@attempt("name")`: it runs at once, and its outcome is recorded as the errno name
of the OSError it raised ("EPERM", "EACCES", ...), as "returned" with the value it returned (the
act went through: for a real escape attempt that is a hole), or as the name of another exception.
The script prints every outcome as one JSON line, which `Contained.attack` parses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

from conftest import CORRAL, installed_and_up, notes_manifest  # tests/conftest.py

try:
    from conftest import in_netns
except ImportError:  # an older tests/conftest.py
    def in_netns(netns: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{netns}"]

MARK = "ESCAPE-RESULTS "

PRELUDE = r'''
import ctypes, errno, json, os, socket, struct, sys
_RESULTS = {}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

def _arg(a):
    return ctypes.c_long(a) if isinstance(a, int) else a

def syscall(nr, *args):
    """The raw system call (every integer passed as a long); -1 raises OSError(errno)."""
    ctypes.set_errno(0)
    res = _libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res

def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)

def attempt(name):
    def run(fn):
        try:
            value = fn()
        except OSError as exc:
            _RESULTS[name] = {"outcome": errno.errorcode.get(exc.errno, str(exc.errno)),
                              "detail": str(exc)[:300]}
        except BaseException as exc:
            _RESULTS[name] = {"outcome": type(exc).__name__, "detail": str(exc)[:300]}
        else:
            _RESULTS[name] = {"outcome": "returned", "value": _jsonable(value)}
        return fn
    return run

def errname(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))

class ExecFailed(Exception):
    """The program could be started but did not run (e.g. the loader could not map it)."""

def spawn(target, argv):
    """fork + execve(target, argv): target is a path, or an fd (fexecve, i.e. execveat with
    AT_EMPTY_PATH). The program's stdout if it ran and exited 0; the execve's errno raised as
    OSError; ExecFailed if it started but failed."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            os.close(out_r)
            os.dup2(out_w, 1)
            os.execve(target, argv, {"LANG": "C.UTF-8"})
        except OSError as exc:
            os.write(err_w, str(exc.errno).encode())
        finally:
            os._exit(127)
    os.close(err_w)
    os.close(out_w)
    err = os.read(err_r, 64)
    os.close(err_r)
    out = b""
    while chunk := os.read(out_r, 65536):
        out += chunk
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    if err:
        raise OSError(int(err), os.strerror(int(err)))
    if os.waitstatus_to_exitcode(status) != 0:
        raise ExecFailed(f"exit {os.waitstatus_to_exitcode(status)}")
    return out.decode(errors="replace")

def run_program(argv, **kw):
    """Run a program; its stdout if it ran (exit 0). An execve refused by the kernel raises
    the OSError subprocess gets (EACCES, ...)."""
    import subprocess
    done = subprocess.run(argv, capture_output=True, timeout=30, **kw)
    if done.returncode != 0:
        raise ExecFailed(f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")
    return done.stdout.decode(errors="replace")
'''

EPILOGUE = f'\nprint({MARK!r} + json.dumps(_RESULTS), flush=True)\n'


class AttackFailed(AssertionError):
    pass


def blocked(results: dict, name: str, *expected: str | tuple[str, ...]) -> None:
    """Assert the attempt `name` failed with one of the `expected` outcomes (errno names, or
    tuples of them)."""
    expected = tuple(e for item in expected for e in ((item,) if isinstance(item, str) else item))
    got = results.get(name)
    assert got is not None, f"attempt {name!r} did not run (script died before it?)"
    assert got["outcome"] in expected, (
        f"escape attempt {name!r} was not stopped as expected ({' or '.join(expected)}): "
        f"{got}")


def returned(results: dict, name: str):
    """The value an observation (a read that is allowed, e.g. its own /proc/self/status)
    returned; fails if it raised."""
    got = results.get(name)
    assert got is not None, f"attempt {name!r} did not run"
    assert got["outcome"] == "returned", f"observation {name!r} failed: {got}"
    return got["value"]


# -------------------------------------------------------------------------- a contained service

LAUNCHERS = {
    # The harness's way (tests/conftest.py): only the network namespace changes; the mount
    # namespace is the host's, as in production.
    "nsenter-net": in_netns,
    # A new mount namespace with a fresh /sys, where no cgroup file system is mounted.
    "ip-netns-exec": lambda ns: ["ip", "netns", "exec", ns],
}


class Contained:
    """A running, contained notes service (see tests/conftest.py `Service`), on `port`, whose
    corral commands run through `launcher`."""

    def __init__(self, name: str, netns: str, root: Path, manifest: Path, port: int = 8080,
                 launcher: str = "nsenter-net"):
        self.name, self.netns, self.root, self.manifest = name, netns, root, manifest
        self.port, self.launcher = port, launcher

    def prefix(self) -> list[str]:
        return LAUNCHERS[self.launcher](self.netns)

    def corral(self, *args: str, check: bool = False, timeout: float = 120
               ) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("CORRAL_DEBUG", None)
        result = subprocess.run(self.prefix() + CORRAL + list(args), capture_output=True,
                                text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"corral {' '.join(args)} -> {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def exec(self, code: str, timeout: float = 60, stdin=subprocess.DEVNULL,
             argv: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run Python code inside the service's process `app`, as the attacker would."""
        cmd = argv or ["/usr/bin/python3.11", "-I", "-c", code]
        return subprocess.run(self.prefix() + CORRAL + ["exec", self.name, "app", "--"] + cmd,
                              capture_output=True, text=True, timeout=timeout, stdin=stdin)

    def attack(self, script: str, params: dict | None = None, timeout: float = 60,
               **kw) -> dict:
        """Run an attack script (attempts written against PRELUDE, reading PARAMS) and return
        its outcomes."""
        given = f"PARAMS = json.loads({json.dumps(params or {})!r})\n"
        result = self.exec(PRELUDE + given + script + EPILOGUE, timeout=timeout, **kw)
        for line in result.stdout.splitlines():
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise AttackFailed(f"attack script produced no results (exit {result.returncode})\n"
                           f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}")

    def http(self, path: str = "/health", data: bytes | None = None, timeout: float = 5) -> bytes:
        code = ("import sys, urllib.request as u; r = u.Request(sys.argv[1], "
                "data=sys.stdin.buffer.read() or None); "
                "sys.stdout.buffer.write(u.urlopen(r, timeout=float(sys.argv[2])).read())")
        url = f"http://127.0.0.1:{self.port}{path}"
        result = subprocess.run(in_netns(self.netns) + [sys.executable, "-c", code,
                                 url, str(timeout)], input=data or b"", capture_output=True,
                                timeout=timeout + 5)
        if result.returncode != 0:
            raise AssertionError(f"GET {path} failed: {result.stderr.decode()[-500:]}")
        return result.stdout

    def serving(self, within: float = 15.0) -> bool:
        """True once /health answers (the supervisor may be restarting the program)."""
        deadline = time.time() + within
        while True:
            try:
                return self.http("/health", timeout=1) == b"ok\n"
            except (AssertionError, subprocess.TimeoutExpired):
                if time.time() > deadline:
                    return False
                time.sleep(0.2)

    def status(self) -> dict:
        result = self.corral("status", self.name, "--json", check=True)
        return json.loads(result.stdout)["services"][0]

    def app(self) -> dict:
        return self.status()["processes"][0]

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/corral" / self.name

    @property
    def base_root(self) -> Path:
        return self.state_dir / "base" / str(self.status()["base_version"]) / "root"

    @property
    def user(self) -> str:
        return f"corral-{self.name}-app"


# The watcher's reaction to a tripped wire: only "log". The corpus tests the PREVENTIVE layers
# (namespaces, credentials, Landlock, seccomp, nftables, cgroups, the exec check): every attempt
# must fail on its own, not because the default reaction ("revert": kill everything, restart
# from the base) happened to kill the attacker first. With "revert", the first tripped wire of a
# batch would end the batch, and more than five reverts in five minutes leave the service down.
WATCH = '\n[watch]\nreact = "log"\n'


def service_manifest(directory: Path, name: str, port: int = 8080,
                     volume: str = "/srv/notes") -> Path:
    """The sample's manifest (same containment as examples/notes) on another port/volume, its
    watcher only logging."""
    path = notes_manifest(directory, name)
    text = path.read_text().replace("8080", str(port)).replace("/srv/notes", volume)
    path.write_text(text + WATCH)
    return path


def new_service_name() -> str:
    return "tst" + secrets.token_hex(3)


@contextlib.contextmanager
def started(directory: Path, root: Path, netns: str, name: str | None = None, port: int = 8080,
            volume: str = "/srv/notes", launcher: str = "nsenter-net",
            edit=lambda text: text):
    """Install and start a service (its manifest's text passed through `edit`); down,
    uninstall and remove its user on the way out."""
    name = name or new_service_name()
    manifest = service_manifest(directory, name, port, volume)
    manifest.write_text(edit(manifest.read_text()))
    svc = Contained(name, netns, root, manifest, port, launcher)
    try:
        with installed_and_up(svc):
            yield svc
    finally:
        # only this service's user: other tests may be running their own corral-tst* services
        subprocess.run(["userdel", svc.user], capture_output=True)


# -------------------------------------------------------------------------- the host's state

def file_state(path: str | Path) -> tuple[str, int, int, int]:
    """(sha256, mode, size, mtime_ns) of a file, following symlinks."""
    st = os.stat(path)
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return digest, st.st_mode, st.st_size, st.st_mtime_ns


def tree_state(top: Path) -> dict[str, tuple]:
    """Every entry under `top` (not following symlinks): type, mode, owner, size, mtime and the
    sha256 of regular files. Equal before and after: nothing under `top` changed."""
    out = {}
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            entry = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_size,
                     st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    entry += (hashlib.file_digest(handle, "sha256").hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            out[os.path.relpath(path, top)] = entry
    return out


def diff_trees(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cgroup_mounts() -> dict[str, str]:
    """controller (or "unified") -> mount point, from the host's (this process's) mountinfo."""
    mounts = {}
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split()[:3]
            point = left.split()[4]
            if fstype == "cgroup2":
                mounts.setdefault("unified", point)
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, point)
    return mounts


def host_limits(pid: int) -> dict[str, int | None]:
    """The memory and pids limits the kernel applies to `pid`, read on the host (v1 or v2);
    None when no limit is in force (no controller, or "max" all the way up)."""
    mounts = _cgroup_mounts()
    groups = {}
    with open(f"/proc/{pid}/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in (controllers.split(",") if controllers else ["unified"]):
                groups[controller] = path

    def lowest(controller: str, names: tuple[str, ...]) -> int | None:
        mount = mounts.get(controller)
        if controller != "unified" and mount is None:
            return None
        path = groups.get(controller)
        if mount is None or path is None:
            return None
        values = []
        directory = Path(mount + path)
        while True:  # the effective limit is the lowest on the way up to the mount
            for name in names:
                try:
                    text = (directory / name).read_text().strip()
                except OSError:
                    continue
                if text.isdigit() and int(text) < 1 << 62:
                    values.append(int(text))
            if str(directory) == mount or directory == directory.parent:
                break
            directory = directory.parent
        return min(values) if values else None

    memory = lowest("memory", ("memory.limit_in_bytes",))
    pids = lowest("pids", ("pids.max",))
    if memory is None:
        memory = lowest("unified", ("memory.max",))
    if pids is None:
        pids = lowest("unified", ("pids.max",))
    return {"memory": memory, "pids": pids}


def nft_table(netns: str, service: str) -> dict:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet",
                          f"corral-{service}"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def nft_counters(netns: str, service: str) -> dict[str, int]:
    """Packets counted by each commented drop rule of the service ("egress", "spoof", ...)."""
    counts = {}
    for item in nft_table(netns, service)["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment"):
            for expr in rule["expr"]:
                if "counter" in expr:
                    counts[rule["comment"]] = expr["counter"]["packets"]
    return counts


def nft_rules_without_counters(netns: str, service: str) -> str:
    text = json.dumps(nft_table(netns, service)["nftables"], sort_keys=True)
    return re.sub(r'"(packets|bytes|handle)": \d+', r'"\1": 0', text)

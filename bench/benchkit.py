"""Shared by bench/runtime.py, bench/watch_latency.py and bench/recover_time.py: the throwaway
world (temp dir, CORRAL_ROOT, network namespace, the sample service under a benchmark name) and
a run's start and end (root check, signals, results file, report), statistics and progress lines.

A world is named after the benchmark's pid: temp dir /tmp/PREFIX-PID, netns PREFIX-PID,
services TAG+PID+suffix (users corral-TAG+PID+suffix-app). Everything in it is removed at the
end, also on failure or Ctrl-C; what a run that was killed outright left is removed by the next
run of the same benchmark (only worlds whose pid is dead are touched).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORRAL = REPO / ".venv" / "bin" / "corral"
VENV_PY = REPO / ".venv" / "bin" / "python"
NOTES_PY = REPO / "examples" / "notes" / "notes.py"
TMP = Path("/tmp")
RESULTS_DIR = TMP / "corral-bench-results"


def progress(message: str) -> None:
    """Progress goes to stderr, and only when it is a terminal."""
    if sys.stderr.isatty():
        print(f"bench: {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def sh(*cmd: str, input: str | None = None, check: bool = True, timeout: float = 300) -> str:
    """Run a command and return its output; a failure raises with the end of what it said."""
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def warn(message: str) -> None:
    print(f"bench: warning: {message}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def stats(values: list[float], digits: int = 2) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 50), digits),
            "p90": round(percentile(values, 90), digits),
            "p99": round(percentile(values, 99), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "mean": round(statistics.fmean(values), digits)}


def aligned(rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain table: columns padded to their widest cell; numbers right-aligned."""
    right = right if right is not None else set(range(1, len(rows[0])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    def first(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
            return out.strip().splitlines()[0] if out.strip() else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "code": code_version(),
            "debian": Path("/etc/debian_version").read_text().strip()
            if Path("/etc/debian_version").exists() else "",
            "python": first([str(VENV_PY), "--version"]),
            "loadavg_before": round(os.getloadavg()[0], 2)}


def code_version() -> str:
    """The commit and whether src/ differs from it (read-only git calls), so that a run can
    tell when the code it measured changed under it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args],
                                  capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    tree = git("rev-parse", "--short", "HEAD:src") or "unknown"
    version = f"{head} (src tree {tree})"
    if git("status", "--porcelain", "--", "src"):
        stamp = max((p.stat().st_mtime for p in (REPO / "src").rglob("*.py")), default=0)
        newest = time.strftime("%H:%M:%S", time.localtime(stamp))
        version += f" + uncommitted src changes (newest {newest})"
    return version


def src_of(version: str) -> str:
    """The part of code_version() that says what corral's code was (commits of bench/ or
    docs/ in between do not change what was measured)."""
    return version.split(" ", 1)[1] if " " in version else version


def finish_machine(report: dict[str, Any]) -> None:
    m = report["machine"]
    m["code_after"] = code_version()
    m["code_changed_during_run"] = src_of(m["code_after"]) != src_of(m.get("code", ""))
    if m["code_changed_during_run"]:
        warn(f"corral's code changed during the run ({m.get('code')} -> {m['code_after']}):"
             " its numbers may mix two versions")
    note_load(report)


def note_load(report: dict[str, Any]) -> None:
    """The load average after the run, next to report["machine"]["loadavg_before"], and
    whether the run was noisy."""
    m = report["machine"]
    m["loadavg_after"] = round(os.getloadavg()[0], 2)
    cpus = os.cpu_count() or 1
    # The benchmark keeps about one CPU busy itself: more than that is someone else's work.
    report["noisy"] = m["loadavg_before"] >= 0.5 * cpus or m["loadavg_after"] >= cpus


def write_results(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.rename(tmp, path)


def publish(report: dict[str, Any], out: Path, as_json: bool, text: Callable[[], str]) -> None:
    """Write the results file, then print the report: one JSON document (and on stderr where
    the file is) with --json, else text()."""
    write_results(out, report)
    if as_json:
        print(json.dumps(report, indent=2))
        print(f"bench: results in {out}", file=sys.stderr)
    else:
        print(text())


def end_run(report: dict[str, Any], started: float, out: Path, as_json: bool,
            table: Callable[[dict[str, Any]], str]) -> None:
    """The end of a watch or recover run that went through: finish_machine(), the run's
    length, then publish() with the table and a line on how long it took, on which code and
    load, and where the results are."""
    finish_machine(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    m = report["machine"]
    publish(report, out, as_json, lambda: (
        f"{table(report)}\n\n{report['elapsed_s']:.0f} s, code {m['code']} (load "
        f"{m['loadavg_before']} before, {m['loadavg_after']} after); results in {out}"))


def ensure_root_and_venv() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench: must run as root (users, network namespaces, nftables, mounts)")
    if not CORRAL.exists():
        raise SystemExit(f"bench: {CORRAL} missing: run `make venv` first")


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def prepare_run(prefix: str, tag: str) -> None:
    """Before a run: root and the venv checked, SIGTERM and SIGHUP turned into
    KeyboardInterrupt (so that the world is cleaned up then too), and what earlier runs that
    were killed left removed (clean_stale)."""
    ensure_root_and_venv()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    clean_stale(prefix, tag)


# -- the throwaway world ---------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return found[::-1]


class World:
    """Temp dir, CORRAL_ROOT, netns and services of one run, named after its pid."""

    def __init__(self, prefix: str, tag: str, pid: int | None = None):
        self.prefix, self.tag = prefix, tag  # e.g. "corral-bwatch-", "cw"
        self.pid = pid or os.getpid()
        self.installed: list[str] = []
        self.netns_made = False
        self.cleanups: list[Any] = []  # callables run first at destroy (fail2ban, monitors)

    @property
    def dir(self) -> Path:
        return TMP / f"{self.prefix}{self.pid}"

    @property
    def netns(self) -> str:
        return f"{self.prefix}{self.pid}"

    @property
    def root(self) -> Path:
        return self.dir / "corral-root"

    def service(self, suffix: str) -> str:
        return f"{self.tag}{self.pid}{suffix}"  # manifest names: ^[a-z][a-z0-9-]{0,15}$

    def enter(self) -> list[str]:
        """Only the network namespace: `ip netns exec` would also remount /sys, which hides
        the cgroup file systems from corral."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CORRAL_DEBUG"}
        env["CORRAL_ROOT"] = str(self.root)
        return env

    def state_dir(self, name: str) -> Path:
        return self.root / "var/lib/corral" / name

    def run_dir(self, name: str) -> Path:
        return self.root / "run/corral" / name

    def base_root(self, name: str) -> Path:
        spec = json.loads((self.state_dir(name) / "runtime.json").read_text())
        return self.state_dir(name) / "base" / str(spec["base_version"]) / "root"

    def read_state(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir(name) / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def create(self) -> None:
        self.dir.mkdir(mode=0o755)
        self.root.mkdir()
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self.netns_made = True
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)

    def argv(self, *args: str) -> list[str]:
        return self.enter() + [str(CORRAL), *args]

    def corral(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True,
                                env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"corral {' '.join(args)} failed ({result.returncode}): "
                               f"{(result.stderr.strip() or result.stdout.strip())[-800:]}")
        return result

    def timed_corral(self, *args: str, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
        """Wall milliseconds of one CLI call (its start-up included), and its stdout."""
        argv = self.argv(*args)
        env = self.env()
        t0 = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        elapsed = (time.perf_counter() - t0) * 1000
        if result.returncode not in ok:
            raise RuntimeError(f"corral {' '.join(args)} exited {result.returncode}: "
                               f"{(result.stderr.strip() or result.stdout.strip())[-800:]}")
        return elapsed, result.stdout

    def install(self, manifest: Path, name: str) -> None:
        self.installed.append(name)  # before: a half-done install is undone too
        self.corral("install", str(manifest))

    def up_without(self, manifest: Path, name: str, skips: list[str]) -> None:
        """`corral up` of an installed service for attribution: the launch mechanisms among
        `skips` (and any CORRAL_BENCH_SKIP of the environment) off (launch.benchskip); "nft"
        among them flushes the service's table (in the benchmark's own namespace) after the
        start. Stopped at the end."""
        env = self.env()
        launch = [s for s in skips if s != "nft"]
        launch += [s for s in os.environ.get("CORRAL_BENCH_SKIP", "").split(",") if s]
        if launch:
            env["CORRAL_BENCH_SKIP"] = ",".join(launch)
        result = subprocess.run(self.argv("up", str(manifest)), capture_output=True, text=True,
                                env=env, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"corral up {name}: {(result.stderr or result.stdout)[-800:]}")
        self.cleanups.append(lambda: self.corral("down", name, check=False))
        if "nft" in skips:
            subprocess.run(self.enter() + ["nft", "flush", "table", "inet", f"corral-{name}"],
                           check=True)

    def destroy(self) -> list[str]:
        """Remove everything; return what could not be removed (reported, never raised)."""
        problems = []
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - go on cleaning
                problems.append(f"{getattr(cleanup, '__name__', cleanup)}: {exc}")
        for name in self.installed:
            if not self.state_dir(name).exists():
                continue
            try:
                result = self.corral("uninstall", name, "--purge", check=False)
                if result.returncode != 0:
                    problems.append(f"uninstall {name}: {result.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append(f"uninstall {name}: timed out")
        self._remove_users()
        for point in _mounts_under(self.dir):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            problems.append(f"could not remove {self.dir}")
        if self.netns_made:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        return problems

    def _remove_users(self) -> None:
        """Users of this run's services an uninstall could not remove: only
        corral-TAG+PID+suffix-PROCESS carrying corral's marker."""
        pattern = re.compile(rf"corral-{self.tag}{self.pid}[a-z]?-[a-z0-9]+")
        for entry in pwd.getpwall():
            if pattern.fullmatch(entry.pw_name) and entry.pw_gecos.startswith("corral service"):
                subprocess.run(["userdel", entry.pw_name], capture_output=True)


@contextlib.contextmanager
def throwaway(world: World) -> Iterator[World]:
    """`with throwaway(world):` creates the world, runs the body and always destroys it
    (reporting what could not be removed). Ctrl-C or a signal ends the program with status
    130, a failure (RuntimeError, a subprocess's, OSError) with status 1, each after saying
    so on stderr."""
    try:
        world.create()
        yield world
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        progress("cleaning up")
        for problem in world.destroy():
            warn(problem)


def clean_stale(prefix: str, tag: str, extra: Any = None) -> None:
    """What an earlier run of the same benchmark that was killed left (its temp dir, services,
    users, netns), recognised by a dead pid in the names; also what bears this run's own pid
    (called before this run's world exists: a dead run's, whose pid came round again).
    `extra(world)` cleans more."""
    me = os.getpid()
    pids = set()
    for path in TMP.glob(f"{prefix}*"):
        if re.fullmatch(rf"{re.escape(prefix)}\d+", path.name):
            pids.add(int(path.name[len(prefix):]))
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        match = re.match(rf"{re.escape(prefix)}(\d+)\b", line)
        if match:
            pids.add(int(match.group(1)))
    for pid in sorted(pids):
        if pid != me and _pid_alive(pid):
            continue  # another run is going on: not ours to touch
        stale = World(prefix, tag, pid=pid)
        stale.netns_made = f"{prefix}{pid}" in listing
        if not stale.netns_made:  # uninstall runs in a netns (the table went with it anyway)
            subprocess.run(["ip", "netns", "add", stale.netns], capture_output=True)
            stale.netns_made = True
        lib = stale.root / "var/lib/corral"
        stale.installed = sorted(p.name for p in lib.iterdir()) if lib.is_dir() else []
        warn(f"cleaning what an interrupted run (pid {pid}) left")
        if extra is not None:
            extra(stale)
        for problem in stale.destroy():
            warn(problem)


def sweep_stale(prefix: str, script: str, user: str, mark: str) -> None:
    """What earlier runs of a bench script left whose process is gone (a pid whose command line
    no longer names `script`): network namespaces PREFIX-PID[-p] (first killing what still runs
    in them: the run's own servers), users matching `user` (a pattern whose group 1 is the pid)
    that bear `mark` in their GECOS, and temporary directories PREFIX-PID-*."""
    def dead(pid: int) -> bool:
        try:  # a zombie has an empty command line; a reused pid runs something else
            return (pid != os.getpid()
                    and script.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            return True

    for line in sh("ip", "netns", "list", check=False).splitlines():
        match = re.match(rf"({re.escape(prefix)}-(\d+)(-p)?)\b", line)
        if match and dead(int(match.group(2))):
            for pid in sh("ip", "netns", "pids", match.group(1), check=False).split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", match.group(1), check=False)
    for entry in pwd.getpwall():
        match = re.fullmatch(user, entry.pw_name)
        if match and entry.pw_gecos == mark and dead(int(match.group(1))):
            sh("userdel", entry.pw_name, check=False)
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}-*"):  # where mkdtemp made them
        match = re.match(rf"{re.escape(prefix)}-(\d+)-", path.name)
        if match and path.is_dir() and dead(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


# -- the sample service ----------------------------------------------------------------------
NOTES_LIMITS = '{ memory = "128M", pids = 32, open_files = 256, cpu = 0.5 }'


def notes_manifest(path: Path, name: str, port: int = 8080, react: str | None = None,
                   app_extra: str = "", add: dict[str, str] | None = None,
                   image_extra: str = "", limits: str = NOTES_LIMITS) -> Path:
    """The sample "notes" service under a benchmark name: the same containment as
    examples/notes (and tests/conftest.py's notes_manifest), on `port`."""
    added = {"/opt/notes/notes.py": str(NOTES_PY)} | (add or {})
    add_text = ", ".join(f'"{k}" = "{v}"' for k, v in added.items())
    watch = f'\n[watch]\nreact = "{react}"\n' if react else ""
    path.write_text(f'''name = "{name}"
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11"]
add = {{ {add_text} }}
{image_extra}
[[volume]]
path = "/srv/notes"
owner = "app"
mode = "0750"
[process.app]
command = ["/usr/bin/python3.11", "-I", "/opt/notes/notes.py", "{port}"]
listen = ["tcp/{port}"]
connect = ["udp/53@127.0.0.53"]
limits = {limits}
environment = {{ LANG = "C.UTF-8", NOTES_DIR = "/srv/notes" }}
{app_extra}
{watch}''')
    return path


def listening(pid: int, port: int) -> bool:
    """Whether the process's network namespace has a TCP socket listening on `port`."""
    wanted = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[1].endswith(wanted) and fields[3] == "0A":
                        return True
        except (OSError, StopIteration):
            continue
    return False


def parse_iso(text: str | None) -> float | None:
    """corral's timestamps ("2025-01-01T12:00:00.123456Z", UTC) as epoch seconds."""
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

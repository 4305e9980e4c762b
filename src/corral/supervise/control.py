"""Run-time commands on an installed service: up, run, down, status, exec."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys
import time

from corral.core.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_EXEC_FAILED,
    EXIT_NOT_FOUND,
    ExecFailure,
    RuntimeFailure,
    UsageError,
)
from corral.core.paths import lib_root, run_dir
from corral.host import runtime
from corral.host.runtime import ServiceSpec
from corral.watch import incidents

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any, TypeGuard

READY_TIMEOUT = 30.0
# After every process runs and listens, `up` watches this long before it says "started": a
# service that trips a wire at start reverts (or crashes) within milliseconds, and must not be
# reported as started only because the first look came before that.
SETTLE = 0.5


def spec_of(service: str) -> ServiceSpec:
    spec = runtime.read(service)
    if spec is None:
        raise UsageError(f"{service}: not installed (corral install FILE first)")
    return spec


def read_state(service: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir(service), "state.json"), "rb") as handle:
            return json.loads(handle.read())
    except (FileNotFoundError, ValueError):
        return None


def supervisor_alive(state: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    if not state or state.get("phase") in ("stopped", "exited", "killed"):
        return False
    pid = state.get("supervisor")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"corral" in handle.read()  # `corral run` or `-m corral.supervise.daemon`
    except (OSError, TypeError):
        return False


def _supervisor_argv(service: str) -> list[str]:
    return [sys.executable, "-m", "corral.supervise.daemon", service]


def _archives(spec: ServiceSpec) -> list[dict[str, Any]]:
    from corral.recover.archive import (
        list_archives,  # tarfile: only status needs it, not the launch path
    )

    return list_archives(os.path.join(spec.state, "archives"))


def run(service: str) -> int:
    """Foreground: this process is the supervisor; its exit code is the service's."""
    from corral.launch import cgprime

    cgprime.start()  # started by cli.entry already, before any other import: see there
    import gc

    from corral.supervise import supervisor

    gc.freeze()  # what the imports made lives as long as the supervisor: never collected
    gc.enable()  # off since cli.entry, for the imports only

    spec_of(service)
    if supervisor_alive(read_state(service)):
        raise RuntimeFailure(f"{service}: already running")
    return supervisor.main([service, "--foreground"])


def up(service: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Start the supervisor in the background; return when every process runs and listens."""
    spec = spec_of(service)
    if supervisor_alive(read_state(service)):
        return {"service": service, "changed": False, "state": read_state(service)}
    os.makedirs(spec.run, mode=0o700, exist_ok=True)
    _unlink(os.path.join(spec.run, "state.json"))
    supervisor_log = os.path.join(spec.run, "supervisor.log")
    with open(supervisor_log, "ab") as log:
        import subprocess  # `up` only: the launch path (`run`) has no use for it

        proc = subprocess.Popen(_supervisor_argv(service), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(service)
        if proc.poll() is not None and (not state or state.get("phase") != "running"):
            detail = (state or {}).get("error") or _tail(supervisor_log)
            raise RuntimeFailure(f"{service}: did not start: {detail}")
        trouble = _start_trouble(spec, state)
        if trouble:
            down(service)
            raise RuntimeFailure(f"{service}: did not start: {trouble}")
        if any(p.get("state") == "setup" for p in ((state or {}).get("processes") or {})
               .values()):
            deadline = max(deadline, time.monotonic() + 1.0)  # bounded by the setup's timeout
        if state and state.get("phase") == "running" and _all_listening(spec, state):
            settled = _settled(spec, service)
            return {"service": service, "changed": True, "state": settled}
        time.sleep(0.02)
    down(service)
    raise RuntimeFailure(f"{service}: not ready within {timeout:.0f}s (processes running and "
                         "declared ports listening); stopped again")


def _start_trouble(spec: ServiceSpec, state: dict[str, Any] | None) -> str:
    if state and state.get("phase") in ("failed", "killed"):
        return str(state.get("error") or state.get("phase"))
    if state and state.get("reverts"):
        return _reverted(spec, state)
    return _crashed_during_start(spec, state)


def _settled(spec: ServiceSpec, service: str) -> dict[str, Any]:
    """Watch the started service for SETTLE seconds; raise if it reverted, crashed or ended."""
    first = read_state(service) or {}
    restarts = {n: p.get("restarts", 0) for n, p in (first.get("processes") or {}).items()}
    end = time.monotonic() + SETTLE
    while True:
        state = read_state(service) or {}
        trouble = _start_trouble(spec, state)
        if not trouble and not supervisor_alive(state):
            trouble = str(state.get("error") or f"the supervisor ended ({state.get('phase')})")
        for name, pstate in (state.get("processes") or {}).items():
            if not trouble and pstate.get("restarts", 0) > restarts.get(name, 0):
                trouble = f"process {name} crashed and was restarted right after it started"
        if trouble:
            down(service)
            raise RuntimeFailure(f"{service}: did not start: {trouble} (seen within "
                                 f"{SETTLE}s of starting); stopped")
        if time.monotonic() >= end:
            return state
        time.sleep(0.05)


def _reverted(spec: ServiceSpec, state: dict[str, Any]) -> str:
    """A revert while starting: an incident tripped; name it."""
    records = incidents.open_ones(spec.state)
    last = records[-1] if records else {}
    what = (f"incident {last.get('tripwire')} in process {last.get('process')} "
            f"({last.get('detail')})") if last else "an incident"
    return (f"{what} made corral revert it {state.get('reverts')} time(s) right after it "
            "started (corral incidents " + spec.service + ")")


def _crashed_during_start(spec: ServiceSpec, state: dict[str, Any] | None) -> str:
    """A process that exits before the service is ready will not get better by waiting. The
    excerpt is this run's output (the supervisor keeps the last lines since each start)."""
    for name, pstate in ((state or {}).get("processes") or {}).items():
        if pstate.get("state") in ("backoff", "failed", "exited"):
            said = " | ".join((pstate.get("output") or [])[-3:]) or "no output"
            if pstate.get("error"):
                return f"process {name}: {pstate['error']}"
            code = pstate.get("exit_code")
            if code == 0:
                return (f"process {name} exited with code 0 before the service was ready; its "
                        f"output: {said}. A server that forks into the background (daemonizes) "
                        "cannot run here: the exit of the first process ends its PID namespace "
                        "and every process in it. Run it in the foreground (nginx: "
                        "\"daemon off;\", redis: --daemonize no)")
            return f"process {name} exited with code {code}; its output: {said}"
    return ""


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path) as handle:
            return " | ".join(handle.read().strip().splitlines()[-lines:])
    except OSError:
        return "no log"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _all_listening(spec: ServiceSpec, state: dict[str, Any]) -> bool:
    # network = "own": the sockets are in the service's namespace, /proc/PID/net shows it
    pids = [p.get("pid") for p in state["processes"].values() if p.get("pid")]
    listening = listening_sockets(pids[0] if spec.own_network and pids else "self")
    for proc in spec.processes:
        pstate = state["processes"].get(proc.name, {})
        if pstate.get("state") != "running":
            return False
        for entry in proc.listen:
            proto, ports = entry.split("/")
            first = int(ports.split("-")[0])
            if (proto, first, proc.uid) not in listening:
                return False
    return True


def listening_sockets(net_pid: int | str = "self") -> set[tuple[str, int, int]]:
    """(proto, port, uid) of every listening TCP socket and bound UDP socket in the network
    namespace of `net_pid` (ours: the host's)."""
    from corral.kernel import procnet

    return {(s.proto, s.port, s.uid) for s in procnet.listening(net_pid)}


def down(service: str, timeout: float | None = None) -> dict[str, Any]:
    """Stop the supervisor (it stops every process, unmounts, removes cgroups), then clean up
    whatever a dead supervisor left: no process, mount or cgroup stays behind."""
    spec = spec_of(service)
    if timeout is None:  # each process gets its stop_timeout; the supervisor a margin beyond
        timeout = max((float(p.stop_timeout) for p in spec.processes), default=10.0) + 20.0
    state = read_state(service)
    changed = False
    if supervisor_alive(state):
        os.kill(state["supervisor"], signal.SIGTERM)
        changed = True
        deadline = time.monotonic() + timeout
        while supervisor_alive(read_state(service)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if supervisor_alive(read_state(service)):
            os.kill(state["supervisor"], signal.SIGKILL)
            time.sleep(0.1)
    _cleanup(spec)
    return {"service": service, "changed": changed}


def _cleanup(spec: ServiceSpec) -> None:
    from corral.launch import cgroup, mnt

    cgroup.remove_service(spec.service)
    mnt.unmount_delta(spec.delta_dir, spec.delta)
    if spec.own_network or os.path.exists(os.path.join(spec.run, "network.json")):  # netns, NAT
        from corral.host import netns

        netns.remove(spec.service)
    for name in ("state.json", "supervisor.lock"):
        _unlink(os.path.join(spec.run, name))


def status(service: str | None) -> list[dict[str, Any]]:
    root = lib_root()
    names = [service] if service else sorted(
        name for name in os.listdir(root)
        if os.path.exists(os.path.join(root, name, runtime.RUNTIME))) \
        if os.path.isdir(root) else []
    return [_status_of(name) for name in names]


def _status_of(service: str) -> dict[str, Any]:
    spec = spec_of(service)
    state = read_state(service)
    alive = supervisor_alive(state)
    processes = []
    for proc in spec.processes:
        pstate = (state or {}).get("processes", {}).get(proc.name, {}) if alive else {}
        processes.append({
            "name": proc.name, "user": proc.user, "uid": proc.uid,
            "state": pstate.get("state", "down"), "pid": pstate.get("pid"),
            "restarts": pstate.get("restarts", 0), "exit_code": pstate.get("exit_code"),
            "error": pstate.get("error") or None, "listen": proc.listen,
        })
    ended = (state or {}).get("phase") if (state or {}).get("phase") in (
        "failed", "exited", "killed") else None
    return {
        "service": service,
        "state": (state or {}).get("phase", "down") if alive else (ended or "down"),
        "error": (state or {}).get("error") or None if (alive or ended) else None,
        "supervisor": (state or {}).get("supervisor") if alive else None,
        "base_version": spec.base_version,
        "delta": {"kind": spec.delta, "bytes": _delta_bytes(spec) if alive else 0},
        "landlock": (state or {}).get("landlock") if alive else None,
        "warnings": (state or {}).get("warnings", []) if alive else [],
        "network": ((state or {}).get("network") if alive else None)
        or {"mode": "own" if spec.own_network else "host"},
        "processes": processes,
        "incidents": len(all_incidents := incidents.read(spec.state)),
        "open_incidents": sum(1 for i in all_incidents if not i.get("closed_at")),
        "isolated": bool((state or {}).get("isolated")) if alive else False,
        "sensors": (state or {}).get("sensors") if alive else None,
        "audit_records": (state or {}).get("audit_records") if alive else None,
        "journals": (state or {}).get("journals") if alive else None,
        "journal_epochs": _journal_epochs(spec),
        "reverts": (state or {}).get("reverts", 0) if alive else 0,
        "archives": _archives(spec),
        "enabled": _enabled(service),
    }


def _enabled(service: str) -> bool:
    from corral.host import unit  # pathlib: status only, not the launch path

    return unit.is_enabled(service)


def _delta_bytes(spec: ServiceSpec) -> int:
    """What the delta's files take, as far as the walk goes: `status` must show even when the
    service made its delta unwalkable (os.walk recursed and raised; the poller reports that)."""
    from corral.core import tree

    total = 0
    try:
        with tree.directory(os.path.join(spec.delta_dir, "upper")) as upper:
            for entry in tree.walk(upper, on_error=lambda *_: None,
                                   on_too_deep=lambda _: None):
                if not stat.S_ISDIR(entry.st.st_mode):
                    total += entry.st.st_blocks * 512
    except OSError:
        pass
    return total


def exec_in(service: str, process: str, argv: list[str]) -> int:
    from corral.launch import cgroup
    from corral.launch import pipeline as launch

    spec = spec_of(service)
    proc = spec.process(process)
    if proc is None:
        known = ", ".join(p.name for p in spec.processes)
        raise UsageError(f"{service}: no process {process!r} (processes: {known})")
    state = read_state(service)
    pid = ((state or {}).get("processes", {}).get(process) or {}).get("pid")
    if not supervisor_alive(state) or not pid:
        raise RuntimeFailure(f"{service}: process {process} is not running")
    group = cgroup.Cgroup.create(service, process, cgroup.Limits(
        memory=proc.limits.get("memory"), pids=proc.limits.get("pids"),
        cpu=proc.limits.get("cpu")))
    def forward(fd: int) -> None:
        """The command's exec listener goes to the supervisor, whose watcher answers it."""
        import socket

        from corral.kernel.notify import send_fd, unix_path

        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(10)
            short, dir_fd = unix_path(os.path.join(spec.run, "control.sock"))
            try:
                sock.connect(short)
            finally:
                os.close(dir_fd)
            send_fd(sock, fd, json.dumps({"process": process}).encode())
            if sock.recv(16) != b"ok":
                raise RuntimeFailure(f"{service}: the supervisor refused the exec session")

    try:
        return launch.run_inside(proc, pid, argv, group, forward)
    except launch.LaunchError as exc:  # what failed before the command ran
        code = EXIT_EXEC_FAILED
        if exc.stage == "exec":
            code = EXIT_NOT_FOUND if exc.errno in (errno.ENOENT, errno.ENOTDIR) \
                else EXIT_CANNOT_EXECUTE
        raise ExecFailure(f"{service}: exec in {process}: {exc}", code) from None
    except OSError as exc:
        raise ExecFailure(f"{service}: exec in {process}: {exc}") from None


def _upper_path(spec: ServiceSpec, state: dict[str, Any] | None) -> str:
    """The delta's upper layer, seen through the supervisor's mount namespace when it runs
    (the tmpfs may be mounted in a namespace other than ours, e.g. under `ip netns exec`)."""
    upper = os.path.join(spec.delta_dir, "upper")
    if supervisor_alive(state):
        return f"/proc/{state['supervisor']}/root{upper}"
    if spec.delta == "disk" and os.path.isdir(upper):
        return upper
    raise RuntimeFailure(f"{spec.service}: not running; its tmpfs delta was discarded at stop")


def delta_of(service: str) -> dict[str, Any]:
    from corral.core import text
    from corral.recover import delta
    from corral.supervise.supervisor import open_dirs

    spec = spec_of(service)
    state = read_state(service)
    with open_dirs(_upper_path(spec, state), spec.base_root) as (upper_fd, base_fd):
        found = delta.changes(upper_fd, base_fd)
    return {"service": service, "base_version": spec.base_version,
            "changes": [change_json(c.to_json()) for c in found],
            "base_writes": [text.show(c.path) for c in delta.base_writes(found)]}


def change_json(change: dict[str, Any]) -> dict[str, Any]:
    """One delta change as --json shows it: a size is `bytes` in every corral JSON object
    (status's delta, base list, archives), so the walker's `size` is renamed here."""
    if "size" in change:
        change = dict(change)
        change["bytes"] = change.pop("size")
    return change


def revert(service: str, reason: str = "revert", incident: str | None = None,
           timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Ask the supervisor to kill, archive the delta and restart from the clean base; return
    when every process runs and listens again."""
    spec = spec_of(service)
    state = read_state(service)
    if not supervisor_alive(state):
        raise RuntimeFailure(f"{service}: not running (start it with corral up)")
    before = state.get("reverts", 0)
    with open(os.path.join(spec.run, "revert-request.json"), "w") as request:
        request.write(json.dumps({"reason": reason, "incident": incident}))
    os.kill(state["supervisor"], signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = read_state(service) or {}
        if now.get("reverts", 0) > before and now.get("phase") == "running" \
                and _all_listening(spec, now):
            return {"service": service, "archive": now.get("last_archive"),
                    "base_version": now.get("base_version")}
        if not supervisor_alive(now):
            raise RuntimeFailure(f"{service}: the supervisor stopped during the revert")
        time.sleep(0.01)
    raise RuntimeFailure(f"{service}: not back within {timeout:.0f}s after the revert")


def open_incidents(spec: ServiceSpec) -> list[dict[str, Any]]:
    from corral.watch import incidents

    return incidents.open_ones(spec.state)


def commit_delta(service: str, allow: list[str]) -> dict[str, Any]:
    from contextlib import nullcontext

    from corral.host.base import CheckFailed
    from corral.recover import commit
    from corral.recover.journal.config import freezer
    from corral.supervise.supervisor import open_dirs

    spec = spec_of(service)
    if open_incidents(spec):  # a refusal by a check, as for executables: exit 3 both ways
        raise CheckFailed(f"{service}: an incident is open; commit refused until it is "
                          "closed (corral incidents)")
    state = read_state(service)
    # Check and copy are one walk; the service is frozen for it, so that the delta is the same
    # from its first file to its last (a running service swapped files behind the walk).
    with open_dirs(_upper_path(spec, state), spec.base_root) as (upper_fd, base_fd), \
            (freezer(spec)() if supervisor_alive(state) else nullcontext()):
        result = commit.commit(spec, upper_fd, base_fd, allow)
    if supervisor_alive(state):
        revert(service, reason="commit")
    # The names every --json uses for a base version (docs/cli.md).
    return {"service": result["service"], "base_version": result["version"],
            "from_base_version": result["from_version"],
            "changes": [change_json(c) for c in result["changes"]]}


def incidents_of(service: str | None) -> list[dict[str, Any]]:
    names = [service] if service else [s["service"] for s in status(None)]
    out: list[dict[str, Any]] = []
    for name in names:
        out.extend(incidents.read(spec_of(name).state))
    return sorted(out, key=lambda i: i.get("detected_at") or "")


def close_incidents(service: str, which: str) -> list[str]:
    closed = incidents.close(spec_of(service).state, which)
    if not closed and which != "all":
        raise UsageError(f"{service}: no open incident {which!r}")
    return closed


def _journal_epochs(spec: ServiceSpec) -> int:
    journaled = [v for v in spec.volumes if getattr(v, "journal", False)]
    if not journaled:
        return 0
    from corral.recover.journal.journal import Journal

    return sum(Journal(spec, v.store).info()["epoch"] for v in journaled)

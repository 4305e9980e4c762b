"""One cgroup per contained process, `corral/SERVICE/PROCESS`, on cgroup v1, v2 or both.

Each controller is used where mounted (/proc/self/mountinfo): the v1 hierarchy naming it, else
v2 if its cgroup.controllers lists it; one found nowhere is named by describe() and not limited.
v2 is joined whenever mounted, even with no controllers (hybrid): only it has cgroup.kill (atomic
against forks) and cgroup.freeze. `add` runs in a freshly forked child: it only writes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import select
import signal
import time
from collections.abc import Callable

from corral.core import mountinfo
from corral.core.netspec import parse_ports
from corral.core.record import record
from corral.kernel import bindguard

BASE = "corral"
CREATE_TRIES = 5  # Cgroup.create against concurrent remove_service calls of other services
CONTROLLERS = ("memory", "pids", "cpu", "freezer")
CPU_PERIOD = 100_000  # microseconds: the kernel's default period
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RESERVED = {"tasks", "notify_on_release", "release_agent"}  # v1 files whose names have no dot


@record(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpu: float | None = None  # CPUs: 0.5 -> 50000 of every 100000 us
    # Bench-only (launch.benchskip "cpu-group"): the highest cpu weight instead of the default,
    # so that the service's cgroup no longer competes for the CPUs as one task against others
    cpu_weight_max: bool = False
    # Bench-only (launch.benchskip "cpu-cgroup"): the processes are not moved into the cgroup of
    # the cpu hierarchy and stay in the supervisor's, as in no cpu cgroup of their own. Only
    # cgroup v1 can: v2 has one membership for every controller.
    cpu_cgroup: bool = True


@record(frozen=True)
class Hierarchy:
    name: str  # v1: its mount point's name, "memory", "cpu,cpuacct"...; v2: "unified"
    mount: str
    version: int
    controllers: frozenset[str]  # those of CONTROLLERS that corral takes from here


@record(frozen=True)
class Layout:
    hierarchies: tuple[Hierarchy, ...]
    v2: Hierarchy | None

    def home(self, controller: str) -> Hierarchy | None:
        return next((h for h in self.hierarchies if controller in h.controllers), None)


def parse_layout(text: str, read: Callable[[str], str]) -> Layout:
    """The hierarchies to use, from mountinfo text; `read` reads v2's cgroup.controllers."""
    found: list[Hierarchy] = []
    v2: str | None = None
    taken: set[str] = set()
    for mount in mountinfo.parse(text):
        if mount.fstype == "cgroup2" and v2 is None:
            v2 = mount.point
        elif mount.fstype == "cgroup":  # super options name the controllers: "rw,cpu,cpuacct"
            if ours := set(mount.super_options) & set(CONTROLLERS) - taken:  # mounted twice: 1st
                found.append(Hierarchy(os.path.basename(mount.point), mount.point, 1,
                                       frozenset(ours)))
                taken |= ours
    if v2:  # v2's freezer is core (cgroup.freeze), not a controller listed there
        on_v2 = set(read(f"{v2}/cgroup.controllers").split()) | {"freezer"}
        found.append(Hierarchy("unified", v2, 2, frozenset(on_v2 & set(CONTROLLERS) - taken)))
    return Layout(tuple(found), found[-1] if v2 else None)


@functools.cache
def layout() -> Layout:
    return parse_layout(_read(mountinfo.PATH), _read)


def describe() -> str:
    lay = layout()
    v1 = [c for c in CONTROLLERS if (h := lay.home(c)) and h.version == 1]
    parts = [f"v1 ({', '.join(v1)})"] if v1 else []
    if lay.v2:
        on_v2 = ", ".join(c for c in CONTROLLERS if c in lay.v2.controllers) or "unified"
        parts.append(f"v2 ({on_v2})")
    text = "cgroup " + " + ".join(parts) if parts else "no cgroup hierarchy: kill by signals"
    missing = [c for c in CONTROLLERS if not lay.home(c)]
    return text + (f"; missing: {', '.join(missing)} (not limited)" if missing else "")


def _read(path: str, default: str | None = None) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        if default is None:
            raise
        return default


def _write(path: str, value: str) -> None:
    """One write(2); errors come from write, not open, so name the file and value ourselves."""
    try:
        with open(path, "wb", buffering=0) as f:
            f.write(value.encode())
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (writing {value!r})", path) from None


def _number(d: str, name: str) -> int | None:  # None: "max", v1's huge "unlimited", no file
    text = _read(f"{d}/{name}", "").strip() if d else ""
    return int(text) if text.isdigit() and int(text) < 1 << 62 else None


def _keyed(d: str | None, name: str) -> dict[str, str]:  # "frozen 1\n..." -> {"frozen": "1"}
    text = _read(f"{d}/{name}", "") if d else ""
    return dict(line.split(None, 1) for line in text.splitlines() if " " in line)


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline, delay = time.monotonic() + timeout, 0.0002
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, "timed out waiting", what)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _wait_unpopulated(events: str, timeout: float) -> None:
    """Until the v2 cgroup.events file says "populated 0" (the cgroup and its descendants hold
    no live task), or `timeout`. The kernel notifies a change as POLLPRI on an open fd."""
    fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        deadline = time.monotonic() + timeout
        while b"populated 1" in os.pread(fd, 4096, 0):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            poller.poll(min(left, 0.05) * 1000)  # a missed wake-up costs 50 ms, not forever
    finally:
        os.close(fd)


def _rmdir(path: str) -> bool:
    """True once `path` is gone; False while it is busy (tasks still exiting) or not empty."""
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise
        return e.errno == errno.ENOENT
    return True


class Cgroup:
    def __init__(self, service: str, process: str):
        for name in (service, process):
            if not _NAME.fullmatch(name) or name in _RESERVED:
                raise ValueError(f"{name!r} cannot name a cgroup")
        self.service, self.process, self.layout = service, process, layout()
        self.name = f"{BASE}/{service}/{process}"
        self.paths = {h.name: os.path.join(h.mount, BASE, service, process)
                      for h in self.layout.hierarchies}
        self._procs = [os.path.join(p, "cgroup.procs") for p in self.paths.values()]
        self._v2 = self.paths[self.layout.v2.name] if self.layout.v2 else None
        version, d = self._dir("freezer")
        self._v1_freezer = f"{d}/freezer.state" if version == 1 else None
        # Tests turn these off to exercise the v1 ways on a machine that has both.
        self._use_cgroup_kill = self._use_v2_freezer = True
        self._bind_ring: int | None = None  # where the bind program reports refusals

    def _dir(self, controller: str) -> tuple[int, str]:
        h = self.layout.home(controller)
        return (h.version, self.paths[h.name]) if h else (0, "")  # 0: missing on this machine

    @classmethod
    def create(cls, service: str, process: str, limits: Limits) -> Cgroup:
        """Idempotent: an existing cgroup keeps its processes and gets the new limits."""
        cg = cls(service, process)
        for attempt in range(CREATE_TRIES):
            try:
                cg._make_dirs()
                break
            except FileNotFoundError:
                # Another service's remove_service took the shared `corral` parent away
                # between two of our mkdirs (it removes it once empty): make them again.
                if attempt == CREATE_TRIES - 1:
                    raise
        cg.set_limits(limits)
        if not limits.cpu_cgroup:
            version, d = cg._dir("cpu")
            if version != 1:
                raise OSError(errno.ENOTSUP, "cpu-cgroup: the processes can stay out of the cpu "
                              "controller's cgroup only on cgroup v1")
            cg._procs.remove(os.path.join(d, "cgroup.procs"))
        return cg

    def _make_dirs(self) -> None:
        for h in self.layout.hierarchies:
            # v2 hands a controller only to children of cgroups that enable it in subtree_control
            wanted, d = h.controllers - {"freezer"}, h.mount
            for child in (BASE, self.service, self.process) if h.version == 2 and wanted else ():
                if absent := sorted(wanted - set(_read(f"{d}/cgroup.subtree_control").split())):
                    _write(f"{d}/cgroup.subtree_control", " ".join(f"+{c}" for c in absent))
                d = os.path.join(d, child)
                os.makedirs(d, exist_ok=True)
            os.makedirs(self.paths[h.name], exist_ok=True)

    def set_limits(self, limits: Limits) -> None:
        # A limit the manifest asks for and no controller can enforce is an error, not a
        # silent no-op: the service would run with less containment than it declares.
        for controller, wanted in (("memory", limits.memory), ("pids", limits.pids)):
            if wanted and not self._dir(controller)[1]:
                raise OSError(errno.ENOTSUP, f"no cgroup {controller} controller mounted on this "
                              f"machine (see /proc/self/mountinfo); cannot enforce {controller} "
                              "limits")
        version, d = self._dir("memory")
        if version == 1:
            # memsw (memory+swap, if swap is accounted) equal to the limit: no swap. The kernel
            # wants memsw >= limit at every step: raise memsw first, lower it last.
            files, memsw = ["memory.limit_in_bytes"], f"{d}/memory.memsw.limit_in_bytes"
            if os.path.exists(memsw):
                raising = not limits.memory or limits.memory >= int(_read(memsw))
                files.insert(0 if raising else 1, "memory.memsw.limit_in_bytes")
            for name in files:
                _write(f"{d}/{name}", str(limits.memory or -1))  # -1: unlimited
        elif version == 2:
            _write(f"{d}/memory.max", str(limits.memory or "max"))
            if os.path.exists(f"{d}/memory.swap.max"):  # no swap: the limit is the limit
                _write(f"{d}/memory.swap.max", "0" if limits.memory else "max")
        if d := self._dir("pids")[1]:
            _write(f"{d}/pids.max", str(limits.pids or "max"))
        version, d = self._dir("cpu")
        quota = max(1000, round(limits.cpu * CPU_PERIOD)) if limits.cpu else None  # 1 ms floor
        if version == 1:
            _write(f"{d}/cpu.cfs_period_us", str(CPU_PERIOD))
            _write(f"{d}/cpu.cfs_quota_us", str(quota or -1))
            _write(f"{d}/cpu.shares", "262144" if limits.cpu_weight_max else "1024")
        elif version == 2:
            _write(f"{d}/cpu.max", f"{quota or 'max'} {CPU_PERIOD}")
            _write(f"{d}/cpu.weight", "10000" if limits.cpu_weight_max else "100")

    def guard_udp_binds(self, listen: list[str], ring_fd: int | None = None) -> None:
        """Let the processes of this cgroup bind only their own declared UDP ports (and 0):
        kernel.bindguard on the v2 cgroup, so a socket made here, by the program or by `corral
        exec`, can neither take another service's port nor hold it while that one is down.
        Each refusal is reported to the ring buffer `ring_fd` (kernel.bpfring), kept for later
        calls. Again at a reload: the new program replaces the old one at once."""
        if not self._v2:
            raise OSError(errno.ENOTSUP, "no cgroup v2 hierarchy: UDP binds are not guarded")
        ports = [(spec.first, spec.last) for spec in map(parse_ports, listen)
                 if spec.proto == "udp"]
        self._bind_ring = ring_fd if ring_fd is not None else self._bind_ring
        bindguard.attach(self._v2, ports, self._bind_ring)

    def add(self, pid: int) -> None:
        for path in self._procs:
            _write(path, str(pid))

    def pids(self) -> list[int]:
        """Every process in the cgroup or below it (the contained program may nest its own)."""
        return sorted({int(p) for top in self.paths.values() for d, _, _ in os.walk(top)
                       for p in _read(f"{d}/cgroup.procs", "").split()})

    def _v2_file(self, name: str, enabled: bool = True) -> str | None:
        path = f"{self._v2}/{name}" if self._v2 and enabled else None
        return path if path and os.path.exists(path) else None  # cgroup.kill: 5.14, freeze: 5.2

    def freeze(self, timeout: float = 5.0) -> None:
        """Returns once every process is frozen (a task in a syscall may take a moment)."""
        if v2 := self._v2_file("cgroup.freeze", self._use_v2_freezer):
            _write(v2, "1")
            _wait(lambda: _keyed(self._v2, "cgroup.events").get("frozen") == "1", timeout, v2)
        elif state := self._v1_freezer:
            def frozen_v1() -> bool:  # v1 may stay FREEZING on a straggler: FROZEN again retries
                _write(state, "FROZEN")
                return _read(state).strip() == "FROZEN"
            _wait(frozen_v1, timeout, state)
        else:
            raise OSError(errno.ENOTSUP, "no cgroup freezer on this machine", self.name)

    def thaw(self) -> None:
        """Thaws through both freezers: a v1-frozen task cannot even die of SIGKILL."""
        for path, value in ((self._v2_file("cgroup.freeze"), "0"), (self._v1_freezer, "THAWED")):
            if path:
                _write(path, value)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process; returns once none is left (zombies are no longer listed)."""
        self.start_kill()
        self.wait_empty(timeout)

    def start_kill(self) -> None:
        """Where cgroup.kill exists: SIGKILL every process of the cgroup now (forks in flight
        too), without waiting; wait_empty() then waits for them to be gone. Elsewhere nothing:
        wait_empty() does it all."""
        if kill := self._v2_file("cgroup.kill", self._use_cgroup_kill):
            _write(kill, "1")
            self.thaw()  # a task frozen by the v1 freezer cannot even die

    def wait_empty(self, timeout: float = 10.0) -> None:
        """Wait until start_kill's processes are gone, woken by the kernel: cgroup.events
        changes (POLLPRI) as the last one leaves, so the wait ends when the cgroup empties, not
        at the next step of a sleep back-off (which cost up to half the kill: the dying took
        5-14 ms, and a back-off's steps, listings and a freezer fallback came on top). Then, or
        without cgroup.kill, the rounds of kill_rounds() make sure (and raise if processes
        survive)."""
        events = self._v2_file("cgroup.events")
        if events and self._v2_file("cgroup.kill", self._use_cgroup_kill):
            _wait_unpopulated(events, min(timeout, 2.0))
        self.kill_rounds(timeout)

    def kill_rounds(self, timeout: float = 10.0) -> None:
        """List, signal, wait a little, until the cgroup is empty (the fallback, and the check)."""
        deadline, rounds = time.monotonic() + timeout, 0
        while left := self.pids():
            if rounds and time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"{left[:10]} survive SIGKILL", self.name)
            time.sleep(min(0.0005 * 2 ** rounds, 0.05) if rounds else 0)  # let the dying die
            # later rounds signal too, in case a process sits only in v1 hierarchies
            if (kill := self._v2_file("cgroup.kill", self._use_cgroup_kill)) and rounds < 3:
                _write(kill, "1")  # the kernel also kills forks in flight
                self.thaw()
            else:
                self._kill_frozen()
            rounds += 1

    def _kill_frozen(self) -> None:
        """Without cgroup.kill: freeze so nothing forks between listing and signalling, SIGKILL
        the list, thaw so the signals are delivered. kill_rounds() repeats it until the cgroup
        is empty."""
        frozen = bool(self._v2_file("cgroup.freeze", self._use_v2_freezer) or self._v1_freezer)
        if frozen:
            self.freeze()
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            if frozen:
                self.thaw()

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left, remove the cgroup in every hierarchy, then its parents if empty."""
        if self.pids():
            self.kill(timeout)
        for top in self.paths.values():
            # rmdir at once in the usual case (no nested cgroup, no task still exiting): the
            # walk's listings were half of a `corral run`'s cgroup removal
            if not _rmdir(top):
                for d, _, _ in os.walk(top, topdown=False):  # nested cgroups first
                    _wait(lambda: _rmdir(d), timeout, d)  # noqa: B023 - called at once
            parent = os.path.dirname(top)  # kept while another process or service uses it
            _rmdir(parent) and _rmdir(os.path.dirname(parent))

    def memory_peak(self) -> int | None:
        version, d = self._dir("memory")  # v2's memory.peak needs kernel 5.19
        return _number(d, "memory.peak" if version == 2 else "memory.max_usage_in_bytes")

    def stats(self) -> dict[str, int | bool | None]:
        """For `corral status`; None where this machine lacks the controller or the file."""
        (version, md), pd = self._dir("memory"), self._dir("pids")[1]
        v2 = version == 2
        oom = _keyed(md, "memory.events" if v2 else "memory.oom_control").get("oom_kill")
        state = self._v1_freezer
        frozen = (_keyed(self._v2, "cgroup.events").get("frozen") == "1"
                  or bool(state and _read(state).strip() != "THAWED"))
        return {"memory.current": _number(md, "memory.current" if v2 else "memory.usage_in_bytes"),
                "memory.max": _number(md, "memory.max" if v2 else "memory.limit_in_bytes"),
                "memory.peak": self.memory_peak(),
                "oom_kills": int(oom) if oom else None,
                "pids.current": _number(pd, "pids.current"),
                "pids.max": _number(pd, "pids.max"),
                "frozen": frozen}


def remove_service(service: str, timeout: float = 10.0) -> None:
    """Remove every corral/SERVICE/* cgroup: `corral down`, and cleanup after a crash."""
    if not _NAME.fullmatch(service) or service in _RESERVED:
        raise ValueError(f"{service!r} cannot name a cgroup")
    dirs = [os.path.join(h.mount, BASE, service) for h in layout().hierarchies]
    for name in sorted({e.name for d in dirs if os.path.isdir(d)
                        for e in os.scandir(d) if e.is_dir()}):
        if _NAME.fullmatch(name) and name not in _RESERVED:  # anything else is not corral's
            Cgroup(service, name).remove(timeout)
    for d in dirs:  # also when no process was left in it: a crash between two mkdirs
        _rmdir(d) and _rmdir(os.path.dirname(d))

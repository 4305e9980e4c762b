"""corral.launch.cgroup against the real cgroupfs. Every test works under corral/tst<hex>/ only, and
the fixtures remove those cgroups and reap the children even when a test fails."""

from __future__ import annotations

import errno
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import suppress

import pytest

from corral.launch import cgroup
from corral.launch.cgroup import BASE, Cgroup, Limits

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not cgroup.layout().hierarchies, reason="no cgroupfs mounted")]

MB = 1 << 20
# kill() ways: (use cgroup.kill, use v2's cgroup.freeze) - the last two are the fallback
KILL_WAYS = {"cgroup.kill": (True, True), "signals, v2 freezer": (False, True),
             "signals, v1 freezer": (False, False)}


@pytest.fixture
def service():
    name = "tst" + secrets.token_hex(4)
    yield name
    cgroup.remove_service(name)
    for h in cgroup.layout().hierarchies:
        assert not os.path.exists(os.path.join(h.mount, BASE, name))


@pytest.fixture
def spawn():
    """spawn(cg, body) forks a child that joins cg, as corral's holder does, then runs
    body(write_fd) and never returns into pytest. Returns (pid, read_fd)."""
    children, fds = [], []

    def start(cg: Cgroup, body) -> tuple[int, int]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                cg.add(os.getpid())
                body(w)
            except BaseException:  # noqa: BLE001 - never unwind into pytest's stack
                code = 70
            os._exit(code)
        os.close(w)
        children.append(pid)
        fds.append(r)
        return pid, r

    yield start
    for pid in children:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


def read_line(fd: int, timeout: float = 10.0) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no line, got {data!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"child closed the pipe after {data!r}"
        data += chunk
    return data.decode().strip()


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def wait_status(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        assert time.monotonic() < deadline, f"child {pid} still running"
        time.sleep(0.01)


def running_in(service: str) -> list[int]:
    """Every live (non-zombie) process on the machine that sits in a cgroup of `service`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                mine = f"/{BASE}/{service}/" in f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if mine and state != "Z":
            found.append(int(entry))
    return found


def gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def control(cg: Cgroup, controller: str, v1_file: str, v2_file: str) -> str:
    """The content of a controller's file, wherever this machine keeps that controller."""
    home = cg.layout.home(controller)
    if home is None:
        pytest.skip(f"no {controller} controller on this machine")
    with open(os.path.join(cg.paths[home.name], v1_file if home.version == 1 else v2_file)) as f:
        return f.read().strip()


def kill_way(cg: Cgroup, way: str) -> None:
    cg._use_cgroup_kill, cg._use_v2_freezer = KILL_WAYS[way]
    if way == "cgroup.kill" and not cg._v2_file("cgroup.kill"):
        pytest.skip("no cgroup.kill (kernel < 5.14 or no cgroup v2)")
    if way == "signals, v2 freezer" and not cg._v2_file("cgroup.freeze"):
        pytest.skip("no v2 cgroup.freeze")
    if way == "signals, v1 freezer" and not cg._v1_freezer:
        pytest.skip("no v1 freezer hierarchy")


# --- layout ---------------------------------------------------------------------------------

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
PURE_V2 = """\
25 1 0:22 / /sys rw,nosuid - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
"""


def test_parse_hybrid_takes_each_controller_where_mounted():
    lay = cgroup.parse_layout(HYBRID, lambda path: "hugetlb\n")
    assert [(h.name, h.version, sorted(h.controllers)) for h in lay.hierarchies] == [
        ("cpu,cpuacct", 1, ["cpu"]), ("memory", 1, ["memory"]), ("freezer", 1, ["freezer"]),
        ("unified", 2, [])]
    assert lay.home("pids") is None  # not mounted anywhere: skipped, not fatal
    assert lay.v2.mount == "/sys/fs/cgroup/unified"


def test_parse_pure_v2_and_nothing():
    lay = cgroup.parse_layout(PURE_V2, lambda path: "cpuset cpu io memory hugetlb pids rdma\n")
    assert len(lay.hierarchies) == 1 and lay.v2.mount == "/sys/fs/cgroup"
    assert lay.v2.controllers == {"memory", "pids", "cpu", "freezer"}
    assert cgroup.parse_layout("25 1 0:22 / /sys rw - sysfs sysfs rw\n", str).hierarchies == ()


def test_pure_v2_in_a_fake_tree(tmp_path, monkeypatch):
    """This machine is hybrid, so the v2 limit files are checked on a stand-in tree of plain
    files: the writes and their order, and delegation through cgroup.subtree_control."""
    root, app = tmp_path, tmp_path / BASE / "svc" / "app"
    app.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    for d in (root, root / BASE, root / BASE / "svc", app):
        (d / "cgroup.subtree_control").write_text("")
    for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cpu.weight",
                 "cgroup.procs"):
        (app / name).write_text("")
    mountinfo = f"29 25 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n"
    monkeypatch.setattr(cgroup, "layout", lambda: cgroup.parse_layout(mountinfo, cgroup._read))

    cg = Cgroup.create("svc", "app", Limits(memory=32 * MB, pids=5, cpu=0.5))
    assert cg.paths == {"unified": str(app)}
    for d in (root, root / BASE, root / BASE / "svc"):
        assert (d / "cgroup.subtree_control").read_text().split() == ["+cpu", "+memory", "+pids"]
    assert (app / "cgroup.subtree_control").read_text() == ""  # it holds processes
    files = {n: (app / n).read_text() for n in ("memory.max", "memory.swap.max", "pids.max",
                                               "cpu.max", "cpu.weight")}
    assert files == {"memory.max": str(32 * MB), "memory.swap.max": "0", "pids.max": "5",
                     "cpu.max": "50000 100000", "cpu.weight": "100"}
    Cgroup.create("svc", "app", Limits(cpu_weight_max=True))
    assert (app / "cpu.weight").read_text() == "10000"
    Cgroup.create("svc", "app", Limits())
    assert [(app / n).read_text() for n in files] == ["max", "max", "max", "max 100000", "100"]
    cg.add(4242)
    assert (app / "cgroup.procs").read_text() == "4242"


def test_layout_matches_this_machine():
    text = cgroup.describe()
    assert text.startswith("cgroup ")
    mounts = open("/proc/self/mountinfo").read()
    for c in cgroup.CONTROLLERS:
        home = cgroup.layout().home(c)
        assert (home is not None and f" {home.mount} " in mounts) or c in text.split("missing")[-1]


def test_names_must_be_path_components():
    for bad in ("", "..", "a/b", "tasks", "x.y", "a" * 65):
        with pytest.raises(ValueError):
            Cgroup("tstok", bad)


# --- create, add, pids, remove --------------------------------------------------------------

def test_round_trip(service, spawn):
    cg = Cgroup.create(service, "app", Limits(memory=64 * MB, pids=16, cpu=1.0))
    assert Cgroup.create(service, "app", Limits(memory=64 * MB, pids=16, cpu=1.0)).paths == cg.paths
    assert set(cg.paths) == {h.name for h in cg.layout.hierarchies}
    assert all(os.path.isdir(p) for p in cg.paths.values())
    pid, r = spawn(cg, lambda w: (os.write(w, b"in\n"), time.sleep(60)))
    assert read_line(r) == "in"
    assert cg.pids() == [pid]
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line for line in f.read().splitlines() if line.endswith(f"/{BASE}/{service}/app")]
    assert len(lines) == len(cg.paths)  # in every hierarchy
    assert cg.stats()["pids.current"] in (1, None)

    cg.remove()
    assert os.WTERMSIG(wait_status(pid)) == signal.SIGKILL
    for path in cg.paths.values():
        assert not os.path.exists(path)
        assert not os.path.exists(os.path.dirname(path))  # corral/SERVICE went with it
    assert cg.pids() == []
    cg.remove()  # idempotent


def test_a_failed_write_names_the_file(service):
    if cgroup.layout().home("pids") is None:
        pytest.skip("no pids controller")
    with pytest.raises(OSError) as caught:
        Cgroup.create(service, "app", Limits(pids=-5))
    assert caught.value.errno == errno.EINVAL
    assert "pids.max" in str(caught.value) and f"{BASE}/{service}/app" in str(caught.value)


# --- limits ---------------------------------------------------------------------------------

def test_pids_limit(service, spawn):
    cg = Cgroup.create(service, "app", Limits(pids=5))
    control(cg, "pids", "pids.max", "pids.max")

    def fork_20(w):
        forked, err = 0, 0
        for _ in range(20):
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
            except OSError as e:
                err = e.errno
                break
            forked += 1
        os.write(w, f"{forked} {err}\n".encode())
        time.sleep(60)

    pid, r = spawn(cg, fork_20)
    forked, err = map(int, read_line(r).split())
    assert err == errno.EAGAIN
    assert forked == 4  # itself plus four: five
    assert int(control(cg, "pids", "pids.current", "pids.current")) <= 5
    assert len(cg.pids()) <= 5
    cg.kill()
    assert cg.pids() == []


def test_memory_limit_kills_the_hog_not_the_runner(service, spawn):
    cg = Cgroup.create(service, "app", Limits(memory=32 * MB))
    assert control(cg, "memory", "memory.limit_in_bytes", "memory.max") == str(32 * MB)

    def hog(w):
        os.write(w, b"allocating\n")
        block = bytearray(200 * MB)
        for i in range(0, len(block), 4096):  # touch every page
            block[i] = 1
        os.write(w, b"survived\n")
        time.sleep(60)

    pid, r = spawn(cg, hog)
    assert read_line(r) == "allocating"
    status = wait_status(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    stats = cg.stats()
    assert stats["oom_kills"] is None or stats["oom_kills"] >= 1
    assert cg.memory_peak() is None or cg.memory_peak() <= 33 * MB
    assert os.getpid() and open("/proc/self/status").read()  # the runner lives on


def test_memory_limit_can_go_up_and_down(service):
    for memory in (64 * MB, 32 * MB, 128 * MB, None, 16 * MB):
        cg = Cgroup.create(service, "app", Limits(memory=memory))
        assert cg.stats()["memory.max"] == memory
        home = cg.layout.home("memory")
        memsw = os.path.join(cg.paths[home.name], "memory.memsw.limit_in_bytes")
        if home.version == 1 and os.path.exists(memsw):  # no swap: memory+swap == memory
            assert open(memsw).read().strip() == str(memory or 9223372036854771712)


def test_cpu_quota(service):
    cg = Cgroup.create(service, "app", Limits(cpu=0.5))
    home = cg.layout.home("cpu")
    if home is None:
        pytest.skip("no cpu controller")
    if home.version == 1:
        assert control(cg, "cpu", "cpu.cfs_quota_us", "") == "50000"
        assert control(cg, "cpu", "cpu.cfs_period_us", "") == "100000"
    else:
        assert control(cg, "cpu", "", "cpu.max") == "50000 100000"
    Cgroup.create(service, "app", Limits(cpu=2.0))
    assert control(cg, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] == "200000"
    Cgroup.create(service, "app", Limits())
    assert control(cg, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] in ("-1", "max")


def test_cpu_weight_is_the_default_unless_a_benchmark_asks_for_the_highest(service):
    """The service's cgroup competes for the CPUs with the default weight (one task's share
    against the machine's other tasks); launch.benchskip's "cpu-group" gives it the highest,
    so an attribution run can tell that share from the containment's own cost."""
    cg = Cgroup.create(service, "app", Limits(cpu_weight_max=True))
    if cg.layout.home("cpu") is None:
        pytest.skip("no cpu controller")
    assert control(cg, "cpu", "cpu.shares", "cpu.weight") in ("262144", "10000")
    Cgroup.create(service, "app", Limits())
    assert control(cg, "cpu", "cpu.shares", "cpu.weight") in ("1024", "100")


def test_a_benchmark_can_leave_the_processes_out_of_their_cpu_cgroup(service, spawn):
    """launch.benchskip's "cpu-cgroup": the process joins its cgroup in every hierarchy but the
    cpu one (cgroup v1), where it stays in its parent's, as if it had no cpu cgroup."""
    layout = cgroup.layout()
    home = layout.home("cpu")
    if home is None or home.version != 1:
        with pytest.raises(OSError, match="cgroup v1"):
            Cgroup.create(service, "app", Limits(cpu_cgroup=False))
        return
    cg = Cgroup.create(service, "app", Limits(cpu_cgroup=False))
    pid, r = spawn(cg, lambda w: (os.write(w, b"in\n"), time.sleep(30)))
    assert read_line(r) == "in"
    with open(f"/proc/{pid}/cgroup") as handle:
        lines = {line.split(":")[1]: line.split(":")[2].strip() for line in handle}
    cpu_line = next(v for k, v in lines.items() if "cpu" in k.split(","))
    memory_line = next((v for k, v in lines.items() if "memory" in k.split(",")), None)
    assert not cpu_line.endswith(f"/{BASE}/{service}/app")
    if memory_line is not None:
        assert memory_line.endswith(f"/{BASE}/{service}/app")
    cg2 = Cgroup.create(service, "two", Limits())
    pid2, r2 = spawn(cg2, lambda w: (os.write(w, b"in\n"), time.sleep(30)))
    assert read_line(r2) == "in"
    with open(f"/proc/{pid2}/cgroup") as handle:
        assert any(line.split(":")[2].strip().endswith(f"/{BASE}/{service}/two")
                   and "cpu" in line.split(":")[1].split(",") for line in handle)


# --- freeze, kill, remove -------------------------------------------------------------------

@pytest.mark.parametrize("freezer", ["v2", "v1"])
def test_freeze_and_thaw(service, spawn, freezer):
    cg = Cgroup.create(service, "app", Limits())
    cg._use_v2_freezer = freezer == "v2"
    if not (cg._v2_file("cgroup.freeze") if freezer == "v2" else cg._v1_freezer):
        pytest.skip(f"no {freezer} freezer")

    def count(w):
        i = 0
        while True:
            os.write(w, struct.pack("Q", i))
            i += 1
            time.sleep(0.002)

    pid, r = spawn(cg, count)
    os.set_blocking(r, False)

    def drain() -> int | None:
        data = b""
        with suppress(BlockingIOError):
            while chunk := os.read(r, 65536):
                data += chunk
        return struct.unpack("Q", data[-8:])[0] if data else None

    until(lambda: drain() is not None)
    started = time.monotonic()
    cg.freeze()
    took = time.monotonic() - started
    last = drain()  # what it wrote before it froze
    time.sleep(0.3)
    assert drain() is None, "the counter advanced while frozen"
    assert cg.stats()["frozen"] is True
    assert took < 1.0
    cg.thaw()
    resumed, deadline = None, time.monotonic() + 2
    while resumed is None and time.monotonic() < deadline:
        time.sleep(0.01)
        resumed = drain()
    assert resumed is not None and resumed > (last or 0), "no progress after thaw"
    assert cg.stats()["frozen"] is False


@pytest.mark.parametrize("way", KILL_WAYS)
def test_kill_a_tree_that_ignores_sigterm(service, spawn, way):
    cg = Cgroup.create(service, "app", Limits(pids=64))
    kill_way(cg, way)

    def tree(w):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kids = []
        for _ in range(10):
            kid = os.fork()
            if kid == 0:
                time.sleep(60)
                os._exit(0)
            kids.append(kid)
        os.write(w, (" ".join(map(str, kids)) + "\n").encode())
        time.sleep(60)

    pid, r = spawn(cg, tree)
    grandchildren = [int(p) for p in read_line(r).split()]
    until(lambda: len(cg.pids()) == 11)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.05)
    assert len(cg.pids()) == 11  # SIGTERM is ignored
    started = time.monotonic()
    cg.kill()
    took = time.monotonic() - started
    assert cg.pids() == []
    assert took < 2.0, f"kill took {took:.3f} s"
    assert os.WTERMSIG(wait_status(pid)) == signal.SIGKILL
    assert all(gone_or_zombie(p) for p in grandchildren)
    assert running_in(service) == []


@pytest.mark.parametrize("way", KILL_WAYS)
def test_kill_wins_against_a_fork_storm(service, spawn, way):
    cg = Cgroup.create(service, "app", Limits(pids=64))
    kill_way(cg, way)

    def storm(w):
        os.write(w, b"storming\n")
        while True:  # every process forks as fast as the pids limit lets it
            try:
                os.fork()
            except OSError:
                time.sleep(0.0005)

    pid, r = spawn(cg, storm)
    assert read_line(r) == "storming"
    until(lambda: len(cg.pids()) >= 32)
    started = time.monotonic()
    cg.kill()
    took = time.monotonic() - started
    assert cg.pids() == []
    time.sleep(0.1)
    assert cg.pids() == [] and running_in(service) == []  # no fork slipped through
    assert took < 5.0, f"kill took {took:.3f} s"


def test_remove_service_removes_everything(service, spawn):
    cgs = [Cgroup.create(service, name, Limits(pids=8)) for name in ("web", "db", "idle")]
    sleepers = [spawn(cg, lambda w: time.sleep(60))[0] for cg in cgs[:2]]
    until(lambda: all(cg.pids() for cg in cgs[:2]))
    for path in cgs[1].paths.values():  # a cgroup the contained program made for itself
        os.mkdir(os.path.join(path, "nested"))
    nested = cgs[1].pids()[0]
    for path in cgs[1].paths.values():
        with open(os.path.join(path, "nested", "cgroup.procs"), "w") as f:
            f.write(str(nested))
    assert cgs[1].pids() == [nested]  # still found, one level down

    cgroup.remove_service(service)
    for h in cgroup.layout().hierarchies:
        assert not os.path.exists(os.path.join(h.mount, BASE, service))
    for pid in sleepers:
        assert os.WTERMSIG(wait_status(pid)) == signal.SIGKILL
    assert running_in(service) == []
    cgroup.remove_service(service)  # nothing left: no error
    for h in cgroup.layout().hierarchies:  # a crash between mkdirs left an empty service cgroup
        os.makedirs(os.path.join(h.mount, BASE, service))
    cgroup.remove_service(service)
    assert not any(os.path.exists(os.path.join(h.mount, BASE, service))
                   for h in cgroup.layout().hierarchies)


# --- UDP binds (kernel.bindguard) -------------------------------------------------------------

def _binds(w: int) -> None:
    """In the child: which UDP binds (and one TCP) the cgroup's program lets through."""
    import socket

    out = []
    for family, kind, proto, port in ((socket.AF_INET, socket.SOCK_DGRAM, 0, 47001),
                                      (socket.AF_INET6, socket.SOCK_DGRAM, 0, 47005),
                                      (socket.AF_INET, socket.SOCK_DGRAM, 0, 47011),
                                      (socket.AF_INET, socket.SOCK_DGRAM, 0, 0),
                                      (socket.AF_INET, socket.SOCK_DGRAM, 136, 47012),
                                      (socket.AF_INET, socket.SOCK_STREAM, 0, 47013)):
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
                out.append("ok")
            except OSError as exc:
                out.append(errno.errorcode[exc.errno])
    os.write(w, (" ".join(out) + "\n").encode())


@pytest.mark.skipif(cgroup.layout().v2 is None, reason="no cgroup v2")
def test_udp_binds_only_to_declared_ports(service, spawn):
    from corral.kernel import bindguard, bpfring

    ring = bpfring.Ring()
    try:
        cg = Cgroup.create(service, "app", Limits())
        cg.guard_udp_binds(["udp/47001", "udp/47004-47006", "tcp/47020"], ring.fileno())
        pid, r = spawn(cg, _binds)
        # declared v4, declared range v6, undeclared, port 0, UDP-Lite undeclared, TCP
        assert read_line(r) == "ok ok EPERM ok EPERM ok"
        # each refusal reported, in order: who (the child's pid and uid), which port and
        # protocol, from which address
        reports = [bindguard.REPORT.unpack(rec) for rec in ring.read()]
        assert [(p_t >> 32, u_g & 0xFFFFFFFF, port, proto, fam, addr[:4])
                for p_t, u_g, _, port, proto, fam, addr, _ in reports] == [
            (pid, 0, 47011, 17, socket.AF_INET, socket.inet_aton("127.0.0.1")),
            (pid, 0, 47012, 136, socket.AF_INET, socket.inet_aton("127.0.0.1"))]
        cg.guard_udp_binds(["udp/47011"])  # a reload: the new program replaces the old one
        assert [bindguard.attached(cg.paths["unified"], t)
                for t in bindguard.ATTACH_TYPES] == [1, 1]
        _, r = spawn(cg, _binds)
        assert read_line(r) == "EPERM EPERM ok ok EPERM ok"
        # the reloaded program reports to the same ring; IPv6 with its whole address
        ports = [(rec[3], rec[5], rec[6]) for rec in map(bindguard.REPORT.unpack, ring.read())]
        assert ports == [(47001, socket.AF_INET, socket.inet_aton("127.0.0.1") + bytes(12)),
                         (47005, socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1")),
                         (47012, socket.AF_INET, socket.inet_aton("127.0.0.1") + bytes(12))]
    finally:
        ring.close()


def test_bind_program_is_pure():
    from corral.kernel import bindguard

    ports = [(53, 53), (7000, 7010)]
    assert bindguard.program(ports) == bindguard.program(ports[::-1])
    assert len(bindguard.program([])) == 8 * 10  # protocol and port checks, deny, allow
    with pytest.raises(ValueError):
        bindguard.program([(10, 70000)])


PRIME = """import os, sys, time
from corral.launch import cgprime
def children():
    return open(f"/proc/self/task/{os.getpid()}/children").read().split()
before = open("/proc/self/cgroup").read()
cgprime.start()
primer = children()
time.sleep(0.05)  # its first write and several refreshes
cgprime.stop()
deadline = time.monotonic() + 30
while cgprime._unreaped and time.monotonic() < deadline:
    time.sleep(0.01)
    cgprime.reap()
after = open("/proc/self/cgroup").read()
print(before == after, len(primer), children(), cgprime.own_procs_file() is not None)
"""


def test_priming_the_migration_lock_moves_nothing():
    """launch.cgprime (`corral run` and `up`, before the holder's migration) runs a primer
    process that writes itself into this process's cgroup until stopped: this process stays
    in the same cgroups, and once stopped and reaped no child is left."""
    result = subprocess.run([sys.executable, "-c", PRIME], capture_output=True, text=True,
                            timeout=60)
    v2 = cgroup.layout().v2 is not None
    assert result.stdout == f"True {int(v2)} [] {v2}\n", result.stderr


PRIME_TOLD = """import os, sys, time
from corral.launch import cgprime
fifo = sys.argv[1]
os.mkfifo(fifo)  # the primer's open blocks until a reader comes: a write that waits
cgprime.own_procs_file = lambda: fifo
idle = cgprime.waiting()
cgprime.start()
time.sleep(0.2)
blocked = cgprime.waiting()
reader = os.open(fifo, os.O_RDONLY)
written = os.read(reader, 16).decode()
deadline = time.monotonic() + 30
while cgprime.waiting() and time.monotonic() < deadline:
    time.sleep(0.005)
through = not cgprime.waiting()
cgprime.stop()
while cgprime._unreaped and time.monotonic() < deadline:
    time.sleep(0.01)
    cgprime.reap()
print(idle, blocked, written.isdigit(), through, cgprime._unreaped)
"""


def test_the_primer_tells_when_its_first_write_is_through(tmp_path):
    """cgprime.waiting() is what the supervisor asks before its first cgroup operation: true
    while the primer's first write has not returned (here a FIFO nobody reads yet stands for a
    cgroup.procs whose write waits for a grace period), false once it has, and with no primer."""
    result = subprocess.run([sys.executable, "-c", PRIME_TOLD, str(tmp_path / "cgroup.procs")],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "False True True True []\n", result.stderr


@pytest.mark.skipif(cgroup.layout().v2 is None, reason="no cgroup v2")
def test_the_wait_for_an_empty_cgroup_is_woken_by_the_kernel(service, spawn):
    """wait_empty() sleeps on cgroup.events (POLLPRI) instead of a back-off: it must not
    return while a task lives (a short timeout returns with the task still there), and
    returns with the cgroup empty once the last one leaves."""
    from corral.launch.cgroup import _wait_unpopulated

    cg = Cgroup.create(service, "app", Limits())
    events = cg._v2_file("cgroup.events")
    gate_r, gate_w = os.pipe()

    def waits(w):
        os.write(w, b"up\n")
        os.read(gate_r, 1)  # exits when the test writes

    pid, r = spawn(cg, waits)
    assert read_line(r) == "up"
    _wait_unpopulated(events, 0.05)  # times out: the task is still there
    assert "populated 1" in open(events).read()
    os.write(gate_w, b"x")
    _wait_unpopulated(events, 30)
    assert "populated 0" in open(events).read()
    assert cg.pids() == []
    os.close(gate_r)
    os.close(gate_w)


def test_create_survives_another_service_removing_the_shared_parent(service):
    """remove_service takes the shared `corral` cgroup away once it is empty; a create of
    another service running at that moment lost its parent between two mkdirs (ENOENT, seen as
    a failed start in a bench run). Two services created and removed in a loop, side by side:
    every create must succeed."""
    import threading

    other = "tst" + secrets.token_hex(4)
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn() -> None:  # the other service's own starts and stops, on its own thread
        while not stop.is_set():
            try:
                Cgroup.create(other, "app", Limits())
                cgroup.remove_service(other)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
                return

    remover = threading.Thread(target=churn)
    remover.start()
    try:
        for _ in range(300):
            Cgroup.create(service, "app", Limits())
            cgroup.remove_service(service)
    finally:
        stop.set()
        remover.join()
        cgroup.remove_service(other)
    assert errors == []

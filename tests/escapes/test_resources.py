"""Escapes through resources: the cgroup limits (pids 32, memory 128M, cpu 0.5 for the sample)
hold against fork, thread, memory and CPU bombs, the delta's size against a disk bomb, and the
attacker can change none of its limits.

The bombs are bounded (at most twice the limit) so that a missing limit fails the test without
hurting the host. They run through `corral exec`, which joins the process's cgroup, i.e. shares
its limits with the service's own program.

The memory bomb: the kernel's OOM killer picks the largest task in the cgroup, the bomb; should
it pick the service's program instead, the supervisor restarts it. The test asserts the bomb
did not get its memory and that the service serves again afterwards (and records whether its
program was restarted); the host is never short of memory, as the cgroup's peak shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from .attack import Contained, blocked, host_limits, returned

pytestmark = pytest.mark.root

MEMORY, PIDS, DELTA = 128 << 20, 32, 64 << 20  # the sample's limits and the default delta size

ATTACK = r'''
import resource, signal

@attempt("cgroup_view")
def _():
    return open("/proc/self/cgroup").read().splitlines()

@attempt("mount_cgroup2")
def _():
    return syscall(165, b"cgroup2", b"/tmp", b"cgroup2", 0, None)

@attempt("mount_cgroup_v1_memory")
def _():
    return syscall(165, b"cgroup", b"/tmp", b"cgroup", 0, b"memory")

@attempt("raise_open_files_limit")
def _():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return syscall(160, resource.RLIMIT_NOFILE, struct.pack("QQ", hard + 1, hard + 1))

@attempt("raise_core_limit")  # core files would carry the service's secrets
def _():
    return syscall(160, resource.RLIMIT_CORE, struct.pack("QQ", 1 << 30, 1 << 30))

@attempt("raise_nproc_limit")
def _():
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if hard == resource.RLIM_INFINITY:
        return "no limit to raise"
    return syscall(160, resource.RLIMIT_NPROC, struct.pack("QQ", hard + 1, hard + 1))

@attempt("nice_minus_20")
def _():
    return os.setpriority(os.PRIO_PROCESS, 0, -20)

@attempt("realtime_scheduling")
def _():
    return os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))

@attempt("io_priority_realtime")
def _():
    return syscall(251, 1, 0, (1 << 13) | 0)  # ioprio_set(WHO_PROCESS, self, CLASS_RT)

@attempt("leave_cgroup_through_proc")
def _():
    return open("/proc/self/cgroup", "w").write("0::/")
'''

FORK_BOMB = rf'''
import errno, json, os, time
r, w = os.pipe()
children, error = [], None
while len(children) < 2 * {PIDS}:  # bounded: twice the limit proves a missing limit, harmlessly
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode[exc.errno]
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # wait for the parent to let go
        os._exit(0)
    children.append(pid)
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
print("RESULT", json.dumps({{"forked": len(children), "error": error}}))
'''

THREAD_BOMB = rf'''
import json, threading
stop, threads, error = threading.Event(), [], None
while len(threads) < 2 * {PIDS}:
    t = threading.Thread(target=stop.wait)
    try:
        t.start()
    except RuntimeError as exc:
        error = str(exc)
        break
    threads.append(t)
stop.set()
for t in threads:
    t.join()
print("RESULT", json.dumps({{"threads": len(threads), "error": error}}))
'''

MEMORY_BOMB = rf'''
chunks = []
try:
    for _ in range(2 * {MEMORY} // (8 << 20)):  # bounded: twice the limit
        chunk = bytearray(8 << 20)
        for i in range(0, len(chunk), 4096):  # touch every page: really use the memory
            chunk[i] = 1
        chunks.append(chunk)
        print(len(chunks) * 8, "MiB", flush=True)
    print("ALLOCATED-ALL", flush=True)
except MemoryError:
    print("MemoryError", flush=True)
'''

CPU_HOG = r'''
import json, time
start_wall, start_cpu = time.monotonic(), time.process_time()
while time.monotonic() - start_wall < 1.0:
    pass
print("RESULT", json.dumps({"wall": time.monotonic() - start_wall,
                            "cpu": time.process_time() - start_cpu}))
'''

DISK_BOMB = rf'''
import errno, json, os
written, error = 0, None
try:
    with open("/tmp/fill", "wb") as out:
        block = b"x" * (1 << 20)
        while written < 2 * {DELTA}:
            out.write(block)
            out.flush()
            written += len(block)
except OSError as exc:
    error = errno.errorcode[exc.errno]
finally:
    os.unlink("/tmp/fill")
print("RESULT", json.dumps({{"written": written, "error": error}}))
'''


def result_of(completed) -> dict:
    import json

    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no result (exit {completed.returncode}): {completed.stderr[-1000:]}")


def host_memory_peak(pid: int) -> int | None:
    """The peak memory use of `pid`'s memory cgroup, read on the host (v1 or v2)."""
    from .attack import _cgroup_mounts

    mounts = _cgroup_mounts()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and "memory" in mounts:
            return int(Path(mounts["memory"] + path, "memory.max_usage_in_bytes").read_text())
        if controllers == "" and "unified" in mounts:
            peak = Path(mounts["unified"] + path, "memory.peak")
            if peak.exists():
                return int(peak.read_text())
    return None


@pytest.fixture(scope="module")
def limits_before(svc):
    return host_limits(svc.app()["pid"])


@pytest.fixture(scope="module")
def attacked(svc, limits_before):
    return svc.attack(ATTACK)


def test_the_declared_limits_are_in_force(limits_before):
    assert limits_before == {"memory": MEMORY, "pids": PIDS}


def test_exec_runs_inside_the_service_cgroup(attacked):
    # In its own cgroup namespace, rooted at the service's cgroup: every line says "/"; a
    # process outside the cgroup would see "/../..." here.
    lines = returned(attacked, "cgroup_view")
    assert lines and all(line.endswith(":/") for line in lines), lines


@pytest.mark.parametrize("name", ["mount_cgroup2", "mount_cgroup_v1_memory"])
def test_cgroup_file_system_cannot_be_mounted(attacked, name):
    blocked(attacked, name, "EPERM")


def test_cgroup_cannot_be_left_through_proc(attacked):
    blocked(attacked, "leave_cgroup_through_proc", "EACCES")


@pytest.mark.parametrize("name, expected", [
    ("raise_open_files_limit", "EPERM"),
    ("raise_core_limit", "EPERM"),
    ("nice_minus_20", "EACCES"),
    ("realtime_scheduling", "EPERM"),
    ("io_priority_realtime", "EPERM"),
])
def test_resource_limits_cannot_be_raised(attacked, name, expected):
    blocked(attacked, name, expected)


def test_nproc_limit_cannot_be_raised(attacked):
    outcome = attacked["raise_nproc_limit"]
    if outcome["outcome"] != "returned" or outcome["value"] != "no limit to raise":
        blocked(attacked, "raise_nproc_limit", "EPERM")


def test_limits_unchanged_on_the_host(attacked, svc, limits_before):
    assert host_limits(svc.app()["pid"]) == limits_before


def test_exec_without_cgroup_file_systems_is_refused(svc):
    """`corral exec` from a mount namespace where no cgroup file system is mounted (what
    `ip netns exec` makes) must not run the command outside the service's limits."""
    other = Contained(svc.name, svc.netns, svc.root, svc.manifest, svc.port, "ip-netns-exec")
    done = other.exec("print(open('/proc/self/cgroup').read())")
    assert done.returncode != 0, f"ran outside the service's cgroup:\n{done.stdout}"
    assert "cgroup" in done.stderr


# ---- the bombs (each its own exec; the service must serve afterwards)

def test_fork_bomb_stops_at_the_pids_limit(svc):
    outcome = result_of(svc.exec(FORK_BOMB))
    assert outcome["error"] == "EAGAIN" and outcome["forked"] < PIDS, outcome
    assert host_limits(svc.app()["pid"])["pids"] == PIDS
    assert svc.serving()


def test_thread_bomb_stops_at_the_pids_limit(svc):
    outcome = result_of(svc.exec(THREAD_BOMB))
    assert outcome["error"] == "can't start new thread" and outcome["threads"] < PIDS, outcome
    assert svc.serving()


def test_cpu_hog_gets_its_quota_only(svc):
    outcome = result_of(svc.exec(CPU_HOG))
    assert outcome["cpu"] < 0.75 * outcome["wall"], outcome  # cpu = 0.5: half of each period
    assert svc.serving()


def test_disk_bomb_fills_only_the_delta(svc):
    outcome = result_of(svc.exec(DISK_BOMB))
    assert outcome["error"] == "ENOSPC" and outcome["written"] <= DELTA, outcome
    assert svc.serving()


def test_memory_bomb_stays_within_the_memory_limit(svc):
    before = svc.app()["pid"]
    done = svc.exec(MEMORY_BOMB)
    assert "ALLOCATED-ALL" not in done.stdout, "the bomb got twice the memory limit"
    # OOM-killed (exec reports 128 + SIGKILL) or refused with MemoryError
    assert done.returncode == 137 or "MemoryError" in done.stdout, (done.returncode,
                                                                    done.stdout[-300:])
    assert svc.serving(within=30)
    app = svc.app()
    peak = host_memory_peak(app["pid"])
    assert peak is None or peak <= MEMORY
    svc.memory_bomb_restarted_the_program = app["pid"] != before  # for the record only

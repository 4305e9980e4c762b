"""Priming the kernel's cgroup migration lock for a launch (stdlib only: started first).

A migration (a write to cgroup.procs) takes the kernel's global cgroup_threadgroup_rwsem for
writing, and the first writer after a quiet while waits for an RCU grace period to take it out
of its fast reader mode (10-17 ms on a quiet machine here, up to ~50 ms under load); writers
within about one grace period after the last one do not wait, and one that comes while the
first still waits waits only for the rest of that grace period. A contained process's holder
migrates right after its fork, on the launch's critical path.

`start` forks a small primer process that writes itself into the v2 cgroup it is already in
(the kernel moves nothing) every REFRESH seconds, while the supervisor imports and prepares;
`stop`, right before the holder's fork, kills it. The holder's first write then takes ~30 us
(bench/README.md, "Launch time"). A process, not a thread: the primer's first write may wait
longer than the imports take, and nobody has to wait for it (a thread would have to be
joined before the supervisor unshares its mount namespace, which a process with other
threads cannot). `start` comes first thing in `corral run` (cli.entry) and in `up`'s
supervisor (supervise.daemon), before the imports it overlaps, which is why this module
needs nothing but the standard library's os and time. The writes change nothing, so any
failure only leaves the holder to wait as before.
"""

from __future__ import annotations

import os
import time

REFRESH = 0.002  # well inside a grace period (~10 ms): the holder writes ~1 ms after `stop`
LIFETIME = 5.0  # seconds: a launch takes ~50 ms; a primer never outlives a stuck one by much
_primer: int | None = None  # the running primer's pid (this process's child)
_told: int | None = None  # read end of a pipe the primer closes after its first write
_unreaped: list[int] = []  # killed primers not reaped yet (one may be in a grace period)


def own_procs_file() -> str | None:
    """This process's v2 cgroup.procs, if it has one it is listed in (under a cgroup namespace
    the path is the namespace's, and the mount may show another root: then None)."""
    try:
        with open("/proc/self/cgroup") as handle:
            path = next((ln[3:].strip() for ln in handle if ln.startswith("0::/")), None)
        with open("/proc/self/mountinfo") as handle:
            mounts = [ln.split() for ln in handle if " - cgroup2 " in ln]
    except OSError:
        return None
    if path is None or not mounts or "\\" in mounts[0][4]:  # an escaped (odd) mount path
        return None
    procs = f"{mounts[0][4]}{path.rstrip('/')}/cgroup.procs"
    try:
        with open(procs) as handle:
            return procs if str(os.getpid()) in handle.read().split() else None
    except OSError:
        return None


def _prime(procs: str, parent: int, told: int) -> None:
    """The primer's life: write itself into its cgroup until killed, orphaned or too old; close
    `told` once the first write is through (the grace period it waited for has passed)."""
    try:
        # Nothing of the caller's: a caller reading its output to the end (a pipe) must not
        # wait for the primer too
        os.closerange(0, told)
        os.closerange(told + 1, os.sysconf("SC_OPEN_MAX"))
        me = str(os.getpid()).encode()
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        end = time.monotonic() + LIFETIME
        while os.getppid() == parent and time.monotonic() < end:
            os.write(fd, me)
            if told >= 0:
                os.close(told)
                told = -1
            time.sleep(REFRESH)
    finally:
        os._exit(0)  # a fork of the caller: none of its exit handlers or buffers are ours


def start() -> None:
    """Start priming, once per process (a second call while a primer runs does nothing)."""
    global _primer, _told
    if _primer is not None:
        return
    procs = own_procs_file()
    if procs is None:
        return
    parent = os.getpid()
    _told, told = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    pid = os.fork()
    if pid == 0:
        _prime(procs, parent, told)
    os.close(told)
    _primer = pid


def waiting() -> bool:
    """Whether the primer's first write still waits for its grace period: a cgroup operation
    now (mkdir, a BPF attach, a migration) would wait for it too, holding nothing up that
    could run first (supervise.supervisor starts its sensors in that time)."""
    global _told
    if _told is None:
        return False
    try:
        os.read(_told, 1)  # b"": closed, the write is through (or the primer is gone)
    except BlockingIOError:
        return True
    os.close(_told)
    _told = None
    return False


def stop() -> None:
    """Kill the primer (its last write is done: the caller forks the holder next) without
    waiting for it: it may still be in its first write's grace period. Nothing when none
    runs; `reap` collects it later."""
    global _primer, _told
    if _told is not None:
        os.close(_told)
        _told = None
    if _primer is None:
        return
    os.kill(_primer, 9)  # our own unreaped child: its pid cannot have been reused
    _unreaped.append(_primer)
    _primer = None
    reap()


def reap() -> None:
    """Collect killed primers that have ended, without waiting for those that have not."""
    for pid in list(_unreaped):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _unreaped.remove(pid)

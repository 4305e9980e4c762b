"""Priming the kernel's cgroup migration lock for a launch (stdlib only: started first).

A migration (a write to cgroup.procs) takes the kernel's global cgroup_threadgroup_rwsem for
writing, and the first writer after a quiet while waits for an RCU grace period to take it out
of its fast reader mode (10-17 ms measured here); writers within about one grace period after
the last one do not wait. A contained process's holder migrates right after its fork, on the
launch's critical path. `start` writes this process into the v2 cgroup it is already in (the
kernel moves nothing) on a thread, while the supervisor imports and prepares, and then again
every REFRESH seconds, so that the lock is still in its slow mode when the holder writes: its
first write then takes ~30 us (bench/README.md, "Launch time").

`start` comes first thing in `corral run` (cli.entry), before the imports it overlaps, which
is why this module needs nothing but the standard library's os and threading. `stop` ends the
thread and waits for it: the supervisor calls it before it unshares its mount namespace (a
process with other threads cannot). The writes change nothing, so any failure only leaves the
holder to wait as before.
"""

from __future__ import annotations

import os
import sys
import threading

REFRESH = 0.002  # well inside a grace period (~10 ms): the holder writes ~5 ms after `stop`
# While the thread runs, the importing main thread hands it the GIL within this (Python's
# default, 5 ms, let refreshes slip past a grace period: a refresh then waited one again)
SWITCH = 0.0005
_running: tuple[threading.Thread, threading.Event, float] | None = None


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


def _prime(stop: threading.Event) -> None:
    procs = own_procs_file()
    if procs is None:
        return
    pid = str(os.getpid()).encode()
    while True:
        try:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        except OSError:
            return
        if stop.wait(REFRESH):
            return


def start() -> None:
    """Start priming, once per process (a second call does nothing)."""
    global _running
    if _running is not None:
        return
    stop_event = threading.Event()
    thread = threading.Thread(target=_prime, args=(stop_event,), name="corral-cgroup-prime",
                              daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH)
    thread.start()
    _running = (thread, stop_event, switch)


def stop() -> None:
    """End the priming thread and wait for it; nothing when none was started."""
    global _running
    if _running is None:
        return
    thread, stop_event, switch = _running
    stop_event.set()
    thread.join()
    sys.setswitchinterval(switch)
    _running = None

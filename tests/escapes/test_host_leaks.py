"""Host information and credentials a contained process could read (red team 2026-12-04,
findings 15 and 17; issue 16 finding 11): root's session keyring was inherited (a named keyring
and its keys showed in /proc/keys), and the service's /proc showed the kernel command line,
which host uids hold keys (/proc/key-users) and host-wide pressure stalls (/proc/pressure).

Now every process joins a fresh anonymous session keyring before it drops privileges, and
those /proc entries are masked (an empty file, an empty read-only directory), and so are the
other entries any user may read that show other services' activity (interrupt counts, disk
I/O, file locks) or the host's identity (its boot id, devices, buses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .attack import CORRAL, EPILOGUE, MARK, PRELUDE

pytestmark = pytest.mark.root

KEYRING = "corral-test-admin-session"

ATTACK = r'''
@attempt("keys")
def _():
    return open("/proc/keys").read()

@attempt("cmdline")
def _():
    return open("/proc/cmdline").read()

@attempt("key-users")
def _():
    return open("/proc/key-users").read()

@attempt("pressure")
def _():
    return sorted(os.listdir("/proc/pressure"))

# Host activity and identity (issue 16 finding 11, the rest; docs/sandbox.md decides per file)
for _name in PARAMS["files"]:
    @attempt(_name)
    def _():
        with open("/proc/" + _name, "rb") as f:
            return f.read(4096).decode(errors="replace")

for _name in PARAMS["dirs"]:
    @attempt(_name)
    def _():
        return sorted(os.listdir("/proc/" + _name))

# What stays readable on purpose (programs read it; docs/sandbox.md): still works
@attempt("loadavg")
def _():
    return len(open("/proc/loadavg").read().split())
'''

# Readable by any user on this host's /proc and showing other services' activity or the host's
# identity: each must read as empty in the service (those absent on a kernel are skipped).
FILES = ["interrupts", "softirqs", "diskstats", "partitions", "swaps", "locks",
         "sys/kernel/random/boot_id"]
DIRS = ["acpi", "scsi", "irq", "bus", "driver", "fs"]

# Run `corral exec` from a session whose keyring is named (as an administrator's shell may
# hold tokens in it): keyctl(KEYCTL_JOIN_SESSION_KEYRING, name), then exec.
JOIN = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "assert libc.syscall(250, 1, sys.argv[1].encode()) > 0; "
        "os.execvp(sys.argv[2], sys.argv[2:])")


def test_no_root_keyring_and_no_host_proc(svc):
    files = [f for f in FILES if os.path.exists(f"/proc/{f}")]
    dirs = [d for d in DIRS if os.path.isdir(f"/proc/{d}")]
    assert "interrupts" in files and "sys/kernel/random/boot_id" in files  # the test means it
    params = json.dumps({"files": files, "dirs": dirs})
    code = PRELUDE + f"PARAMS = json.loads({params!r})\n" + ATTACK + EPILOGUE
    done = subprocess.run(svc.prefix() + [sys.executable, "-c", JOIN, KEYRING] + CORRAL + [
        "exec", svc.name, "app", "--", "/usr/bin/python3.11", "-I", "-c", code],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    lines = [x for x in done.stdout.splitlines() if x.startswith(MARK)]
    assert lines, done.stderr[-2000:]
    results = json.loads(lines[0][len(MARK):])
    keys = results["keys"]
    assert KEYRING not in json.dumps(keys), keys
    for name in ("cmdline", "key-users"):
        assert results[name] in ({"outcome": "returned", "value": ""},), (name, results[name])
    assert results["pressure"] == {"outcome": "returned", "value": []}, results["pressure"]
    leaks = {name: results[name] for name in files + dirs
             if results[name] not in ({"outcome": "returned", "value": ""},
                                      {"outcome": "returned", "value": []})}
    assert not leaks, leaks
    assert results["loadavg"] == {"outcome": "returned", "value": 5}, results["loadavg"]

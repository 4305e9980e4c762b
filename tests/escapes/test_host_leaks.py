"""Host information and credentials a contained process could read (red team 2026-12-04,
findings 15 and 17; issue 16 finding 11): root's session keyring was inherited (a named keyring
and its keys showed in /proc/keys), and the service's /proc showed the kernel command line,
which host uids hold keys (/proc/key-users) and host-wide pressure stalls (/proc/pressure).

Now every process joins a fresh anonymous session keyring before it drops privileges, and
those /proc entries are masked (an empty file, an empty read-only directory)."""

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
'''

# Run `corral exec` from a session whose keyring is named (as an administrator's shell may
# hold tokens in it): keyctl(KEYCTL_JOIN_SESSION_KEYRING, name), then exec.
JOIN = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "assert libc.syscall(250, 1, sys.argv[1].encode()) > 0; "
        "os.execvp(sys.argv[2], sys.argv[2:])")


def test_no_root_keyring_and_no_host_proc(svc):
    code = PRELUDE + "PARAMS = {}\n" + ATTACK + EPILOGUE
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

"""Abstract UNIX sockets (red team 2026-12-04, finding 14; issue 16 finding 11): the service
shares the host's network namespace, where abstract names live. Landlock's scope (ABI 6,
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET) is applied: a contained process cannot connect to a host
daemon's abstract socket. It does not stop the service from binding a name first (squatting):
that needs the service's own network namespace or a cgroup bind hook, and is still open."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .attack import blocked

pytestmark = pytest.mark.root

NAME = b"\0corral-test-host-daemon"

ATTACK = r'''
@attempt("connect")
def _():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b"\0corral-test-host-daemon")
    return "connected"
'''


def test_a_host_abstract_socket_is_out_of_reach(svc):
    # The listener lives in the service's network namespace, as a host daemon there would.
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
            f"s.bind({NAME!r}); s.listen(); print('up', flush=True); time.sleep(30)")
    host = subprocess.Popen(svc.prefix() + [sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert host.stdout.readline().strip() == b"up"
        results = svc.attack(ATTACK)
        blocked(results, "connect", "EPERM")
    finally:
        host.kill()
        host.wait()

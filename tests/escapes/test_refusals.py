"""The IDS sees every refusal (issue 16, "the walls to add"): acts the kernel refuses before a
packet exists, so the service's nft table never logs them.

- Landlock refuses a TCP connect() to an undeclared port (EACCES) and a TCP bind() of an
  undeclared port: no SYN ever leaves, so the NFLOG sensor saw nothing and no incident was
  written (a misconfigured proxy got its 502 in silence). Landlock's own audit records
  (AUDIT_LANDLOCK_ACCESS, kernel 6.15+) make each an `egress` or `listen` incident.

Its own service (port 8083): the shared one's incidents would coalesce with these."""

from __future__ import annotations

import json
import time

import pytest

from .attack import blocked, started

pytestmark = pytest.mark.root

CONNECT_PORT, BIND_PORT = 7733, 7734

REFUSED = r'''
@attempt("tcp_connect_undeclared")
def _():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", PARAMS["connect"]))
    finally:
        s.close()

@attempt("tcp_bind_undeclared")
def _():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", PARAMS["bind"]))
    finally:
        s.close()
'''


@pytest.fixture(scope="module")
def refusing(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8083,
                 volume="/srv/refusals") as service:
        yield service


def incidents_of(service) -> list[dict]:
    run = service.corral("incidents", service.name, "--json", check=True)
    return json.loads(run.stdout)["incidents"]


def wait_for(service, match, within: float = 10.0) -> list[dict]:
    deadline = time.time() + within
    while True:
        found = [i for i in incidents_of(service) if match(i)]
        if found or time.time() > deadline:
            return found
        time.sleep(0.2)


def test_landlock_refusals_are_incidents(refusing):
    results = refusing.attack(REFUSED, {"connect": CONNECT_PORT, "bind": BIND_PORT})
    blocked(results, "tcp_connect_undeclared", "EACCES")
    blocked(results, "tcp_bind_undeclared", "EACCES")
    egress = wait_for(refusing, lambda i: i["tripwire"] == "egress"
                      and i["detail"].get("dport") == CONNECT_PORT)
    assert egress, f"no egress incident for the refused connect: {incidents_of(refusing)}"
    assert egress[0]["process"] == "app"
    assert egress[0]["detail"]["dst"] == "127.0.0.1"
    assert egress[0]["detail"]["proto"] == "tcp"
    assert egress[0]["detail"]["refused_by"] == "landlock"
    listen = wait_for(refusing, lambda i: i["tripwire"] == "listen"
                      and i["detail"].get("sport") == BIND_PORT)
    assert listen, f"no listen incident for the refused bind: {incidents_of(refusing)}"
    assert listen[0]["process"] == "app"
    # the act's time is the kernel's audit stamp (ms), before the incident was written
    assert listen[0]["act_at"] <= listen[0]["detected_at"]
    assert refusing.status()["state"] == "running"
    assert refusing.serving()

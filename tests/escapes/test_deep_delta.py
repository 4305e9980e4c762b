"""Escape by depth (review 6.1): 2,000 nested directories in the service's /tmp (the delta).

Every recursive walker of the delta used to raise RecursionError: the delta poller took the
supervisor down, which discarded the delta with no archive and no incident. Designed now:
- the poller cannot walk past tree.MAX_DEPTH, and says so as a `base-write` event, change
  "unwalkable" (the service may hide a base write down there): an incident, the configured
  reaction (this corpus: "log"), and `status` shows the sensor's error;
- `corral delta` refuses with a clear error (exit 1, no traceback): it cannot list it whole;
- `corral revert` archives what it can, the meta says what was truncated, and removes the
  whole tree (removal is not depth-bounded); `corral down` works.

Its own service (port 8082): the shared one must not be reverted under the other modules."""

from __future__ import annotations

import json
import time

import pytest

from corral.core import tree

from .attack import returned, started

pytestmark = pytest.mark.root

LEVELS = 2000

ATTACK = r'''
@attempt("nest_in_tmp")
def _():
    fd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(PARAMS["levels"]):
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open("payload", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    return PARAMS["levels"]
'''


@pytest.fixture(scope="module")
def deep(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8082,
                 volume="/srv/deep") as service:
        results = service.attack(ATTACK, {"levels": LEVELS})
        yield service, results


def no_traceback(run) -> None:
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr


def incidents_of(service) -> list[dict]:
    run = service.corral("incidents", service.name, "--json", check=True)
    return json.loads(run.stdout)["incidents"]


def test_nesting_2000_directories_in_tmp_goes_through(deep):
    _, results = deep
    assert returned(results, "nest_in_tmp") == LEVELS  # nothing stops it: /tmp is writable


def test_the_supervisor_survives_and_records_an_incident(deep):
    service, _ = deep
    deadline = time.time() + 15
    found = []
    while time.time() < deadline and not found:
        found = [i for i in incidents_of(service) if i.get("tripwire") == "base-write"
                 and (i.get("detail") or {}).get("change") == "unwalkable"]
        time.sleep(0.2)
    assert found, "no incident for the unwalkable delta"
    assert found[0]["detail"]["path"].startswith("/tmp/d/d/")
    status = service.status()
    assert status["state"] == "running"
    assert status["sensors"]["base-write"].startswith("error: ")
    assert service.serving()


def test_corral_delta_refuses_clearly(deep):
    service, _ = deep
    run = service.corral("delta", service.name)
    assert run.returncode == 1
    assert f"deeper than {tree.MAX_DEPTH} levels" in run.stderr
    no_traceback(run)


def test_revert_archives_what_it_can_and_removes_the_tree(deep):
    service, _ = deep
    run = service.corral("revert", service.name, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    no_traceback(run)
    archives = sorted((service.state_dir / "archives").iterdir())
    meta = json.loads((archives[-1] / "meta.json").read_text())
    assert meta["truncated"]["max_depth"] == tree.MAX_DEPTH
    assert meta["truncated"]["not_entered"][0].startswith("/tmp/d/d/")
    deadline = time.time() + 10  # the next poll walks the fresh delta whole again
    while time.time() < deadline and not service.status()["sensors"]["base-write"] \
            .startswith("on"):
        time.sleep(0.2)
    status = service.status()
    assert status["state"] == "running" and status["sensors"]["base-write"].startswith("on")
    delta = service.corral("delta", service.name, "--json", check=True)
    assert not [c for c in json.loads(delta.stdout)["changes"]
                if c["path"].startswith("/tmp/d")]


def test_down_works_after_all_that(deep):
    service, results = deep
    service.attack(ATTACK, {"levels": LEVELS})  # deep again: down must remove it too
    run = service.corral("down", service.name, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    no_traceback(run)

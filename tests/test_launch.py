"""The start sequence as data (corral.launch.pipeline): its order is the security argument, so
it is pinned here, and a failing step is named in the error a start reports."""

from __future__ import annotations

import pytest

from corral.launch import pipeline


def names(steps):
    return [name for name, _ in steps]


def test_the_order_of_a_start():
    # network = "own": into the service's network namespace while still root, before the
    # other unshares (a no-op with the host's network)
    assert names(pipeline.HOLDER) == ["pdeathsig", "cgroup", "network", "namespaces"]
    # seccomp last but the listener's hand-up: its filter would refuse what comes after it;
    # the parent-death signal again after the uid change, which clears it.
    assert names(pipeline.INIT + pipeline.CONFINE) == [
        "pdeathsig", "root", "hostname", "memfd",
        "rlimits", "fds", "session", "keyring", "creds", "pdeathsig", "landlock", "seccomp",
        "notify"]


def test_exec_is_the_same_confinement_without_the_root():
    assert names(pipeline.EXEC_HOLDER) == ["pdeathsig", "cgroup", "namespaces"]
    assert pipeline.EXEC_CHILD[-len(pipeline.CONFINE):] == pipeline.CONFINE
    assert "root" not in names(pipeline.EXEC_CHILD)


def test_a_failing_step_is_the_one_named():
    ran = []

    def ok(jail):
        ran.append("ok")

    def broken(jail):
        raise OSError(1, "no")

    at = ["fork"]
    with pytest.raises(OSError):
        pipeline.run_steps((("first", ok), ("second", broken), ("third", ok)), None, at)
    assert at == ["second"] and ran == ["ok"]

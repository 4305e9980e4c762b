"""corral leaves the kernel's audit as it found it (kernel.auditholds): the audit sensor turns
audit on for Landlock's refusals, and the last holder to leave turns it off again, only if
corral turned it on.

Against the real kernel's audit switch, in a registry of the test's own (CORRAL_AUDIT_REGISTRY,
so the supervisors of other test runs on this host are not counted). Audit is host-wide: every
test records its state first and restores it in a `finally`, and keeps the moments it is off
as short as it can (other runs may be waiting for a Landlock record)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corral.kernel import audit, auditholds

pytestmark = pytest.mark.root

CHILD = ("from corral.kernel import auditholds; import sys, time; "
         "hold = auditholds.register(); print(hold.name, flush=True); time.sleep(600)")


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "audit-registry"
    monkeypatch.setenv("CORRAL_AUDIT_REGISTRY", str(path))
    return path


@pytest.fixture
def start_state():
    """The host's audit state, put back whatever the test did."""
    start = audit.enabled()
    if start == 2:
        pytest.skip("audit is locked until reboot: its switch cannot be tested")
    if audit.daemon():
        pytest.skip("an audit daemon runs: corral leaves audit on for it")
    try:
        yield start
    finally:
        if audit.enabled() != start:
            (audit.enable if start else audit.disable)()


def holders(registry: Path) -> list[str]:
    return sorted(n for n in os.listdir(registry)
                  if n not in (auditholds.LOCK, auditholds.DISABLES))


def test_the_last_holder_out_turns_off_what_corral_turned_on(registry, start_state):
    audit.disable()
    first = auditholds.register()  # audit back on at once
    assert first.note == "audit enabled by corral for Landlock's refusals"
    assert audit.enabled() == 1
    second = auditholds.register()
    assert second.note == ""  # on already
    assert holders(registry) == sorted([first.name, second.name, auditholds.MARKER])
    assert (registry.stat().st_mode & 0o777, registry.stat().st_uid) == (0o700, 0)

    assert auditholds.unregister(first) == ""
    assert audit.enabled() == 1  # the second still holds it
    assert auditholds.unregister(second) == "audit disabled again (corral had enabled it)"
    assert audit.enabled() == 0
    assert holders(registry) == []  # marker and holder files gone


def test_a_status_asked_ahead_is_not_trusted_across_a_disable(registry, start_state):
    """The supervisor asks the status before it prepares the service (the kernel's reply is
    slow) and registers later: if the last holder turned audit off in between, the early
    "on" is stale and register must ask again, or the service runs with audit off."""
    audit.disable()
    first = auditholds.register()
    early = auditholds.ask()  # "on", while first holds it
    assert auditholds.unregister(first) == "audit disabled again (corral had enabled it)"
    assert audit.enabled() == 0
    second = auditholds.register(early)
    assert second.note == "audit enabled by corral for Landlock's refusals"
    assert audit.enabled() == 1
    assert auditholds.unregister(second) == "audit disabled again (corral had enabled it)"
    # With no disable in between, the early answer is used (its socket is then closed).
    third_early = auditholds.ask()
    third = auditholds.register(third_early)
    assert third.note == "audit enabled by corral for Landlock's refusals"
    assert third_early.query.sock is None
    auditholds.unregister(third)


def test_audit_the_admin_turned_on_is_left_on(registry, start_state):
    if start_state == 0:
        audit.enable()  # as an admin would (restored by the fixture)
    first, second = auditholds.register(), auditholds.register()
    assert first.note == second.note == ""
    assert auditholds.MARKER not in holders(registry)
    assert auditholds.unregister(first) == auditholds.unregister(second) == ""
    assert audit.enabled() == 1
    assert holders(registry) == []


def test_a_killed_holder_does_not_keep_audit_on(registry, start_state):
    """A supervisor killed by SIGKILL never unregisters: its holder file stays, but its flock
    died with it, so the next unregister drops it."""
    audit.disable()
    mine = auditholds.register()  # turns audit on: the window off is this call's
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child_hold = child.stdout.readline().strip()
        assert child_hold.startswith(f"{child.pid}.")
        assert auditholds.unregister(mine) == ""
        assert audit.enabled() == 1  # the child is alive and holds it
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert holders(registry) == sorted([child_hold, auditholds.MARKER])  # stale, not yet seen
    last = auditholds.register()
    assert auditholds.unregister(last) == "audit disabled again (corral had enabled it)"
    assert audit.enabled() == 0
    assert holders(registry) == []


def test_a_symlinked_registry_is_refused_and_audit_left_as_is(tmp_path, monkeypatch,
                                                             start_state):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("CORRAL_AUDIT_REGISTRY", str(tmp_path / "link"))
    audit.disable()
    try:
        hold = auditholds.register()
        assert audit.enabled() == 0  # not turned on: corral could not promise to turn it off
    finally:
        (audit.enable if start_state else audit.disable)()
    assert hold.dir_fd is None
    assert hold.note == "without Landlock's refusals: audit left off: holder registry " \
        f"{tmp_path / 'link'} refused: it is a symlink"
    assert auditholds.unregister(hold) == ""
    assert os.listdir(real) == []

    from corral.watch import sensors  # the sensor's status says why

    reader = sensors.AuditReader()
    try:
        left = "audit left on" if start_state else "without Landlock's refusals: audit left off"
        assert reader.state == f"on ({left}: holder registry {tmp_path / 'link'} refused: " \
            "it is a symlink)"
    finally:
        reader.close()
    assert audit.enabled() == start_state and os.listdir(real) == []


def test_a_registry_not_roots_alone_is_refused(registry, start_state):
    registry.mkdir(mode=0o700)
    os.chown(registry, 65534, 65534)
    assert auditholds.register().note.endswith("refused: it is not owned by root")
    os.chown(registry, 0, 0)
    registry.chmod(0o755)
    assert auditholds.register().note.endswith("refused: its mode is 0755, not 0700")
    assert os.listdir(registry) == [] and audit.enabled() == start_state


def test_the_sensor_holds_audit_while_it_runs(registry, start_state):
    from corral.watch import sensors

    reader = sensors.AuditReader()
    try:
        assert reader.hold is not None and holders(registry) == [reader.hold.name]
    finally:
        reader.close()
    reader.close()  # a second close (the supervisor's stop after a sensor went off) is harmless
    assert holders(registry) == [] and audit.enabled() == start_state


def test_a_supervisor_holds_audit_until_it_stops(registry, start_state, notes):
    """The real supervisor: its audit sensor registers at start, under its own pid, and
    unregisters at `corral down`."""
    status = notes.status()
    pid = status["supervisor"]
    assert isinstance(pid, int) and status["sensors"]["audit"].startswith("on")
    (hold,) = holders(registry)
    assert hold.startswith(f"{pid}.")
    notes.corral("down", notes.name, check=True)
    assert holders(registry) == [] and audit.enabled() == start_state

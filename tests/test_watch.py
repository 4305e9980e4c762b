"""Pull the plug: tripwires fire on real violations inside a running service, the reaction
takes effect, the incident is recorded; floods coalesce; normal work raises nothing."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Service, notes_manifest

pytestmark = pytest.mark.root

PTRACE = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
          "print(libc.syscall(101, 0, 0, 0, 0), ctypes.get_errno())")
LD_SO_TRICK = """
import os
open('/tmp/py', 'wb').write(open('/usr/bin/python3.11', 'rb').read()); os.chmod('/tmp/py', 0o755)
try:
    os.execv('/lib64/ld-linux-x86-64.so.2', ['ld.so', '/tmp/py', '-c', 'print("escaped")'])
except OSError as exc:
    print('refused', exc.errno)
"""


def incidents(svc: Service) -> list[dict]:
    return json.loads(svc.corral("incidents", svc.name, "--json", check=True).stdout)["incidents"]


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def service_with(tmp_path, service_name, start_service):
    """Start the sample with extra manifest text; yields a factory."""

    def start(watch: str = "", app_extra: str = "", add: dict | None = None) -> Service:
        manifest = notes_manifest(tmp_path, service_name, extra_process=watch,
                                  app_extra=app_extra)
        if add:
            extra = "".join(f', "{k}" = "{v}"' for k, v in add.items())
            text = manifest.read_text().replace('notes.py" }', f'notes.py"{extra} }}', 1)
            manifest.write_text(text)
        return start_service(manifest)

    return start


def test_an_exec_outside_the_list_is_refused_and_reverted(notes):
    assert notes.http("/notes", data=b"keep me") == b"stored\n"
    before = notes.status()["processes"][0]["pid"]
    result = notes.exec(LD_SO_TRICK)
    assert "escaped" not in result.stdout
    # The incident is written first, at once; the revert's archive follows as an update.
    assert wait_for(lambda: incidents(notes))[0]["tripwire"] == "exec"
    found = wait_for(lambda: [i for i in incidents(notes) if i["delta_archive"]])
    record = found[0]
    assert record["tripwire"] == "exec" and record["process"] == "app"
    assert record["detail"]["path"] == "/lib64/ld-linux-x86-64.so.2"
    assert record["reaction"] == "revert" and record["latency_ms"] >= 0
    for key in ("id", "service", "pid", "detected_at", "contained_at", "delta_archive"):
        assert record[key], key
    # Back from base: the dropped copy is gone, the volume kept, the archive names the incident.
    status = wait_for(lambda: (s := notes.status())["processes"][0]["pid"] not in (None, before)
                      and s["state"] == "running" and s)
    assert status["reverts"] == 1
    assert json.loads(notes.corral("delta", notes.name, "--json").stdout)["changes"] == []
    assert b"keep me" in notes.http("/notes")
    meta = json.loads(open(record["delta_archive"].replace("delta.tar.zst", "meta.json")).read())
    assert meta["incident"] == record["id"]
    assert "/tmp/py" in {c["path"] for c in meta["changes"]}


def test_ptrace_and_setuid_are_tripwires(service_with):
    svc = service_with(watch='[watch]\nreact = "log"\n')
    assert svc.exec(PTRACE).stdout.strip() == "-1 1"
    code = ("import os; open('/tmp/x', 'w').close()\ntry:\n os.chmod('/tmp/x', 0o4755)\n"
            "except OSError as e:\n print(e.errno)")
    result = svc.exec(code)
    assert result.stdout.strip() == "1", (result.returncode, result.stderr)
    found = wait_for(lambda: len(r := incidents(svc)) >= 2 and r)
    assert {(r["tripwire"], r["detail"]["syscall"]) for r in found} == {
        ("ptrace", "ptrace"), ("setuid", "chmod")}
    assert all(r["reaction"] == "log" for r in found)
    assert svc.status()["state"] == "running" and svc.status()["reverts"] == 0


def test_a_read_only_open_with_a_setuid_mode_is_no_incident(service_with):
    """redis-server's jemalloc opens files read-only with garbage in the mode argument: the
    kernel ignores a mode without O_CREAT, so the `setuid` tripwire must too. With O_CREAT the
    same mode is refused and trips it (react = revert: the default)."""
    svc = service_with()
    pid = svc.status()["processes"][0]["pid"]
    code = ("import os\nfd = os.open('/etc/passwd', os.O_RDONLY, 0o4755); os.close(fd)\n"
            "print('read ok')")
    result = svc.exec(code)
    assert result.stdout.strip() == "read ok", result.stderr
    time.sleep(1.0)  # the audit record, had there been one, is read within milliseconds
    assert incidents(svc) == []
    assert svc.status()["processes"][0]["pid"] == pid
    # The revert this trips may kill the session before it can print anything (the kill
    # beats a loaded scheduler), so the refusal is shown by its effect: no file in the volume,
    # which the revert keeps, and the incident of the filter's denial.
    code = ("import os\ntry:\n os.open('/srv/notes/s', os.O_WRONLY | os.O_CREAT, 0o4755)\n"
            "except OSError as e:\n print(e.errno, flush=True)")
    result = svc.exec(code)
    assert result.stdout.strip() in ("1", ""), result.stdout  # EPERM, or killed first
    found = wait_for(lambda: incidents(svc))
    wait_for(lambda: svc.status()["state"] == "running" and svc.status()["reverts"] == 1)
    assert svc.exec("import os; print(os.path.exists('/srv/notes/s'))").stdout.strip() == "False"
    assert (found[0]["tripwire"], found[0]["detail"]["syscall"]) == ("setuid", "openat")


def test_a_flood_is_one_incident_with_a_count(service_with):
    svc = service_with(watch='[watch]\nreact = "log"\n')
    code = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
            "for _ in range(1000): libc.syscall(101, 0, 0, 0, 0)")
    assert svc.exec(code).returncode == 0
    time.sleep(1.0)
    found = wait_for(lambda: incidents(svc))
    assert len(found) == 1, found
    assert found[0]["count"] > 1  # the kernel may drop some audit records under a burst
    assert svc.status()["state"] == "running"


def test_isolate_cuts_the_network_and_freezes(service_with):
    svc = service_with(watch='[watch]\nreact = "isolate"\n')
    assert svc.http("/health") == b"ok\n"
    import subprocess

    from conftest import CORRAL, in_netns

    # The attacker's process is frozen with the rest: its `corral exec` does not return.
    attacker = subprocess.Popen(in_netns(svc.netns) + CORRAL + [
        "exec", svc.name, "app", "--", "/usr/bin/python3.11", "-I", "-c", PTRACE],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: svc.status()["isolated"])
    finally:
        attacker.kill()
        attacker.wait()
    with pytest.raises(AssertionError):
        svc.http("/health", timeout=1)
    pid = svc.status()["processes"][0]["pid"]
    with open(f"/proc/{pid}/status") as handle:
        state = next(line for line in handle if line.startswith("State:"))
    assert "S" in state or "D" in state  # frozen tasks sleep in the freezer
    rules = svc.corral("status", svc.name).stdout
    assert "ISOLATED" in rules
    svc.corral("revert", svc.name, check=True)  # the way back: clean base, network restored
    assert svc.http("/health") == b"ok\n"
    assert not svc.status()["isolated"]


def test_kill_leaves_the_service_down_with_the_reason(service_with):
    svc = service_with(watch='[watch]\nreact = "kill"\n')
    svc.exec(PTRACE)
    status = wait_for(lambda: (s := svc.status())["state"] == "killed" and s)
    assert "killed: incident" in status["error"]
    assert incidents(svc)[0]["reaction"] == "kill"


def test_base_write_over_a_base_file(service_with, tmp_path):
    """Base files are root's, so only a careless base (here a world-writable file the vendor
    shipped) in a `writable` path lets the service write over one: the tripwire catches it."""
    careless = tmp_path / "settings.py"
    careless.write_text("DEBUG = False\n")
    careless.chmod(0o666)
    svc = service_with(watch='[watch]\nreact = "log"\n', app_extra='writable = ["/opt/notes"]',
                       add={"/opt/notes/settings.py": str(careless)})
    assert svc.status()["sensors"]["base-write"].startswith("on (fanotify")
    code = "open('/opt/notes/settings.py', 'a').write('DEBUG = True  # backdoor')"
    result = svc.exec(code)
    assert result.returncode == 0, result.stderr
    found = wait_for(lambda: incidents(svc))
    assert found[0]["tripwire"] == "base-write"
    assert found[0]["detail"] == {"path": "/opt/notes/settings.py", "change": "modified"}


def test_base_write_left_out_of_the_tripwires_starts_no_fanotify(service_with):
    """A manifest without the base-write tripwire pays nothing for it: no fanotify group in
    the supervisor (its events would be built in the service's own file system calls), and
    status says why."""
    import os

    svc = service_with(watch='[watch]\ntripwires = ["exec", "ptrace"]\n')
    status = svc.status()
    assert status["sensors"]["base-write"] == "off (not in watch.tripwires)"
    fds = f"/proc/{status['supervisor']}/fd"
    assert "anon_inode:[fanotify]" not in {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)}


def test_on_incident_gets_the_record_on_stdin(service_with, tmp_path):
    out = tmp_path / "pager.json"
    svc = service_with(watch=f'[watch]\nreact = "log"\n'
                             f'on_incident = ["/bin/sh", "-c", "cat > {out}"]\n')
    svc.exec(PTRACE)
    record = wait_for(lambda: out.exists() and out.read_text() and json.loads(out.read_text()))
    assert record["tripwire"] == "ptrace" and record["service"] == svc.name


def test_a_revert_loop_backs_off_and_stays_down(service_with):
    svc = service_with()
    for attempt in range(6):
        status = wait_for(lambda: (s := svc.status())["state"] in ("running", "killed") and s)
        if status["state"] == "killed":
            break
        svc.exec(PTRACE)
        wait_for(lambda n=attempt: len(incidents(svc)) > n)
    status = wait_for(lambda: (s := svc.status())["state"] == "killed" and s)
    assert "reverts" in status["error"] and "stays down" in status["error"]
    reactions = [r["reaction"] for r in incidents(svc)]
    assert reactions == ["revert"] * 5 + ["kill"]


def test_normal_work_raises_no_incident(notes):
    code = """
import urllib.request as u
for i in range(2000):
    if i % 10 == 0:
        u.urlopen(u.Request('http://127.0.0.1:8080/notes', data=b'note %d' % i), timeout=5).read()
    else:
        u.urlopen('http://127.0.0.1:8080/health', timeout=5).read()
"""
    import subprocess
    import sys

    subprocess.run(["ip", "netns", "exec", notes.netns, sys.executable, "-c", code],
                   check=True, timeout=300)
    time.sleep(0.5)
    assert incidents(notes) == []
    assert notes.status()["reverts"] == 0


def test_the_worm_cannot_spread_and_the_service_comes_back_clean(notes):
    """Code run inside tries to spread: the packet is dropped by the service's table, an
    `egress` incident is recorded with its latency, the service is back from base with its
    volume intact."""
    assert notes.http("/notes", data=b"before the worm") == b"stored\n"
    worm = """
import os, socket
open('/tmp/worm.py', 'w').write('payload')
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b'infect', ('127.0.0.1', 4444))
    print('sent')
except OSError as exc:
    print('dropped', exc.errno)
import time; time.sleep(2)
"""
    notes.exec(worm)
    record = wait_for(lambda: [i for i in incidents(notes) if i["delta_archive"]])[0]
    assert record["tripwire"] == "egress"
    assert record["detail"]["dst"] == "127.0.0.1" and record["detail"]["dport"] == 4444
    assert record["detail"]["proto"] == "udp" and record["latency_ms"] > 0
    assert record["reaction"] == "revert" and record["delta_archive"]
    wait_for(lambda: notes.status()["reverts"] == 1 and notes.status()["state"] == "running")
    assert b"before the worm" in notes.http("/notes")
    assert json.loads(notes.corral("delta", notes.name, "--json").stdout)["changes"] == []
    counters = notes.corral("status", notes.name).stdout
    assert "1 open" in counters


def test_sensors_say_when_they_fail_instead_of_spinning_or_going_blind(tmp_path):
    """Review 3.6: a persistent recv error was retried forever (100% CPU), and a delta poller
    that could not open the delta returned nothing while `status` said "on"."""
    import os
    import socket

    from corral.watch import sensors

    reader = sensors.AuditReader.__new__(sensors.AuditReader)
    reader.sock, spare = socket.socketpair()
    reader._names, reader.state, reader.uids = {}, "on", None
    reader.counts = {"read": 0, "foreign": 0, "parsed": 0, "lost": 0}
    reader.landlock = sensors.LandlockRecords()
    os.close(reader.sock.fileno())  # EBADF on every recv from now on
    try:
        assert reader.read() == []  # returns at once instead of spinning
        assert reader.state.startswith("off: ")
    finally:
        reader.sock.detach()
        spare.close()
    poller = sensors.DeltaPoller(str(tmp_path / "no-upper"), str(tmp_path))
    assert poller.poll(0.0) == []
    assert poller.state.startswith("off: cannot open ")
    (tmp_path / "upper").mkdir()
    poller.upper = str(tmp_path / "upper")
    assert poller.poll(0.0) == [] and poller.state == poller.ON


def test_fanotify_sees_a_base_write_without_a_walk(tmp_path):
    """The event path alone (its safety-net walk pushed out of reach): a tmpfs delta, a copy-up
    of an executable base file and a whiteout over a base file in /etc, both reported by
    fanotify; a file that is no base file is not. A delta that is no file system of its own
    (a plain directory) cannot be marked alone: imageroot.own_filesystem says so."""
    import os
    import select
    import subprocess

    from corral.launch import imageroot
    from corral.watch import delta_events

    delta, base = tmp_path / "delta", tmp_path / "base"
    (base / "usr/bin").mkdir(parents=True)
    (base / "etc").mkdir()
    (base / "usr/bin/tool").write_text("#!/bin/sh\n")
    (base / "usr/bin/tool").chmod(0o755)
    (base / "etc/motd").write_text("hi\n")
    delta.mkdir()
    assert not imageroot.own_filesystem(str(delta))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "corral-test-delta", str(delta)],
                   check=True)
    try:
        assert imageroot.own_filesystem(str(delta))
        for sub in ("upper/usr/bin", "upper/etc", "upper/tmp", "work"):
            (delta / sub).mkdir(parents=True)
        sensor = delta_events.DeltaEvents(str(delta), str(base), interval=1e9)
        try:
            assert sensor.drain(1.0) == []  # the first drain walks once: an empty delta
            assert sensor.state.startswith("on (fanotify")
            (delta / "upper/tmp/scratch").write_text("x")
            (delta / "upper/usr/bin/tool").write_text("evil\n")
            os.mknod(delta / "upper/etc/motd", 0o600 | 0o020000, os.makedev(0, 0))
            found: dict[str, str] = {}
            while len(found) < 2 and select.select([sensor], [], [], 5)[0]:
                found |= {e.detail["path"]: e.detail["change"] for e in sensor.drain(2.0)}
            assert found == {"/usr/bin/tool": "modified", "/etc/motd": "deleted"}
        finally:
            sensor.close()
    finally:
        subprocess.run(["umount", "-l", str(delta)], check=True)


@contextlib.contextmanager
def _sensor_over_overlay(delta: Path, base: Path, merged: Path) -> Iterator[Any]:
    """A real overlay at `merged` of `base` and a tmpfs delta, and the fanotify base-write
    sensor on that delta; all unmounted afterwards."""
    from corral.watch import delta_events

    delta.mkdir()
    merged.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "corral-test-delta", str(delta)],
                   check=True)
    try:
        for sub in ("upper", "work"):
            (delta / sub).mkdir()
        subprocess.run(["mount", "-t", "overlay", "-o", f"lowerdir={base},upperdir="
                        f"{delta}/upper,workdir={delta}/work", "corral-test-root", str(merged)],
                       check=True)
        sensor = delta_events.DeltaEvents(str(delta), str(base), interval=1e9)
        try:
            yield sensor
        finally:
            sensor.close()
            subprocess.run(["umount", str(merged)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(delta)], check=True)


def test_fanotify_sees_base_writes_made_through_an_overlay(tmp_path):
    """The events the sensor asks for (a copy-up's link or rename, a whiteout, a chmod; not the
    writes, closes and deletions that made most of its cost) still report every base write
    made the way a service makes it: through a real overlay of the base and the delta. A
    copy-up that is not sensitive raises nothing; its later chmod to setuid (an attribute
    change alone) does; a write to a base executable and the deletion of a base file do."""
    import os
    import select

    delta, base, merged = tmp_path / "delta", tmp_path / "base", tmp_path / "merged"
    for sub in ("usr/bin", "etc", "srv", "tmp"):
        (base / sub).mkdir(parents=True)
    (base / "usr/bin/tool").write_text("#!/bin/sh\n")
    (base / "usr/bin/tool").chmod(0o755)
    (base / "etc/motd").write_text("hi\n")
    (base / "srv/data").write_text("plain\n")
    with _sensor_over_overlay(delta, base, merged) as sensor:

        def seen(wanted: int) -> dict[str, str]:
            found: dict[str, str] = {}
            while len(found) < wanted and select.select([sensor], [], [], 3)[0]:
                found |= {e.detail["path"]: e.detail["change"] for e in sensor.drain(2.0)}
            return found

        assert sensor.drain(1.0) == []  # the first drain walks once: an empty delta
        with open(merged / "srv/data", "a") as handle:  # a copy-up, not sensitive
            handle.write("more\n")
        (merged / "tmp/new").write_text("x")  # no base file
        assert seen(1) == {}
        os.chmod(merged / "srv/data", 0o4755)  # already in the delta: an attribute change
        assert seen(1) == {"/srv/data": "modified"}
        with open(merged / "usr/bin/tool", "a") as handle:
            handle.write("evil\n")
        (merged / "etc/motd").unlink()
        assert seen(2) == {"/usr/bin/tool": "modified", "/etc/motd": "deleted"}


def test_fanotify_ignores_what_a_new_directory_holds_until_it_is_moved(tmp_path):
    """Through a real overlay: once the sensor saw a directory made where the base has none,
    the kernel builds no event for the files made in it (the queue stays empty). Moved over a
    base directory the service emptied (its file's deletion is reported), it is watched again:
    a file made in it is an event again. (Every base file below a directory it replaces was
    deleted first, and reported then: "one path, one incident".)"""
    import os
    import select

    delta, base, merged = tmp_path / "delta", tmp_path / "base", tmp_path / "merged"
    (base / "opt/app").mkdir(parents=True)
    (base / "tmp").mkdir()
    (base / "opt/app/run").write_text("#!/bin/sh\n")
    (base / "opt/app/run").chmod(0o755)
    with _sensor_over_overlay(delta, base, merged) as sensor:

        def ready(timeout: float) -> bool:
            return bool(select.select([sensor], [], [], timeout)[0])

        assert sensor.drain(1.0) == []  # the first drain walks once: an empty delta
        (merged / "tmp/scratch").mkdir()
        assert ready(3) and sensor.drain(2.0) == []  # its creation, no base file
        for n in range(50):
            (merged / f"tmp/scratch/f{n}").write_text("x")
            os.rename(merged / f"tmp/scratch/f{n}", merged / f"tmp/scratch/g{n}")
        assert not ready(1)  # no event was built for the files
        (merged / "opt/app/run").unlink()
        assert ready(3)
        assert [(e.detail["path"], e.detail["change"]) for e in sensor.drain(2.0)] == [
            ("/opt/app/run", "deleted")]
        os.rename(merged / "tmp/scratch", merged / "opt/app")
        assert ready(3) and sensor.drain(2.0) == []
        (merged / "opt/app/new").write_text("x")
        assert ready(3)  # watched again: the file's creation is an event
        assert sensor.drain(3.0) == []


def test_fanotify_ignores_a_bound_empty_directory_of_the_base_from_the_start(tmp_path):
    """The image root binds the delta's upper/tmp on the base's empty /tmp (launch.imageroot)
    before the sensor starts: the sensor marks it at once, so the files a service makes
    there, through the bind, build no event; a directory made there still reports (and is
    then ignored in turn). An empty base directory whose delta copy appears later (a revert
    makes the delta anew) is marked from its creation's event. A base file elsewhere is still
    reported."""
    import os
    import select

    from corral.watch import delta_events

    delta, base, bound = tmp_path / "delta", tmp_path / "base", tmp_path / "bound"
    for sub in ("tmp", "var/tmp", "etc"):
        (base / sub).mkdir(parents=True)
    (base / "etc/motd").write_text("hi\n")
    delta.mkdir()
    bound.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "corral-test-delta", str(delta)],
                   check=True)
    try:
        for sub in ("upper/tmp", "upper/etc", "work"):
            (delta / sub).mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(delta / "upper/tmp"), str(bound)], check=True)
        sensor = delta_events.DeltaEvents(str(delta), str(base), interval=1e9)
        try:
            def ready(timeout: float) -> bool:
                return bool(select.select([sensor], [], [], timeout)[0])

            assert sensor.drain(1.0) == []  # the first drain walks once
            for n in range(20):
                (bound / f"f{n}").write_text("x")
                os.rename(bound / f"f{n}", bound / f"g{n}")
            assert not ready(1)  # marked from the start: no event was built
            (bound / "sub").mkdir()
            assert ready(3) and sensor.drain(2.0) == []  # a directory still reports
            (bound / "sub/file").write_text("x")
            assert not ready(1)
            (delta / "upper/var/tmp").mkdir(parents=True)  # as a revert makes it anew
            while ready(1):
                assert sensor.drain(2.0) == []
            (delta / "upper/var/tmp/file").write_text("x")
            assert not ready(1)
            (delta / "upper/etc/motd").write_text("evil\n")  # over a base file: reported
            found: list[Any] = []
            while not found and ready(3):
                found += sensor.drain(3.0)
            assert [(e.detail["path"], e.detail["change"]) for e in found] == [
                ("/etc/motd", "modified")]
        finally:
            sensor.close()
            subprocess.run(["umount", str(bound)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(delta)], check=True)

"""Escape by stalling (red team 2026-12-04, finding 6; issue 16 finding 5): the supervisor did
all its work on one thread, so a sparse file in a journaled volume (1 TiB of holes costs the
service one block) froze it while an epoch close hashed zeros: an exec attempt meanwhile waited
in the kernel for as long as the attacker liked, and was recorded with a false latency.

Now the journal's scan reads data only (SEEK_DATA/SEEK_HOLE) within a per-pass budget, lists
what it could not hash, and epoch closes run on a worker thread: detection and reaction go on.
Its own service (port 8085), whose volume is journaled."""

from __future__ import annotations

import json
import time

import pytest

from .attack import Contained, new_service_name, service_manifest

pytestmark = pytest.mark.root

ATTACK = r'''
import socket, time
@attempt("sparse")
def _():
    fd = os.open("/srv/stall/holes", os.O_CREAT | os.O_WRONLY, 0o600)
    os.pwrite(fd, b"x" * 4096, 2**40 // 2)
    os.ftruncate(fd, 2**40)  # 1 TiB of holes
    os.close(fd)
    # Within the journal's budget: 3 GiB of zeros to hash, a slow close that costs no disk.
    fd = os.open("/srv/stall/slow", os.O_CREAT | os.O_WRONLY, 0o600)
    os.pwrite(fd, b"y" * 4096, 0)
    os.ftruncate(fd, 3 << 30)
    os.close(fd)
    time.sleep(1.0)  # not fresh: the close's first scan, while the service runs, reads them
    return os.stat("/srv/stall/holes").st_blocks + os.stat("/srv/stall/slow").st_blocks

@attempt("trigger")
def _():
    # An undeclared packet: an incident, whose epoch close scans the volume.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", ("127.0.0.1", 9))
    except OSError as exc:
        return errname(exc)
    time.sleep(0.3)  # the close is under way now
    return time.time()

@attempt("exec")
def _():
    start = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            # in the image, executable, not allowed (a file with no x bit would get EACCES: the
            # kernel refuses it to anyone, so the wire answers it without an incident)
            os.execve("/lib64/ld-linux-x86-64.so.2", ["ld.so", "--version"], {})
        except OSError as exc:
            os._exit(exc.errno)
        os._exit(0)
    while time.time() - start < 20:  # not stuck: well beyond the 2 s the test allows
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"errno": os.waitstatus_to_exitcode(status), "at": start,
                    "took": time.time() - start}
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return {"errno": None, "at": start, "took": time.time() - start}
'''


@pytest.fixture(scope="module")
def stalled(escape_env):
    name = new_service_name()
    manifest = service_manifest(escape_env.tmp, name, 8085, "/srv/stall")
    text = manifest.read_text().replace('mode = "0750"', 'mode = "0750"\njournal = true', 1)
    manifest.write_text(text)
    assert "journal = true" in text
    service = Contained(name, escape_env.netns, escape_env.root, manifest, 8085)
    try:
        service.corral("install", str(manifest), check=True)
        service.corral("up", str(manifest), check=True)
        yield service, service.attack(ATTACK, timeout=90)
    finally:
        service.corral("down", name, timeout=120)
        service.corral("uninstall", name, "--purge")
        import subprocess
        subprocess.run(["userdel", service.user], capture_output=True)


def test_an_exec_during_a_slow_journal_close_is_refused_and_recorded_promptly(stalled):
    service, results = stalled
    assert results["sparse"]["outcome"] == "returned", results
    assert results["sparse"]["value"] < 128, results  # sparse: no real bytes
    exec_try = results["exec"]["value"]
    assert exec_try["errno"] == 1, results  # EPERM, not stuck in the kernel
    assert exec_try["took"] < 2.0, results
    records = json.loads(service.corral("incidents", service.name, "--json",
                                        check=True).stdout)["incidents"]
    execs = [r for r in records if r["tripwire"] == "exec"]
    assert execs, records
    detected = time.mktime(time.strptime(execs[0]["detected_at"][:19], "%Y-%m-%dT%H:%M:%S")) \
        - time.timezone
    assert detected - exec_try["at"] < 2.0, (execs[0], exec_try)
    assert execs[0]["act_clock"] == "notification", execs[0]
    assert service.status()["state"] == "running"


def test_the_journal_says_what_it_could_not_hash(stalled):
    service, _ = stalled
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = service.corral("state", "log", service.name, "--json")
        if "holes" in done.stdout:
            break
        time.sleep(1)
    assert "holes" in done.stdout and "skipped" in done.stdout, done.stdout[-2000:]
    epochs = json.loads(done.stdout)["volumes"][0]["epochs"]
    skipped = [e.get("skipped") for e in epochs if e["reason"] == "incident"]
    assert [{"path": "holes"}] in skipped, json.dumps(epochs)


def test_the_exec_was_answered_while_the_close_ran(stalled):
    """The incident's epoch ended after the exec was refused: the close was still hashing."""
    service, results = stalled
    done = service.corral("state", "log", service.name, "--json", check=True)
    epochs = json.loads(done.stdout)["volumes"][0]["epochs"]
    first = [e for e in epochs if e["reason"] == "incident"][0]
    end = time.mktime(time.strptime(first["end"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone \
        + float("0." + first["end"][20:26] if len(first["end"]) > 20 else 0)
    refused = results["exec"]["value"]["at"] + results["exec"]["value"]["took"]
    assert end > refused, (first, results["exec"])

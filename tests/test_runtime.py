"""Running a service contained, for real: the sample serves requests as its own user on a
base + delta root, restarts when it crashes, and leaves nothing behind when it stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import Service, corral, notes_manifest

pytestmark = pytest.mark.root


def mounts_mentioning(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [line for line in handle if text in line]


def processes_in_cgroups_of(service: str) -> list[int]:
    """Live processes whose cgroup is one of the service's (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as handle:
                text = handle.read()
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"/corral/{service}/" in text and state != "Z":
            found.append(int(entry))
    return found


def cgroups_of(service: str) -> list[str]:
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(top) == service and "/corral" in top:
            found.append(top)
        if top.count("/") > 6:
            dirs.clear()
    return found


def test_the_sample_serves_requests_contained(notes):
    assert notes.http("/health") == b"ok\n"
    assert notes.http("/notes", data=b"first note") == b"stored\n"
    assert b"first note" in notes.http("/notes")
    # The note is on the volume, owned by the service's user, outside the delta.
    stored = notes.state_dir / "volumes/srv-notes/notes.jsonl"
    assert b"first note" in stored.read_bytes()
    status = notes.status()
    app = status["processes"][0]
    assert status["state"] == "running" and app["state"] == "running"
    assert app["user"] == f"corral-{notes.name}-app"
    assert status["landlock"].startswith("landlock ABI")
    # The program really runs as that user, with nothing left of root.
    with open(f"/proc/{app['pid']}/status") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    assert fields["Uid"].split()[0] == str(app["uid"])
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    assert fields["Groups"].strip() == ""
    # Its cgroup exists and carries the manifest's limits.
    assert cgroups_of(notes.name), "no cgroup for the service"
    with open(f"/proc/{app['pid']}/cgroup") as handle:
        assert f"/corral/{notes.name}/app" in handle.read()


def test_exec_runs_inside_the_same_containment(notes):
    result = notes.exec(
        "import os, socket; print(os.getuid(), os.getgroups(), socket.gethostname(), "
        "os.path.exists('/bin/sh'), sorted(os.listdir('/proc'))[0] != '', "
        "open('/proc/self/status').read().count('NoNewPrivs:\\t1'))")
    assert result.returncode == 0, result.stderr
    uid, rest = result.stdout.split(" ", 1)
    assert int(uid) == notes.status()["processes"][0]["uid"]
    assert rest.strip() == f"[] {notes.name} False True 1"


def test_exec_exit_code_and_unknown_process(notes):
    # The command's own code passes through; exec's own failures take docker's 125/126/127,
    # so a command's 1, 2 or 3 is never mistaken for corral's (docs/cli.md).
    assert notes.exec("raise SystemExit(7)").returncode == 7
    assert notes.exec("raise SystemExit(2)").returncode == 2
    result = notes.corral("exec", notes.name, "nosuch", "--", "/usr/bin/python3.11")
    assert result.returncode == 125 and "no process 'nosuch'" in result.stderr
    result = notes.exec("", argv=["/usr/bin/no-such-program"])
    assert result.returncode == 127 and "Traceback" not in result.stderr, result.stderr
    result = notes.exec("", argv=["/opt/notes/notes.py"])  # in the image, not executable
    assert result.returncode == 126 and "Traceback" not in result.stderr, result.stderr


def test_writes_land_in_the_delta_and_down_discards_them(notes):
    assert notes.exec("open('/tmp/scratch', 'w').write('x')").returncode == 0
    # Seen through the supervisor's mount namespace (`ip netns exec` gives the test's corral
    # commands a mount namespace of their own, so the delta tmpfs is not in ours).
    supervisor = notes.status()["supervisor"]
    delta = f"/proc/{supervisor}/root{notes.root}/run/corral/{notes.name}/delta/upper/tmp/scratch"
    assert open(delta).read() == "x"
    notes.corral("down", notes.name, check=True)
    notes.corral("up", str(notes.manifest), check=True)
    assert notes.exec("import os; print(os.path.exists('/tmp/scratch'))").stdout == "False\n"


VOLUME_WORK = """
import os
os.makedirs('/srv/notes/a/b')
open('/srv/notes/a/b/kept', 'w').write('kept')
open('/srv/notes/gone', 'w').write('gone')
os.unlink('/srv/notes/gone')
os.rename('/srv/notes/a', '/srv/notes/moved')
os.link('/srv/notes/moved/b/kept', '/srv/notes/hard')
os.symlink('moved/b/kept', '/srv/notes/soft')
line = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] == '/srv/notes'][0]
print(line[3], line[line.index('-') + 1])
"""


def test_a_volume_stores_plain_files_and_hides_its_host_path(notes):
    """The volume is an overlay over an empty layer (its root is "/" in mountinfo, not the
    state directory's path), yet what the service does lands in the volume directory as plain
    files: renamed directories, deletions, links, no whiteouts, and it persists."""
    result = notes.exec(VOLUME_WORK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["/", "overlay"]
    volume = notes.state_dir / "volumes/srv-notes"
    names = sorted(str(p.relative_to(volume)) for p in volume.rglob("*"))
    assert {"moved", "moved/b", "moved/b/kept", "hard", "soft"} <= set(names)
    assert "gone" not in names and "a" not in names
    assert (volume / "hard").stat().st_ino == (volume / "moved/b/kept").stat().st_ino
    assert os.readlink(volume / "soft") == "moved/b/kept"
    # The one trace of the overlay: a directory made at the volume's top (the overlay's root
    # merges the empty layer) is marked opaque; nothing else carries overlay metadata.
    for path in [volume, *volume.rglob("*")]:
        marks = [x for x in os.listxattr(path, follow_symlinks=False)
                 if x.startswith("trusted.overlay.")]
        allowed = ["trusted.overlay.opaque"] if path.parent == volume and path.is_dir() else []
        assert marks in ([], allowed), (path, marks)
    notes.corral("down", notes.name, check=True)
    notes.corral("up", str(notes.manifest), check=True)
    kept = notes.exec("print(open('/srv/notes/hard').read())")
    assert kept.stdout == "kept\n", kept.stderr


@pytest.fixture
def overlay_root(tmp_path, corral_root):
    """CORRAL_ROOT on an overlay file system (as in a container), which cannot be the upper
    layer of another overlay."""
    layers = tmp_path / "layers"
    for sub in ("lower", "upper", "work"):
        (layers / sub).mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "-o", f"lowerdir={layers}/lower,upperdir="
                    f"{layers}/upper,workdir={layers}/work", "tst-overlay", str(corral_root)],
                   check=True)
    try:
        yield corral_root
    finally:
        subprocess.run(["umount", "-l", str(corral_root)], check=False)


def test_a_volume_on_a_file_system_overlay_cannot_use_is_bind_mounted(tmp_path, overlay_root,
                                                                       netns, service_name):
    """The fallback: the service still runs and keeps its volume; status says what it lost."""
    manifest = notes_manifest(tmp_path, service_name)
    corral("install", str(manifest), netns=netns, check=True)
    svc = Service(service_name, netns, overlay_root, manifest)
    try:
        svc.corral("up", str(manifest), check=True)
        assert svc.http("/notes", data=b"on a bind mount") == b"stored\n"
        assert b"on a bind mount" in (svc.state_dir / "volumes/srv-notes/notes.jsonl").read_bytes()
        status = svc.status()
        assert len(status["warnings"]) == 1 and "volume /srv/notes is bind-mounted" in \
            status["warnings"][0]
        # The kernel will not mount the base's erofs image straight from a file on an overlay
        # (EINVAL); a loop device will (launch.imageroot), so the root is still the image.
        with open(f"/proc/{status['processes'][0]['pid']}/mountinfo") as handle:
            root = [ln.partition(" - ")[2].split()[:2] for ln in handle if ln.split()[4] == "/"]
        assert root[0][0] == "erofs" and root[0][1].startswith("/dev/loop")
        text = svc.corral("status", service_name, check=True).stdout
        assert "warning: volume /srv/notes is bind-mounted" in text
    finally:
        svc.corral("down", service_name)
        svc.corral("uninstall", service_name, "--purge")


def test_no_warning_when_every_volume_is_an_overlay(notes):
    assert notes.status()["warnings"] == []


def test_a_crashed_process_is_restarted(notes):
    before = notes.status()["processes"][0]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        now = notes.status()["processes"][0]
        if now["state"] == "running" and now["pid"] != before["pid"]:
            break
        time.sleep(0.1)
    assert now["restarts"] == 1 and now["state"] == "running" and now["pid"] != before["pid"]
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            assert notes.http("/health", timeout=1) == b"ok\n"
            break
        except AssertionError:
            time.sleep(0.1)
    else:
        raise AssertionError("not serving again after the restart")


def test_down_leaves_no_process_mount_or_cgroup(notes):
    pid = notes.status()["processes"][0]["pid"]
    child = notes.exec("import os, time; os.fork(); time.sleep(0.1)")
    assert child.returncode == 0
    notes.corral("down", notes.name, check=True)
    assert not os.path.exists(f"/proc/{pid}")
    assert mounts_mentioning(notes.name) == []
    assert cgroups_of(notes.name) == []
    assert processes_in_cgroups_of(notes.name) == []
    assert notes.status()["state"] == "down"


def test_the_supervisors_death_takes_every_process_with_it(notes):
    status = notes.status()
    pid = status["processes"][0]["pid"]
    os.kill(status["supervisor"], signal.SIGKILL)
    deadline = time.time() + 5
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    # down cleans what the dead supervisor could not: the delta mount and the cgroups.
    notes.corral("down", notes.name, check=True)
    assert mounts_mentioning(notes.name) == []
    assert cgroups_of(notes.name) == []


def test_uninstall_after_the_supervisors_death_leaves_nothing(tmp_path, corral_root, netns,
                                                              service_name):
    manifest = notes_manifest(tmp_path, service_name)
    corral("install", str(manifest), netns=netns, check=True)
    svc = Service(service_name, netns, corral_root, manifest)
    try:
        svc.corral("up", str(manifest), check=True)
        os.kill(svc.status()["supervisor"], signal.SIGKILL)
        svc.corral("uninstall", service_name, "--purge", check=True)
        assert mounts_mentioning(service_name) == []
        assert cgroups_of(service_name) == []
    finally:
        svc.corral("uninstall", service_name, "--purge")


def test_up_fails_clearly_when_the_program_cannot_start(tmp_path, corral_root, netns,
                                                       service_name):
    manifest = notes_manifest(tmp_path, service_name).read_text().replace(
        '"/opt/notes/notes.py", "8080"]', '"/opt/notes/missing.py", "8080"]')
    path = tmp_path / "broken.toml"
    path.write_text(manifest)
    corral("install", str(path), netns=netns, check=True)
    try:
        result = corral("up", str(path), netns=netns)
        assert result.returncode == 1
        assert f"{service_name}: " in result.stderr and "Traceback" not in result.stderr
        assert mounts_mentioning(service_name) == [] and cgroups_of(service_name) == []
    finally:
        corral("down", service_name, netns=netns)
        corral("uninstall", service_name, "--purge", netns=netns)


def test_status_json_for_a_stopped_service(tmp_path, corral_root, netns, service_name):
    manifest = notes_manifest(tmp_path, service_name)
    corral("install", str(manifest), netns=netns, check=True)
    try:
        status = corral("status", service_name, "--json", check=True)
        data = json.loads(status.stdout)["services"][0]
        assert data["state"] == "down" and data["processes"][0]["state"] == "down"
        assert corral("status", "nosuchsvc").returncode == 2
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)


def test_run_copies_every_line_of_output(tmp_path, corral_root, netns, service_name):
    """The supervisor copies a process's output in batches (one wake per window, not per
    line): nothing is lost, in order, on the terminal of `corral run` and in the log file,
    also when the process writes more than a pipe's default 64 KiB before exiting."""
    from conftest import write_manifest

    lines = 30000  # ~170 KB
    # `split` writes half a line, pauses past the copy window, then the rest: the two halves
    # arrive in two reads, and must still be shown as one line.
    split = ("import sys, time\\nfor _ in range(3):\\n"
             "    sys.stdout.write('ab'); sys.stdout.flush(); "
             "time.sleep(0.1); sys.stdout.write('cd\\\\n'); sys.stdout.flush()\\n"
             "sys.stdout.write('no newline at the end')")
    manifest = write_manifest(tmp_path, service_name, f'''
[image]
include = ["/usr/bin/seq", "/usr/bin/python3.11", "/usr/lib/python3.11"]
[process.main]
command = ["/usr/bin/seq", "{lines}"]
[process.split]
command = ["/usr/bin/python3.11", "-I", "-c", "{split}"]
''')
    corral("install", str(manifest), netns=netns, check=True)
    try:
        result = corral("run", str(manifest), netns=netns)
        assert result.returncode == 0, result.stderr
        shown = [line for line in result.stdout.splitlines() if line.startswith("main| ")]
        assert shown == [f"main| {n}" for n in range(1, lines + 1)]
        assert [line for line in result.stdout.splitlines() if line.startswith("split| ")] \
            == ["split| abcd"] * 3 + ["split| no newline at the end"]
        log = corral_root / "var/log/corral" / service_name / "main.log"
        # Each line stamped with the time the supervisor read it (corral logs --since).
        assert [line.split(" ", 1)[1] for line in log.read_text().splitlines()] \
            == [str(n) for n in range(1, lines + 1)]
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)

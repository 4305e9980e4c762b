"""Escape by flood (red team 2026-12-04, finding 9; issue 16): a volume had no limit, so one
service filled the host's file system and the journal's epochs stopped closing; a delta on disk
likewise. Now a volume with `size` (and every disk delta) is an ext4 of its own in a sparse
image, loop-mounted (host.loopfs): the write fails with ENOSPC at about the declared size, the
host's file system loses at most that, the supervisor raises one `flood` incident per episode
(watch.floods), and the journal goes on closing epochs. corral's own writes keep a reserve on
the state file system (core.fsio.keep_reserve): refused, recorded, an incident.

Its own service (port 8090): a journaled 32 MiB volume and a 32 MiB disk delta."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from corral.core.text import parse_iso

from .attack import Contained, returned, started

pytestmark = pytest.mark.root

SIZE = 32 << 20
VOLUME = "/srv/flood"
STORE = "srv-flood"

FILL = r'''
import time

def fill(path):
    """Write one incompressible MiB again and again until the kernel refuses."""
    block, written = os.urandom(1 << 20), 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                written += os.write(fd, block)
        finally:
            os.close(fd)
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno, str(exc.errno)), "written": written,
                "at": time.time()}
    return {"errno": None, "written": written}

@attempt("fill")
def _():
    return fill(PARAMS["path"])
'''

LOOK = r'''
@attempt("listing")
def _():
    return sorted(os.listdir(PARAMS["volume"]))

@attempt("mountinfo")
def _():
    with open("/proc/self/mountinfo") as handle:
        return [line for line in handle if " " + PARAMS["volume"] + " " in line]
'''


def sized(text: str) -> str:
    """The sample's manifest with a journaled sized volume and a small disk delta."""
    text = text.replace('mode = "0750"\n', f'mode = "0750"\nsize = "{SIZE >> 20}M"\n'
                        'journal = true\nepoch = "1h"\n', 1)
    return text.replace("[image]\n", f'[image]\ndelta = "disk"\ndelta_size = "{SIZE >> 20}M"\n',
                        1)


def host_bytes(top: Path) -> int:
    """Bytes allocated under `top` on its own file system only (a loop-mounted volume's files
    are counted once, as its image's blocks): what the host's disk lost there."""
    dev, total = os.lstat(top).st_dev, 0
    for parent, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(parent, d)).st_dev == dev]
        for name in files:
            try:
                st = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            if st.st_dev == dev:
                total += st.st_blocks * 512
    return total


def floods(service: Contained) -> list[dict]:
    out = service.corral("incidents", service.name, "--json", check=True)
    return [i for i in json.loads(out.stdout)["incidents"] if i["tripwire"] == "flood"]


def wait_for_floods(service: Contained, count: int, filesystem: str = "volume",
                    within: float = 30.0) -> list[dict]:
    """The flood incidents of `filesystem` ("volume", "delta"), once there are `count` (or
    the deadline passed)."""
    deadline = time.monotonic() + within
    while True:
        found = [i for i in floods(service) if i["detail"].get("filesystem") == filesystem]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


@pytest.fixture(scope="module")
def flooded(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8090, volume=VOLUME,
                 edit=sized) as service:
        supervisor = service.status()["supervisor"]
        before = host_bytes(service.root)
        results = service.attack(FILL, {"path": f"{VOLUME}/flood"}, timeout=120)
        after = host_bytes(service.root)
        yield service, results["fill"], supervisor, after - before


def test_the_write_ends_in_enospc_at_about_the_declared_size(flooded):
    _, outcome, _, _ = flooded
    filled = returned({"fill": outcome}, "fill")
    assert filled["errno"] == "ENOSPC", filled
    # ext4's own metadata (journal, inode tables) takes its share of a small file system
    assert SIZE * 3 // 4 <= filled["written"] <= SIZE, filled


def test_the_host_lost_at_most_the_size(flooded):
    service, _, _, grown = flooded
    image = service.state_dir / "volume-images" / f"{STORE}.img"
    assert image.stat().st_size == SIZE
    assert image.stat().st_blocks * 512 <= SIZE
    # the image, plus the journal's copy of one MiB written again and again (deduplicated)
    assert grown <= SIZE + (8 << 20), grown


def test_one_flood_incident_names_the_volume_and_the_supervisor_lives(flooded):
    service, outcome, supervisor, _ = flooded
    found = wait_for_floods(service, 1)
    volume = [i for i in found if i["detail"].get("volume") == VOLUME]
    assert len(volume) == 1, found
    detail = volume[0]["detail"]
    assert detail["filesystem"] == "volume" and detail["size"] == SIZE
    assert detail["used"] >= SIZE * 3 // 4 and detail["owner"] == "app"
    assert volume[0]["process"] == "app" and volume[0]["reaction"] == "log"
    status = service.status()
    assert status["supervisor"] == supervisor and status["state"] == "running"
    assert status["sensors"]["flood"].startswith("on"), status["sensors"]
    detected = parse_iso(volume[0]["detected_at"])  # the host's clock; the service's is too
    print(f"flood detected {1000 * (detected - outcome['value']['at']):+.1f} ms after the "
          "write that met ENOSPC (negative: at the low mark, before it)")
    time.sleep(2)  # eight ticks of the sensor later: still one (an episode, not a tick)
    assert len([i for i in floods(service) if i["detail"].get("volume") == VOLUME]) == 1


def test_epochs_still_close(flooded):
    service, _, _, _ = flooded
    mark = service.corral("state", "mark", service.name, "--json")
    assert mark.returncode == 0, mark.stderr
    assert json.loads(mark.stdout)["epochs"][0]["volume"] == VOLUME
    log = service.corral("state", "log", service.name, check=True).stdout
    assert "mark" in log
    assert service.status()["journals"] == {VOLUME: "ok"}


def test_the_service_sees_its_volume_only(flooded):
    service, _, _, _ = flooded
    seen = service.attack(LOOK, {"volume": VOLUME})
    assert returned(seen, "listing") == ["flood"]  # no lost+found, no overlay work directory
    [line] = returned(seen, "mountinfo")
    assert " - overlay corral-volume " in line and str(service.root) not in line, line


def test_a_new_episode_after_space_is_freed(flooded):
    service, _, _, _ = flooded
    gone = service.exec(f"import os; os.unlink({VOLUME + '/flood'!r})")
    assert gone.returncode == 0, gone.stderr
    time.sleep(1)  # the sensor sees the free space (the episode ends)
    again = service.attack(FILL, {"path": f"{VOLUME}/flood2"}, timeout=120)
    assert returned(again, "fill")["errno"] == "ENOSPC"
    found = wait_for_floods(service, 2)
    assert len([i for i in found if i["detail"].get("volume") == VOLUME]) == 2, found


def test_a_disk_delta_is_bounded_too(flooded):
    service, _, supervisor, _ = flooded
    results = service.attack(FILL, {"path": "/tmp/flood"}, timeout=120)
    filled = returned(results, "fill")
    assert filled["errno"] == "ENOSPC" and filled["written"] <= SIZE, filled
    image = service.state_dir / "delta.img"
    assert image.stat().st_size == SIZE and image.stat().st_blocks * 512 <= SIZE
    delta = wait_for_floods(service, 1, "delta")
    assert len(delta) == 1 and delta[0]["detail"]["delta"] == "disk", delta
    assert service.status()["supervisor"] == supervisor


def test_an_excision_rewrites_a_sized_volume(flooded):
    """The journal's other half: an excision writes into the volume's own file system (through
    the running service's mount) and takes the flood's second file out."""
    service, _, _, _ = flooded
    log = json.loads(service.corral("state", "log", service.name, "--json", check=True).stdout)
    epochs = log["volumes"][0]["epochs"]
    # each flood incident closed an epoch; the volume's second flood changed it
    holding = [e["id"] for e in epochs if e["reason"] == "incident" and e["files_changed"]]
    assert holding, epochs
    mark = service.corral("state", "mark", service.name, check=True)
    assert mark.returncode == 0
    excise = service.corral("state", "excise", service.name, "--from", str(holding[-1]),
                            "--to", str(holding[-1]))
    assert excise.returncode == 0, excise.stderr
    assert "flood2" in excise.stdout
    left = service.attack(LOOK, {"volume": VOLUME})
    assert "flood2" not in returned(left, "listing")


def loop_devices_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()


def mounts_under(top: Path) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4] for line in handle if line.split()[4].startswith(str(top))]


def test_after_a_reboot_up_mounts_it_again_and_uninstall_undoes_it(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8091, volume=VOLUME,
                 edit=sized) as service:
        wrote = service.exec(f"open({VOLUME + '/kept'!r}, 'w').write('still here')")
        assert wrote.returncode == 0, wrote.stderr
        service.corral("down", service.name, check=True)
        state = service.state_dir
        for mount in (state / "volumes" / STORE, state / "volume-fs" / STORE, state / "delta"):
            subprocess.run(["umount", str(mount)], check=True)  # as a reboot leaves them
        # the journal never reads the empty mount point as "every file deleted"
        refused = service.corral("state", "mark", service.name)
        assert refused.returncode != 0 and "not mounted" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        service.corral("up", str(service.manifest), check=True)
        read = service.exec(f"print(open({VOLUME + '/kept'!r}).read())")
        assert read.stdout.strip() == "still here", read.stderr
        service.corral("down", service.name, check=True)
        image = state / "volume-images" / f"{STORE}.img"
        gone = service.corral("uninstall", service.name, check=True)
        assert "unmounted" in gone.stdout
        assert mounts_under(state) == [] and image.exists()
        deadline = time.monotonic() + 30  # a lazy unmount lets the loop device go soon after
        while loop_devices_of(image) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert loop_devices_of(image) == ""
        # installed again, the volume's files are there
        service.corral("install", str(service.manifest), check=True)
        assert (state / "volumes" / STORE / "kept").read_text() == "still here"
        service.corral("uninstall", service.name, "--purge", check=True)
        assert mounts_under(state) == [] and not state.exists()


def journaled(text: str) -> str:
    """The sample's manifest with its (unsized) volume journaled."""
    return text.replace('mode = "0750"\n', 'mode = "0750"\njournal = true\nepoch = "1h"\n', 1)


@pytest.fixture
def small_state(escape_env, monkeypatch):
    """A CORRAL_ROOT on a 320 MiB ext4 of its own, so the test can bring the state file system
    under corral's reserve (64 MiB) without touching the host's."""
    image, top = escape_env.tmp / "small-state.img", escape_env.tmp / "small-state"
    with open(image, "wb") as handle:
        handle.truncate(320 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    top.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(top)], check=True)
    try:
        monkeypatch.setenv("CORRAL_ROOT", str(top))
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=True)
        image.unlink()


def test_corral_keeps_its_reserve_on_the_state_file_system(escape_env, small_state):
    with started(escape_env.tmp, small_state, escape_env.netns, port=8092,
                 edit=journaled) as service:
        wrote = service.exec("open('/srv/notes/note', 'w').write('a note')")
        assert wrote.returncode == 0, wrote.stderr
        supervisor = service.status()["supervisor"]
        # the rest of the host fills the state file system up to 32 MiB of free space
        st = os.statvfs(small_state)
        filler = small_state / "filler"
        with open(filler, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, st.f_bavail * st.f_frsize - (32 << 20))
        mark = service.corral("state", "mark", service.name)
        assert mark.returncode != 0 and "corral keeps 64.0 MiB in reserve" in mark.stderr, \
            mark.stderr
        assert "Traceback" not in mark.stderr
        found = wait_for_floods(service, 1, "state")
        assert len(found) == 1, found
        assert found[0]["detail"]["reserve"] == 64 << 20
        assert found[0]["detail"]["free"] < 64 << 20
        assert found[0]["reaction"] == "log"  # nothing says this service filled it
        # the incident's own close (on the supervisor's journal thread) was refused and says so
        deadline = time.monotonic() + 30
        while "reserve" not in service.status()["journals"]["/srv/notes"] \
                and time.monotonic() < deadline:
            time.sleep(0.25)
        assert "reserve" in service.status()["journals"]["/srv/notes"]
        # a revert's archive is refused too; the revert happens all the same
        revert = service.corral("revert", service.name)
        assert revert.returncode == 0, revert.stderr
        log = (small_state / "run/corral" / service.name / "supervisor.log").read_text()
        assert "archiving the delta failed" in log and "in reserve" in log, log[-2000:]
        assert service.status()["supervisor"] == supervisor
        assert service.serving()
        filler.unlink()  # space again: epochs close
        mark = service.corral("state", "mark", service.name)
        assert mark.returncode == 0, mark.stderr

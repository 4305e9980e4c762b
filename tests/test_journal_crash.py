"""Crash consistency of the redo log: close_epoch, excise and commit run in a forked child that
is SIGKILLed at every durability point (journal_store's test hook: the child kills itself at
its Nth fsync/rename/unlink) and at random instants; also with the journal's disk full (a tiny
tmpfs). After each: check() passes, no committed epoch (head.json replaced before the kill) is
lost or altered, and the log still describes the volume exactly.

These are process crashes: the page cache survives them. Power loss (unflushed writes lost)
would need a block-level recorder (dm-log-writes) and is not simulated here; the fsync order
it depends on is what the durability points mark."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

from corral.core.errors import RuntimeFailure
from corral.recover.journal import store as journal_store
from corral.recover.journal.journal import Journal

FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None
FUTURE = 4_000_000_000.0  # a clock for commit: every epoch is long past quiet


def in_child(fn: Callable[[], Any], crash_after: int = 0,
             kill_after: float | None = None) -> tuple[bool, dict[str, Any] | None]:
    """Run fn in a forked child, which SIGKILLs itself at its crash_after-th durability point
    or is killed after kill_after seconds. Returns (killed, what the child reported)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            journal_store.crash_after, journal_store._points = crash_after, 0
            result = fn()
            report = {"ok": True, "result": result, "points": journal_store._points}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(report, default=str).encode())
        os._exit(0)
    os.close(write_end)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # a zombie until waited for: the pid cannot be reused
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as handle:
        data = handle.read()
    return os.WIFSIGNALED(status), json.loads(data) if data else None


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def volume_view(vol: Path) -> dict[bytes, tuple]:
    out: dict[bytes, tuple] = {}
    base = os.fsencode(vol)
    for top, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, base)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.fsdecode(os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                with open(path, "rb") as handle:
                    out[rel] = ("file", st.st_mode & 0o7777, b3(handle.read()))
    return out


def journal_view(state: Path) -> dict[bytes, tuple]:
    """The volume as the log says it is: the baseline with every live epoch replayed."""
    j = Journal(state, "v")
    head = j.head()
    out: dict[bytes, tuple] = {}
    for path, m in j._replay(head, head["epoch"]).items():
        key = os.fsencode(path)
        out[key] = ("symlink", m.target) if m.kind == "symlink" else \
            ("dir", m.mode) if m.kind == "dir" else ("file", m.mode, m.digest)
    return out


def committed(state: Path) -> dict[str, Any]:
    head = json.loads((state / "journal/v/head.json").read_bytes())
    records = {}
    for epoch in range(head["first"], head["epoch"] + 1):
        records[epoch] = b3((state / f"journal/v/epochs/{epoch:08d}.json").read_bytes())
    return {"head": head, "records": records}


def assert_sound(state: Path, before: dict[str, Any], folding: bool = False) -> dict[str, Any]:
    """check() passes (it also cleans up and finishes an interrupted excision) and every epoch
    committed before is still there, byte for byte (or, for commit, folded into the
    baseline)."""
    result = Journal(state, "v").check()
    assert result["problems"] == [], result
    after = committed(state)
    assert after["head"]["epoch"] >= before["head"]["epoch"]
    for epoch, digest in before["records"].items():
        if epoch >= after["head"]["first"]:
            assert after["records"][epoch] == digest, f"epoch {epoch} changed"
        else:
            assert folding, f"epoch {epoch} lost"
    leftovers = [p for p in (state / "journal/v").rglob("*") if p.name.endswith(".tmp")
                 or ".staging/" in str(p)]
    assert leftovers == []
    return after


def fill(vol: Path, seed: int) -> None:
    rng = random.Random(seed)
    (vol / "d").mkdir(exist_ok=True)
    for i in range(8):
        (vol / f"d/f{i}").write_bytes(rng.randbytes(rng.randint(0, 3000)))
    (vol / "big").write_bytes(rng.randbytes(2 * journal_store.CHUNK + 999))
    if not (vol / "link").is_symlink():
        os.symlink("/etc/shadow", vol / "link")


def modify(vol: Path, seed: int) -> None:
    """Some of everything: content, create, delete, chmod, a chunk of the big file."""
    rng = random.Random(seed)
    (vol / "d/f1").write_bytes(rng.randbytes(100))
    (vol / f"new{seed}").write_bytes(rng.randbytes(500))
    (vol / "d/f2").unlink(missing_ok=True)
    os.chmod(vol / "d/f3", 0o600)
    with open(vol / "big", "r+b") as handle:
        handle.seek(journal_store.CHUNK + 10)
        handle.write(rng.randbytes(64))


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        yield Path(tmp)


def template(root: Path, incidents: bool = False) -> Path:
    """A journal with a few epochs: baseline, good writes, (an attack), more good writes."""
    state = root / "template"
    vol = state / "volumes/v"
    vol.mkdir(parents=True)
    fill(vol, 1)
    page = [f"line {i}\n".encode() for i in range(10)]
    (vol / "notes.jsonl").write_bytes(b'{"text": "good 1"}\n')
    (vol / "page.html").write_bytes(b"".join(page))
    j = Journal(state, "v")
    j.ensure()
    modify(vol, 2)
    j.close_epoch("schedule")
    if incidents:
        (vol / "d/f4").write_bytes(b"defaced")
        (vol / "backdoor").write_bytes(b"#!/bin/sh\n")
        (vol / "big").write_bytes(b"truncated by the attacker")
        with open(vol / "notes.jsonl", "ab") as handle:
            handle.write(b'{"text": "ATTACKER"}\n')
        page[2] = b"<script>defaced</script>\n"
        (vol / "page.html").write_bytes(b"".join(page))
        j.close_epoch("incident", incidents=["inc-1"])
    with open(vol / "notes.jsonl", "ab") as handle:  # merged at excision: by byte ranges
        handle.write(b'{"text": "good 2"}\n')
    page[7] = b"line 7, edited later\n"  # and by lines
    (vol / "page.html").write_bytes(b"".join(page))
    modify(vol, 3)
    j.close_epoch("schedule")
    return state


def fresh(root: Path, tpl: Path, i: int) -> Path:
    state = root / f"run{i}"
    shutil.copytree(tpl, state, symlinks=True)
    return state


def count_points(fn: Callable[[], Any]) -> tuple[int, float]:
    started = time.monotonic()
    killed, report = in_child(fn, crash_after=10**9)
    assert not killed and report["ok"], report
    return report["points"], time.monotonic() - started


def crash_everywhere(root: Path, tpl: Path, prepare: Callable[[Path], None],
                     op: Callable[[Path], Any], after: Callable[[Path, dict, bool], None],
                     random_kills: int) -> int:
    """The op SIGKILLed at each of its durability points, then at random instants."""
    probe = fresh(root, tpl, 0)
    prepare(probe)
    points, seconds = count_points(lambda: op(probe))
    assert points > 5
    print(f"{points} durability points, {seconds * 1000:.0f} ms")
    rng = random.Random(7)
    runs = [(n, None) for n in range(1, points + 1)]
    runs += [(0, rng.uniform(0, seconds)) for _ in range(random_kills)]
    for i, (crash_after, kill_after) in enumerate(runs, start=1):
        state = fresh(root, tpl, i)
        prepare(state)
        before = committed(state)
        killed, report = in_child(lambda state=state: op(state), crash_after, kill_after)
        assert killed or (report and report["ok"]), report
        after(state, before, killed)
        shutil.rmtree(state)
    return len(runs)


def test_close_epoch_survives_a_kill_anywhere(workdir):
    tpl = template(workdir)

    def after(state: Path, before: dict, killed: bool) -> None:
        now = assert_sound(state, before)
        assert now["head"]["epoch"] in (before["head"]["epoch"], before["head"]["epoch"] + 1)
        # Whatever the kill interrupted, the next close captures the rest: the log and the
        # volume agree.
        Journal(state, "v").close_epoch("mark")
        assert journal_view(state) == volume_view(state / "volumes/v")

    runs = crash_everywhere(workdir, tpl, lambda s: modify(s / "volumes/v", 9),
                            lambda s: Journal(s, "v").close_epoch("schedule"), after, 80)
    assert runs >= 90


def test_excise_survives_a_kill_anywhere(workdir):
    tpl = template(workdir, incidents=True)
    probe = fresh(workdir, tpl, 999)
    pre = volume_view(probe / "volumes/v")
    result = Journal(probe, "v").excise(2, 2, stopped=True)
    assert {m["path"] for m in result["merged"]} == {"notes.jsonl", "page.html"}
    done = volume_view(probe / "volumes/v")
    assert done != pre
    assert (probe / "volumes/v/notes.jsonl").read_bytes() == \
        b'{"text": "good 1"}\n{"text": "good 2"}\n'
    assert b"defaced" not in (probe / "volumes/v/page.html").read_bytes()
    shutil.rmtree(probe)

    interrupted = []

    def after(state: Path, before: dict, killed: bool) -> None:
        if (state / "journal/v/excise.json").exists():
            interrupted.append(state)  # killed while rewriting the volume
        now = assert_sound(state, before)  # check() rolls an interrupted excision forward
        vol = volume_view(state / "volumes/v")
        if now["head"]["epoch"] > before["head"]["epoch"]:
            assert vol == done
        else:
            assert vol == pre
        assert journal_view(state) == vol  # and the log knows it, with no close needed

    runs = crash_everywhere(workdir, tpl, lambda s: None,
                            lambda s: Journal(s, "v").excise(2, 2, stopped=True), after, 80)
    assert runs >= 90 and len(interrupted) >= 5


def test_commit_survives_a_kill_anywhere(workdir):
    tpl = template(workdir, incidents=True)

    def after(state: Path, before: dict, killed: bool) -> None:
        now = assert_sound(state, before, folding=True)
        assert now["head"]["epoch"] == before["head"]["epoch"]
        assert now["head"]["first"] in (1, 2)  # epoch 1 folds; epoch 2 saw an incident
        assert journal_view(state) == volume_view(state / "volumes/v")

    def op(state: Path) -> Any:
        return Journal(state, "v", clock=lambda: FUTURE).commit(60, [])

    runs = crash_everywhere(workdir, tpl, lambda s: None, op, after, 40)
    assert runs >= 50


@pytest.mark.root
def test_a_full_journal_disk_loses_nothing(tmp_path, monkeypatch):
    """The journal on a 512 KiB tmpfs, the volume growing 3 KB per epoch: once the journal is
    full, closes fail cleanly (running out while storing objects, or while writing the record
    or head), kills near the limit leave it sound, and with room again the next close
    captures everything. Without corral's reserve (64 MiB, more than this whole disk: with
    it every close is refused before it writes; tests/escapes/test_floods.py), so that the
    disk really runs out under the journal's writes."""
    monkeypatch.setenv("CORRAL_STATE_RESERVE", "0")
    state = tmp_path / "state"
    vol = state / "volumes/v"
    vol.mkdir(parents=True)
    mount = state / "journal"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        rng = random.Random(3)
        for i in range(3):
            (vol / f"seed{i}").write_bytes(rng.randbytes(40_000))
        Journal(state, "v").ensure()
        stages: dict[str, int] = {}
        for i in range(200):
            (vol / f"grow{i}").write_bytes(rng.randbytes(3000))  # incompressible
            before = committed(state)
            try:
                Journal(state, "v").close_epoch("schedule")
            except RuntimeFailure as exc:
                assert "No space left" in str(exc)
                stage = str(exc).split(" ")[0]  # "closing" (objects) or "recording"
                stages[stage] = stages.get(stage, 0) + 1
                assert committed(state)["head"] == before["head"]
            assert_sound(state, before)
            vfs = os.statvfs(mount)
            if vfs.f_bavail * vfs.f_frsize < 64 << 10:  # near the limit: kill on the way
                points, _ = count_points(lambda: _try_close(state))
                for n in range(1, points + 1):
                    before = committed(state)
                    in_child(lambda: _try_close(state), crash_after=n)
                    assert_sound(state, before)
            if sum(stages.values()) >= 3:
                break
        print(f"{i + 1} closes; out of space while {stages}")
        assert sum(stages.values()) >= 3
        subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
        Journal(state, "v").close_epoch("mark")
        assert journal_view(state) == volume_view(vol)
        assert Journal(state, "v").check()["problems"] == []
    finally:
        if subprocess.run(["umount", str(mount)]).returncode:
            subprocess.run(["umount", "-l", str(mount)])  # busy: a failed test holds a file


def _try_close(state: Path) -> Any:
    try:
        return Journal(state, "v").close_epoch("schedule")
    except RuntimeFailure as exc:
        return str(exc)


def test_an_sqlite_excision_survives_a_kill_anywhere(workdir):
    """The scenario corpus's database, page and log (test_journal_sqlite): the excision of the
    attack by rows, killed at each durability point and at random instants."""
    from test_journal_sqlite import attacked

    env, app = attacked(workdir / "tpl")
    app.close()
    tpl = env.state
    probe = fresh(workdir, tpl, 999)
    pre = volume_view(probe / "volumes/v")
    result = Journal(probe, "v").excise(2, 2, stopped=True)
    assert [c["how"] for c in result["conflicts"] if c["path"] == "app.db"] == ["rows"]
    done = volume_view(probe / "volumes/v")
    assert done != pre
    shutil.rmtree(probe)
    interrupted = []

    def after(state: Path, before: dict, killed: bool) -> None:
        if (state / "journal/v/excise.json").exists():
            interrupted.append(state)
        now = assert_sound(state, before)
        vol = volume_view(state / "volumes/v")
        assert vol == (done if now["head"]["epoch"] > before["head"]["epoch"] + 1 else pre)
        assert journal_view(state) == vol or now["head"]["epoch"] == before["head"]["epoch"]
        Journal(state, "v").close_epoch("mark")
        assert journal_view(state) == volume_view(state / "volumes/v")

    runs = crash_everywhere(workdir, tpl, lambda s: None,
                            lambda s: Journal(s, "v").excise(2, 2, stopped=True), after, 20)
    assert runs >= 25 and interrupted

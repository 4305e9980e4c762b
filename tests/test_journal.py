"""The redo log of journaled volumes (corral.recover.journal.log): epochs, diffs, excision, commit,
check, on real directories (a volume is just a directory; no service needs to run), and the CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import blake3
import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.core.errors import RuntimeFailure, UsageError
from corral.recover.journal import fs as journal_fs
from corral.recover.journal.config import journaled_volumes
from corral.recover.journal.journal import Journal
from corral.recover.journal.objects import Objects
from corral.recover.journal.store import CHUNK

FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None  # property tests: no fsync cost


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_env(root: Path) -> SimpleNamespace:
    state = root / "state"
    vol = state / "volumes" / "v"
    vol.mkdir(parents=True)
    clock = Clock()
    return SimpleNamespace(state=state, vol=vol, clock=clock,
                           journal=Journal(state, "v", clock=clock))


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


def put(vol: Path, rel: str | bytes, data: bytes, mode: int | None = None) -> None:
    path = os.path.join(os.fsencode(vol), os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    if mode is not None:
        os.chmod(path, mode)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def tree(root: Path) -> dict[bytes, tuple]:
    """What a volume holds, for comparisons: never follows a symlink."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for top, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("symlink", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                with open(path, "rb") as handle:
                    out[rel] = ("file", st.st_mode & 0o7777, handle.read())
    return out


def all_object_contents(state: Path) -> list[bytes]:
    """Every zstd frame in every pack, indexed or not (dropped versions, dead chunks)."""
    out = []
    for pack in (state / "journal").rglob("*.pack"):
        with open(pack, "rb") as handle:
            reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)
            data = reader.read()
        out.append(data)
    return out


def journal_bytes(state: Path) -> bytes:
    """Everything the journal wrote, packs decompressed."""
    raw = b"".join(p.read_bytes() for p in (state / "journal").rglob("*") if p.is_file())
    return raw + b"".join(all_object_contents(state))


def changes_of(record: dict) -> dict[str, tuple]:
    return {c["path"]: (c["change"], tuple(c.get("details", ())),
                        (c["before"] or {}).get("blake3"), (c["after"] or {}).get("blake3"))
            for c in record["changes"]}


# -- epochs, log, diff ----------------------------------------------------------------------

def test_epochs_record_each_kind_of_change_exactly(env):
    j, v = env.journal, env.vol
    put(v, "keep.txt", b"keep")
    put(v, "data/old.txt", b"old")
    j.ensure()
    put(v, "new.txt", b"new")  # create
    put(v, "keep.txt", b"keep2")  # modify
    os.rename(v / "data/old.txt", v / "data/renamed.txt")  # rename
    assert j.close_epoch("schedule") == 1
    os.chmod(v / "new.txt", 0o600)  # chmod
    os.unlink(v / "data/renamed.txt")  # delete
    os.symlink("keep.txt", v / "link")  # symlink
    os.mkdir(v / "empty")
    env.clock.now += 60
    assert j.close_epoch("mark", note="second") == 2

    assert changes_of(j.diff(1)) == {
        "data/old.txt": ("deleted", (), b3(b"old"), None),
        "data/renamed.txt": ("added", (), None, b3(b"old")),
        "keep.txt": ("modified", ("content",), b3(b"keep"), b3(b"keep2")),
        "new.txt": ("added", (), None, b3(b"new")),
    }
    second = j.diff(2)
    assert changes_of(second) == {
        "data/renamed.txt": ("deleted", (), b3(b"old"), None),
        "empty": ("added", (), None, None),
        "link": ("added", (), None, None),
        "new.txt": ("modified", ("mode",), b3(b"new"), b3(b"new")),
    }
    by_path = {c["path"]: c for c in second["changes"]}
    assert by_path["link"]["after"]["kind"] == "symlink"
    assert by_path["link"]["after"]["target"] == "keep.txt"
    assert by_path["new.txt"]["before"]["mode"] == "0644"
    assert by_path["new.txt"]["after"]["mode"] == "0600"
    assert by_path["empty"]["after"]["kind"] == "dir"
    assert second["note"] == "second" and second["reason"] == "mark"

    log = j.log()
    assert [(e["id"], e["reason"], e["files_changed"]) for e in log] == \
        [(1, "schedule", 4), (2, "mark", 4)]
    assert log[0]["end"] == log[1]["start"]  # epochs tile time: one ends, the next begins
    assert log[1]["end"].endswith("Z") and log[1]["note"] == "second"
    assert j.check()["problems"] == []


def test_a_rename_stores_no_new_content(env):
    j, v = env.journal, env.vol
    put(v, "a", os.urandom(5000))
    j.ensure()
    os.rename(v / "a", v / "b")
    assert j.close_epoch("schedule") == 1
    assert j.last_scan["stored_objects"] == 0


def test_a_scheduled_close_with_nothing_changed_records_nothing(env):
    j, v = env.journal, env.vol
    put(v, "a", b"1")
    j.ensure()
    assert j.close_epoch("schedule") is None
    # ...but an incident, a revert or a mark always records its boundary
    assert j.close_epoch("incident", incidents=["i-1"]) == 1
    assert j.close_epoch("revert") == 2
    assert j.close_epoch("mark") == 3
    assert [e["files_changed"] for e in j.log()] == [0, 0, 0]
    assert j.log()[0]["incidents"] == ["i-1"]


def test_writer_and_freeze_are_used(env):
    j, v = env.journal, env.vol
    j.ensure()
    calls = []

    class Frozen:
        def __enter__(self):
            calls.append("freeze")

        def __exit__(self, *exc):
            calls.append("thaw")

    put(v, "a", b"1")
    j.close_epoch("schedule", writer_hint={"process": "app", "pid": 42}, freeze=Frozen)
    assert calls == ["freeze", "thaw"]
    assert j.diff(1)["changes"][0]["writer"] == {"process": "app", "pid": 42}


def test_the_frozen_scan_is_the_boundary(env):
    """With a freezer the volume is read once while the service runs, then again frozen: a
    write between the two is what the epoch records, and the version it replaced (read by the
    first pass) is not kept."""
    j, v = env.journal, env.vol
    j.ensure()
    put(v, "a", b"first version")

    class Frozen:
        def __enter__(self):
            put(v, "a", b"second version, written just before the freeze")

        def __exit__(self, *exc):
            pass

    assert j.close_epoch("schedule", freeze=Frozen) == 1
    assert j.diff(1)["changes"][0]["after"]["blake3"] == \
        b3(b"second version, written just before the freeze")
    assert not any(b"first version" in data for data in all_object_contents(env.state))
    assert j.last_scan["frozen_ms"] >= 0
    assert j.close_epoch("schedule") is None


@pytest.mark.root
def test_the_service_cgroup_is_frozen_around_the_boundary_and_thawed(env):
    from corral.launch import cgroup
    from corral.recover.journal.config import freezer

    spec = SimpleNamespace(service="tstjfreeze", processes=[SimpleNamespace(name="w")])
    group = cgroup.Cgroup.create("tstjfreeze", "w", cgroup.Limits())
    writer = subprocess.Popen(["sleep", "30"])
    try:
        group.add(writer.pid)
        env.journal.ensure()
        put(env.vol, "a", b"1")
        assert env.journal.close_epoch("schedule", freeze=freezer(spec)) == 1
        assert env.journal.last_scan["frozen_ms"] > 0
        assert group.stats()["frozen"] is False
        group.freeze()  # isolated by a reaction: the close must leave it frozen
        put(env.vol, "a", b"2")
        assert env.journal.close_epoch("incident", freeze=freezer(spec)) == 2
        assert group.stats()["frozen"] is True
    finally:
        group.thaw()
        writer.kill()
        writer.wait()
        group.remove()


def test_one_writer_at_a_time(env):
    import fcntl

    from corral.recover.journal.log import JournalBusy

    j = env.journal
    j.ensure()
    with open(env.state / "journal/v/lock") as held:  # another process closing, say
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(JournalBusy):
            j.close_epoch("mark", wait=False)
    assert j.close_epoch("mark", wait=False) == 1


def test_unknown_or_bad_epochs_are_usage_errors(env):
    j = env.journal
    with pytest.raises(UsageError):
        j.diff(1)  # nothing journaled yet
    j.close_epoch("mark")
    with pytest.raises(UsageError):
        j.diff(2)
    with pytest.raises(UsageError):
        j.diff(0)
    with pytest.raises(UsageError):
        j.excise(3, stopped=True)
    with pytest.raises(RuntimeFailure):
        j.excise(1)  # the service must be stopped
    with pytest.raises(ValueError):
        j.close_epoch("because")


# -- a hostile volume -----------------------------------------------------------------------

def test_a_planted_symlink_is_recorded_never_followed(env):
    j, v = env.journal, env.vol
    shadow = Path("/etc/shadow").read_bytes()
    assert shadow
    j.ensure()
    os.symlink("/etc/shadow", v / "shadow")
    os.symlink("/etc", v / "etc")
    put(v, "ok", b"ok")
    assert j.close_epoch("schedule") == 1
    by_path = {c["path"]: c for c in j.diff(1)["changes"]}
    assert by_path["shadow"]["after"] == {"kind": "symlink", "uid": 0, "gid": 0,
                                          "target": "/etc/shadow"}
    assert set(by_path) == {"etc", "ok", "shadow"}  # nothing below the directory link
    assert shadow not in journal_bytes(env.state)
    for line in shadow.splitlines():
        assert line not in journal_bytes(env.state)
    # Deleted and excised back, the link comes back as a link with its text.
    os.unlink(v / "shadow")
    j.close_epoch("schedule")
    j.excise(2, stopped=True)
    assert os.readlink(v / "shadow") == "/etc/shadow"
    assert shadow not in journal_bytes(env.state)


def test_names_with_newlines_and_invalid_utf8(env):
    j, v = env.journal, env.vol
    names = [b"new\nline", b"bad\xff\xfename", b"back\\slash", b"tab\tand\x1b[31m"]
    j.ensure()
    for i, name in enumerate(names):
        put(v, name, b"content %d" % i)
    assert j.close_epoch("schedule") == 1
    changes = j.diff(1)["changes"]
    assert sorted(base64.b64decode(c["raw"]) for c in changes) == sorted(names)
    assert all("\n" not in c["path"] and "\x1b" not in c["path"] for c in changes)
    for record in (env.state / "journal/v/epochs").iterdir():
        record.read_bytes().decode("utf-8")  # strict: the records are valid UTF-8
    for name in names:
        os.unlink(os.path.join(os.fsencode(v), name))
    j.close_epoch("schedule")
    j.excise(2, stopped=True)
    assert sorted(os.listdir(os.fsencode(v))) == sorted(names)
    assert Path(os.fsdecode(os.path.join(os.fsencode(v), names[1]))).read_bytes() == b"content 1"


def test_a_tree_deeper_than_the_walk_goes_is_skipped_and_excised_whole(env):
    j, v = env.journal, env.vol
    j.ensure()
    fd = os.open(v, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1000):  # os.makedirs would recurse as deep
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open("payload", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    os.close(fd)
    try:
        assert j.close_epoch("incident") == 1
        record = j.diff(1)
        assert len(record["skipped"]) == 1 and record["skipped"][0]["path"].count("/") == 400
        j.excise(1, stopped=True)
        assert os.listdir(v) == []
        assert j.check()["problems"] == []
    finally:  # pytest's own clean-up of old temporary directories would recurse too deep
        subprocess.run(["rm", "-rf", str(v / "d")], check=True)


def test_large_files_are_stored_by_chunk(env):
    j, v = env.journal, env.vol
    original = os.urandom(3 * CHUNK + 100)
    put(v, "db", original)
    j.ensure()
    changed = bytearray(original)
    changed[CHUNK + 5:CHUNK + 15] = b"0123456789"  # a page written in place
    put(v, "db", bytes(changed))
    assert j.close_epoch("schedule") == 1
    assert j.last_scan["stored_objects"] == 1  # one chunk, not a copy of the whole file
    after = j.diff(1)["changes"][0]["after"]
    assert after["blake3"] == b3(bytes(changed)) and len(after["chunks"]) == 4
    j.excise(1, stopped=True)
    assert (v / "db").read_bytes() == original
    assert j.check()["problems"] == []


def test_unchanged_files_are_not_read_again(env, monkeypatch):
    monkeypatch.setattr(journal_fs, "RACY_NS", 0)  # the files here are all seconds-fresh
    j, v = env.journal, env.vol
    for i in range(20):
        put(v, f"f{i}", b"x" * 100)
    j.ensure()
    time.sleep(0.05)
    assert j.close_epoch("schedule") is None
    assert j.last_scan["read_files"] == 0
    # Same size, mtime put back: ctime still tells (it cannot be set from user space).
    st = os.stat(v / "f3")
    put(v, "f3", b"y" * 100)
    os.utime(v / "f3", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert j.close_epoch("schedule") == 1
    assert j.last_scan["read_files"] == 1
    # A fresh Journal (another process) uses the cache; a broken cache is just ignored.
    assert Journal(env.state, "v").close_epoch("schedule") is None
    (env.state / "journal/v/state.cache").write_bytes(b"garbage")
    put(v, "f4", b"z")
    fresh = Journal(env.state, "v")
    assert fresh.close_epoch("schedule") == 2
    assert fresh.last_scan["read_files"] == 20


# -- the scenario -------------------------------------------------------------------

def attack(env) -> None:
    """Good writes (epoch 1), an attack (epoch 2, closed by its incident), more good writes
    to other files and to one file the attack corrupted (epoch 3)."""
    j, v = env.journal, env.vol
    put(v, "app.db", b"accounts v1")
    put(v, "config.ini", b"safe=1\n")
    put(v, "www/index.html", b"<h1>hello</h1>")
    j.ensure()
    put(v, "notes/1.txt", b"first note")
    put(v, "app.db", b"accounts v2")
    assert j.close_epoch("schedule") == 1
    put(v, "config.ini", b"safe=0\nbackdoor=1\n")
    put(v, "www/index.html", b"<script>steal()</script>")
    put(v, "app.db", b"accounts v2 + evil admin")
    put(v, ".hidden/backdoor.sh", b"#!/bin/sh\nnc -l -e /bin/sh\n", mode=0o755)
    assert j.close_epoch("incident", incidents=["inc-1"]) == 2
    put(v, "notes/2.txt", b"second note")
    put(v, "app.db", b"accounts v3: a good write after the attack")
    assert j.close_epoch("schedule") == 3


def test_excise_takes_the_attack_out_and_keeps_what_came_after(env):
    attack(env)
    j, v = env.journal, env.vol
    result = j.excise(2, 2, stopped=True)
    assert result["epoch"] == 4 and result["closed_before"] is None
    assert (v / "config.ini").read_bytes() == b"safe=1\n"
    assert (v / "www/index.html").read_bytes() == b"<h1>hello</h1>"
    assert not (v / ".hidden").exists()
    assert (v / "notes/1.txt").read_bytes() == b"first note"
    assert (v / "notes/2.txt").read_bytes() == b"second note"
    # written during the attack and after it: a conflict, kept at its later version
    assert (v / "app.db").read_bytes() == b"accounts v3: a good write after the attack"
    assert [(c["path"], c["inside"], c["after"], c["kept"], c["review"])
            for c in result["conflicts"]] == [("app.db", [2], [3], "after", True)]
    record = j.diff(4)
    assert record["reason"] == "excise" and record["excised"] == {"from": 2, "to": 2,
                                                                  "prefer": None}
    assert record["conflicts"][0]["before_stretch"]["blake3"] == b3(b"accounts v2")
    assert {c["path"]: c["change"] for c in record["changes"]} == {
        ".hidden": "deleted", ".hidden/backdoor.sh": "deleted", "config.ini": "modified",
        "www/index.html": "modified"}
    assert [e["id"] for e in j.log()] == [1, 2, 3, 4]  # history is not rewritten
    assert j.check()["problems"] == []
    assert j.close_epoch("schedule") is None  # the log describes the volume exactly

    # The excision is an epoch like any other: excising it puts the attack back.
    j.excise(4, 4, stopped=True)
    assert (v / ".hidden/backdoor.sh").exists()
    assert (v / "config.ini").read_bytes() == b"safe=0\nbackdoor=1\n"
    assert os.stat(v / ".hidden/backdoor.sh").st_mode & 0o777 == 0o755


def test_excise_prefer_before_restores_the_pre_attack_version(env):
    attack(env)
    result = env.journal.excise(2, 2, prefer="before", stopped=True)
    assert (env.vol / "app.db").read_bytes() == b"accounts v2"
    assert (env.vol / "notes/2.txt").read_bytes() == b"second note"
    assert [(c["path"], c["kept"]) for c in result["conflicts"]] == [("app.db", "before")]


def test_excise_without_to_runs_to_the_latest_and_closes_first(env):
    attack(env)
    put(env.vol, "late.txt", b"written after the last close")
    result = env.journal.excise(2, stopped=True)
    assert result["closed_before"] == 4 and result["to"] == 4 and result["conflicts"] == []
    assert (env.vol / "app.db").read_bytes() == b"accounts v2"
    assert not (env.vol / "late.txt").exists() and not (env.vol / "notes/2.txt").exists()


def test_excise_keeps_a_directory_a_later_file_needs(env):
    j, v = env.journal, env.vol
    j.ensure()
    os.mkdir(v / "d")
    put(v, "d/bad", b"bad")
    j.close_epoch("incident")
    put(v, "d/good", b"good")
    j.close_epoch("schedule")
    result = j.excise(1, 1, stopped=True)
    assert (v / "d/good").read_bytes() == b"good" and not (v / "d/bad").exists()
    assert [(f["path"], f["needed_by"]["path"]) for f in result["forced"]] == [("d", "d/good")]
    assert j.check()["problems"] == []


# -- commit ---------------------------------------------------------------------------------

def test_commit_folds_quiet_epochs_without_incident_in_order(env):
    attack(env)  # epochs 1 (good), 2 (incident), 3 (good), all at the same clock time
    j, clock = env.journal, env.clock
    with pytest.raises(RuntimeFailure):
        j.commit(3600, [{"id": "inc-1"}])  # an incident is open
    assert j.commit(3600, [])["folded"] == []  # nothing is older than quiet
    clock.now += 7200
    result = j.commit(3600, [])
    assert result["folded"] == [1] and "epoch 2 saw an incident" in result["stopped"]
    with pytest.raises(UsageError):
        j.diff(1)
    assert [e["id"] for e in j.log()] == [2, 3]
    # Excised, the incident epoch may fold, but only together with its excision.
    j.excise(2, 2, stopped=True)
    assert j.commit(3600, [])["folded"] == []
    clock.now += 7200
    result = j.commit(3600, [])
    assert result["folded"] == [2, 3, 4] and result["reclaimed_objects"] > 0
    assert not any(b"steal()" in data for data in all_object_contents(env.state))
    assert j.check()["problems"] == [] and j.log() == []
    assert j.close_epoch("schedule") is None
    # another process, whose cache predates the new baseline, replays from the baseline
    assert Journal(env.state, "v", clock=clock).close_epoch("schedule") is None
    put(env.vol, "after-commit", b"1")
    assert j.close_epoch("schedule") == 5  # ids go on


def test_commit_accepts_a_reviewed_incident_epoch(env):
    j, v = env.journal, env.vol
    j.ensure()
    put(v, "a", b"1")
    j.close_epoch("incident", incidents=["false-alarm"])
    env.clock.now += 100
    assert j.commit(10, [])["folded"] == []
    assert j.commit(10, [], accept=[1])["folded"] == [1]


# -- check ----------------------------------------------------------------------------------

def test_check_finds_tampering(env):
    attack(env)
    j = env.journal
    assert j.check()["problems"] == []
    record = env.state / "journal/v/epochs/00000002.json"
    doc = json.loads(record.read_bytes())
    doc["changes"] = [c for c in doc["changes"] if c["path"] != ".hidden/backdoor.sh"]
    saved = record.read_bytes()
    record.write_bytes(json.dumps(doc).encode())
    problems = j.check()["problems"]
    assert any("chain is broken" in p for p in problems)
    record.write_bytes(saved)
    assert j.check()["problems"] == []
    # an object whose content is not its name, and a missing one
    name = b3(b"accounts v2")
    objects = Objects(env.state / "journal/v/objects")
    objects.refresh()
    pack, offset, length = objects.index[name]
    pack_file = env.state / f"journal/v/objects/packs/{pack}.pack"
    with open(pack_file, "r+b") as handle:
        handle.seek(offset)
        handle.write(zstandard.ZstdCompressor().compress(b"accounts v3")[:length])
    assert any(name in p for p in j.check()["problems"])
    pack_file.with_suffix(".idx").unlink()
    assert any(name in p and "missing" in p for p in j.check()["problems"])


# -- property: excision equals replay without the stretch -----------------------------------

NAMES = ["a", "b", "c", "d"]
FLAT_OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.sampled_from([b"", b"x", b"yy"])),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("chmod"), st.sampled_from(NAMES), st.sampled_from([0o600, 0o644, 0o755])),
)
TREE_PATHS = ["a", "d", "d/x", "d/y"]
TREE_OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(TREE_PATHS), st.sampled_from([b"1", b"22"])),
    st.tuples(st.just("mkdir"), st.just("d")),
    st.tuples(st.just("remove"), st.sampled_from(TREE_PATHS)),
    st.tuples(st.just("chmod"), st.sampled_from(TREE_PATHS), st.sampled_from([0o700, 0o755])),
)


def run_op(vol: Path, op: tuple) -> None:
    kind, path = op[0], vol / op[1]
    try:
        if kind == "write":
            if not path.is_dir():
                path.write_bytes(op[2])
        elif kind == "mkdir":
            if path.exists() and not path.is_dir():
                path.unlink()
            path.mkdir(exist_ok=True)
        elif kind in ("delete", "remove"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif kind == "rename":
            os.rename(path, vol / op[2])
        elif kind == "chmod":
            os.chmod(path, op[2])
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        pass  # the op made no sense in this state: skip it


def check_excision(epochs: list[list[tuple]], data, initial: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        env = make_env(Path(tmp))
        j, vol = env.journal, env.vol
        for name, content in initial.items():
            put(vol, name, content)
        j.ensure()
        snaps = [tree(vol)]
        for ops in epochs:
            for op in ops:
                run_op(vol, op)
            j.close_epoch("mark")
            snaps.append(tree(vol))
        n = len(epochs)
        first = data.draw(st.integers(1, n), label="from")
        last = data.draw(st.integers(first, n), label="to")
        prefer = data.draw(st.sampled_from([None, "before", "after"]), label="prefer")
        result = j.excise(first, last, prefer, stopped=True)

        def changed(i: int) -> set[bytes]:
            return {p for p in snaps[i - 1].keys() | snaps[i].keys()
                    if snaps[i - 1].get(p) != snaps[i].get(p)}

        inside = set().union(*(changed(i) for i in range(first, last + 1)))
        after = set().union(set(), *(changed(i) for i in range(last + 1, n + 1)))
        conflicts = {os.fsencode(c["path"]) for c in result["conflicts"]}
        merged = {os.fsencode(m["path"]) for m in result["merged"]}
        forced = {os.fsencode(f["path"]) for f in result["forced"]}
        assert conflicts | merged == inside & after and not conflicts & merged
        replay = dict(snaps[first - 1])
        for i in range(last + 1, n + 1):
            for path in changed(i):
                if path in snaps[i]:
                    replay[path] = snaps[i][path]
                else:
                    replay.pop(path, None)
        final = tree(vol)
        for path in final.keys() | replay.keys() | snaps[n].keys():
            versions = [snaps[first - 1].get(path), snaps[last].get(path), snaps[n].get(path)]
            if path in forced:
                expected = snaps[n].get(path)  # kept at its later value for the tree's sake
            elif path in inside & after and all(v and v[0] == "file" for v in versions):
                # a file in all three versions: merged (these contents are one line each, so
                # a line merge is a whole-value three-way merge, or byte ranges when appended)
                (_, *old), (_, *end), (_, *now) = versions
                mode, mode_clash = three_way(old[0], end[0], now[0], prefer)
                data, data_clash = three_way(old[1], end[1], now[1], prefer, appends=True)
                expected = ("file", mode, data)
                assert (path in conflicts) == (mode_clash or data_clash), path
            elif path in conflicts:
                expected = snaps[first - 1 if prefer == "before" else n].get(path)
            else:
                expected = replay.get(path)
            assert final.get(path) == expected, path
        assert j.check()["problems"] == []
        assert j.close_epoch("schedule") is None  # the journal describes the volume exactly


def three_way(before, end, now, prefer, appends=False):
    """The oracle for one value: (result, conflict?)."""
    if appends and end.startswith(before) and now.startswith(end):
        return before + now[len(end):], False
    if now == end:
        return before, False
    if before in (end, now):
        return now, False
    return (before if prefer == "before" else now), True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(epochs=st.lists(st.lists(FLAT_OPS, max_size=4), min_size=1, max_size=6), data=st.data())
def test_excision_equals_replay_without_the_stretch(epochs, data):
    check_excision(epochs, data, {"a": b"x", "b": b"yy"})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(epochs=st.lists(st.lists(TREE_OPS, max_size=4), min_size=1, max_size=5), data=st.data())
def test_excision_keeps_the_tree_consistent(epochs, data):
    check_excision(epochs, data, {"a": b"1", "d/x": b"1"})


# -- services and the CLI -------------------------------------------------------------------

MANIFEST = """\
name = "{name}"
[[volume]]
path = "/srv/data"
owner = "app"
journal = true
epoch = "5m"
[[volume]]
path = "/srv/cache"
owner = "app"
[process.app]
command = ["/usr/bin/python3"]
[watch]
quiet = "1h"
"""


@pytest.fixture
def installed(corral_root, tmp_path):
    """An installed service as far as the journal cares: runtime.json, install.json naming
    the manifest, and its volume directories."""
    from corral.host import runtime

    name = "tstjournal"
    manifest = tmp_path / "svc.toml"
    manifest.write_text(MANIFEST.format(name=name))
    proc = runtime.ProcessSpec(name="app", user=f"corral-{name}-app", uid=65000, gid=65000,
                               command=["/usr/bin/python3"], environment={}, capabilities=[],
                               limits={}, seccomp={}, landlock={}, listen=[])
    spec = runtime.ServiceSpec(service=name, base_version=1, delta="tmpfs", delta_size=1 << 20,
                               processes=[proc],
                               volumes=[runtime.VolumeSpec("/srv/data", "srv-data", "app"),
                                        runtime.VolumeSpec("/srv/cache", "srv-cache", "app")])
    Path(spec.state, "volumes/srv-data").mkdir(parents=True)
    Path(spec.state, "volumes/srv-cache").mkdir(parents=True)
    runtime.write(spec)
    Path(spec.state, "install.json").write_text(json.dumps({"service": name,
                                                           "manifest": str(manifest)}))
    return spec


def invoke(*args: str):
    from corral.cli.state import state

    return CliRunner().invoke(state, list(args), catch_exceptions=False)


def test_journaled_volumes_come_from_the_manifest(installed):
    assert journaled_volumes("tstjournal") == [("srv-data", "/srv/data", 300)]


def test_cli_mark_log_diff_excise_commit_check(installed):
    vol = Path(installed.state, "volumes/srv-data")
    put(vol, "page.html", b"good")
    assert invoke("mark", "tstjournal", "--note", "start").output == "1\n"
    put(vol, "page.html", b"defaced")
    assert invoke("mark", "tstjournal").output == "2\n"
    put(vol, "other", b"later good write")
    assert invoke("mark", "tstjournal").output == "3\n"

    result = invoke("log", "tstjournal")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert "baseline at epoch 0" in lines[0] and "EPOCH" in lines[1]
    assert lines[2].split()[0] == "1" and lines[2].split()[-1] == "start"
    doc = json.loads(invoke("log", "tstjournal", "--json").stdout)
    # the first mark starts the journal from the volume as it is: nothing changed yet
    assert [e["files_changed"] for e in doc["volumes"][0]["epochs"]] == [0, 1, 1]
    assert doc["volumes"][0]["volume"] == "/srv/data"

    assert "modified  page.html (content)" in invoke("diff", "tstjournal", "2").output
    doc = json.loads(invoke("diff", "tstjournal", "2", "--json").stdout)
    assert doc["changes"][0]["after"]["blake3"] == b3(b"defaced")
    assert invoke("diff", "tstjournal", "9").exit_code == 2
    assert invoke("diff", "tstjournal", "x").exit_code == 2
    assert invoke("log", "tstnosuch").exit_code == 2
    assert invoke("diff", "tstjournal", "1", "--volume", "/srv/cache").exit_code == 2

    result = invoke("excise", "tstjournal", "--from", "2", "--to", "2")
    assert result.exit_code == 0, result.output
    assert "excised epochs 2..2 as epoch 4" in result.output
    assert (vol / "page.html").read_bytes() == b"good"
    assert (vol / "other").read_bytes() == b"later good write"

    result = invoke("commit", "tstjournal", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["volumes"][0]["folded"] == []
    assert invoke("check", "tstjournal").exit_code == 0
    obj = next(p for p in Path(installed.state, "journal/srv-data/objects").rglob("*")
               if p.is_file() and ".staging" not in str(p))
    obj.write_bytes(b"not zstd")
    result = invoke("check", "tstjournal", "--json")
    assert result.exit_code == 3 and json.loads(result.stdout)["ok"] is False


def test_cli_excises_from_a_running_service_and_dry_runs(installed):
    from corral.core.paths import run_dir

    vol = Path(installed.state, "volumes/srv-data")
    put(vol, "log", b"good 1\n")
    invoke("mark", "tstjournal")
    put(vol, "log", b"good 1\nJUNK\n")
    invoke("mark", "tstjournal")
    put(vol, "log", b"good 1\nJUNK\ngood 2\n")
    # supervisor_alive() looks for "corral" in the pid's command line; no process cgroup
    # exists, so there is nothing to freeze and nothing to restart
    fake = subprocess.Popen(["bash", "-c", "exec -a corral-fake-supervisor sleep 30"])
    try:
        time.sleep(0.1)
        Path(run_dir("tstjournal")).mkdir(parents=True, exist_ok=True)
        Path(run_dir("tstjournal"), "state.json").write_text(json.dumps(
            {"phase": "running", "supervisor": fake.pid, "processes": {}}))
        plan = invoke("excise", "tstjournal", "--from", "2", "--to", "2", "--dry-run")
        assert plan.exit_code == 0 and "would excise epochs 2..2" in plan.output
        assert "merged    log: the stretch's 5 appended byte(s) cut out" in plan.output
        assert (vol / "log").read_bytes() == b"good 1\nJUNK\ngood 2\n"
        result = invoke("excise", "tstjournal", "--from", "2", "--to", "2", "--json")
        doc = json.loads(result.output)
        assert doc["processes"] == "resumed" and doc["merged"][0]["how"] == "append"
        assert (vol / "log").read_bytes() == b"good 1\ngood 2\n"
    finally:
        os.kill(fake.pid, signal.SIGKILL)
        fake.wait()

"""Excision from a running service (corral.recover.journal.online), with a real writer process
in a real cgroup frozen by the real freezer, and SIGKILLed at every durability point: nothing
written before the freeze is lost, the attack is gone once the excision committed, and `state
check` (settle + check) leaves the journal sound and the writer restarted, never left frozen."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from corral.recover.journal.journal import Journal
from corral.recover.journal.online import excise_running, settle
from test_journal_crash import FAST_TMP, count_points, in_child

pytestmark = pytest.mark.root
ATTACK = b'{"text": "ATTACKER"}\n'
# Appends a numbered line to the volume's file, then to a side file outside the volume: every
# number in the side file was written to the volume first.
WRITER = """
import os, sys, time
vol, side, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
while True:
    n += 1
    line = f'{{"n": {n}}}\\n'.encode()
    fd = os.open(vol, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, line)
    os.close(fd)
    fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, line)
    os.close(fd)
    time.sleep(0.002)
"""


class Service:
    # A name per test run: the cgroup (corral/NAME/w) is host-wide, and two runs on one
    # machine must not freeze or remove each other's.
    def __init__(self, root: Path, name: str = f"tstjo{os.getpid() % 100000}"):
        from corral.launch import cgroup

        self.state, self.vol = root / "state", root / "state/volumes/v"
        self.spec = SimpleNamespace(service=name, processes=[SimpleNamespace(name="w")],
                                    run=root / "run")
        self.group = cgroup.Cgroup.create(name, "w", cgroup.Limits())
        self.side = root / "side.jsonl"
        self.writer: subprocess.Popen | None = None

    def start(self, first: int = 0) -> None:
        """A writer numbering its lines from `first` on: each run's lines are its own."""
        self.writer = subprocess.Popen([sys.executable, "-c", WRITER, str(self.vol / "notes"),
                                        str(self.side), str(first)])
        self.group.add(self.writer.pid)
        size = self.side.stat().st_size if self.side.exists() else 0
        deadline = time.monotonic() + 10
        while (self.side.stat().st_size if self.side.exists() else 0) == size:
            assert time.monotonic() < deadline, "the writer wrote nothing"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.writer:
            self.group.thaw()
            self.writer.kill()
            self.writer.wait()

    def cleanup(self) -> None:
        self.stop()
        self.group.remove()


def content(j: Journal, epoch: int) -> bytes:
    """The file "notes" as epoch `epoch` left it, from the journal's objects."""
    [change] = [c for c in j.diff(epoch)["changes"] if c["path"] == "notes"]
    chunks = change["after"].get("chunks") or [change["after"]["blake3"]]
    j.objects.refresh()  # packs another process (or a compaction) wrote
    return b"".join(j.objects.read(c) for c in chunks)


def stretch_end(j: Journal) -> bytes:
    return content(j, 2)


def history(svc: Service) -> Journal:
    """Epoch 1: good writes; epoch 2: the attack (and the writer's own lines); then more."""
    svc.vol.mkdir(parents=True)
    j = Journal(svc.state, "v")
    j.ensure()
    svc.start()
    time.sleep(0.1)
    j.close_epoch("mark")
    with open(svc.vol / "notes", "ab") as handle:
        handle.write(ATTACK)
    time.sleep(0.1)
    j.close_epoch("incident", incidents=["inc-1"])
    time.sleep(0.1)
    return j


def assert_nothing_lost(svc: Service, j: Journal, excised: bool) -> None:
    data = (svc.vol / "notes").read_bytes()
    assert (ATTACK not in data) == excised
    lines = set(data.splitlines(keepends=True))
    end = stretch_end(j)
    written_after = [n for n in svc.side.read_bytes().splitlines(keepends=True)
                     if n not in set(end.splitlines(keepends=True))]
    assert written_after and all(n in lines for n in written_after)
    if excised:  # the stretch's lines went, those before it stayed
        assert data.startswith(content(j, 1))


def test_online_excision_freezes_excises_and_restarts(tmp_path):
    svc = Service(tmp_path)
    try:
        j = history(svc)
        result = excise_running(j, svc.spec, 2, 2, None)
        assert result["processes"] == "restarted" and result["conflicts"] == []
        assert [m["path"] for m in result["merged"]] == ["notes"]
        assert svc.writer.wait(5) == -9  # killed while frozen, for the supervisor to restart
        assert not svc.group.stats()["frozen"]
        assert not Path(svc.spec.run, "excise-frozen.json").exists()
        assert_nothing_lost(svc, j, excised=True)
        assert j.check()["problems"] == [] and j.close_epoch("schedule") is None
    finally:
        svc.cleanup()


def test_an_excision_that_changes_nothing_resumes(tmp_path):
    svc = Service(tmp_path)
    try:
        j = history(svc)
        excise_running(j, svc.spec, 2, 2, None)
        svc.start()
        time.sleep(0.1)
        result = excise_running(j, svc.spec, 1, 1, None)  # epoch 1 only touched "notes" ...
        assert result["processes"] in ("restarted", "resumed")
        svc.stop()
        j.close_epoch("mark")
        # an empty stretch of the log: a mark with nothing in it
        empty = j.close_epoch("mark")
        svc.start()
        result = excise_running(j, svc.spec, empty, empty, None)
        assert result["changes"] == [] and result["processes"] == "resumed"
        assert svc.writer.poll() is None and not svc.group.stats()["frozen"]
    finally:
        svc.cleanup()


def test_online_excision_survives_a_kill_anywhere(tmp_path):
    root = Path(FAST_TMP or tmp_path) / f"tstjonline-{os.getpid()}"
    root.mkdir()
    try:
        svc = Service(root / "tpl")
        history(svc)
        svc.stop()
        tpl = root / "tpl"
        probe = root / "probe"
        shutil.copytree(tpl, probe, symlinks=True)
        psvc = Service(probe)
        psvc.start()
        points, _ = count_points(lambda: excise_running(Journal(psvc.state, "v"), psvc.spec,
                                                        2, 2, None))
        psvc.cleanup()
        assert points > 5
        outcomes = set()
        for n in range(1, points + 1):
            run = root / f"run{n}"
            shutil.copytree(tpl, run, symlinks=True)
            rsvc = Service(run)
            try:
                rsvc.side.write_bytes(b"")  # only what this run's writer wrote counts
                rsvc.start(first=n * 1_000_000)
                j = Journal(rsvc.state, "v")
                killed, report = in_child(
                    lambda j=j, spec=rsvc.spec: excise_running(j, spec, 2, 2, None),
                    crash_after=n)
                # the writer's timing varies the count a little: the last runs may finish
                assert killed or (report and report["ok"]), report
                settle(j, rsvc.spec)  # what `corral state check` does first
                assert not Path(rsvc.spec.run, "excise-frozen.json").exists()
                assert not rsvc.group.stats()["frozen"]  # never left frozen
                assert j.check()["problems"] == []
                excised = j.info()["epoch"] > 3 and j.diff(j.info()["epoch"])["reason"] == \
                    "excise"
                rsvc.stop()
                j.close_epoch("mark")
                assert_nothing_lost(rsvc, j, excised)
                assert j.close_epoch("schedule") is None
                outcomes.add(excised)
            finally:
                rsvc.cleanup()
                shutil.rmtree(run)
        assert outcomes == {False, True}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# A service's database writer: one connection held open (WAL), a row per transaction, each
# committed row's number then appended to a side file outside the volume.
DB_WRITER = """
import sqlite3, sys, time
db, side, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db, isolation_level=None, timeout=10)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS orders(id INTEGER PRIMARY KEY, what TEXT)")
while True:
    n += 1
    con.execute("INSERT INTO orders VALUES (?, 'order')", (n,))
    with open(side, "a") as handle:
        handle.write(f"{n}\\n")
    time.sleep(0.002)
"""


def test_online_excision_of_database_rows_with_the_writer_frozen(tmp_path):
    import sqlite3

    svc = Service(tmp_path, f"tstjd{os.getpid() % 100000}")
    try:
        svc.vol.mkdir(parents=True)
        db = svc.vol / "app.db"
        con = sqlite3.connect(db, isolation_level=None)
        con.executescript("PRAGMA journal_mode=WAL; CREATE TABLE accounts(id INTEGER PRIMARY "
                          "KEY, name TEXT, role TEXT); INSERT INTO accounts VALUES "
                          "(1, 'alice', 'admin');")
        con.close()
        j = Journal(svc.state, "v")
        j.ensure()
        svc.writer = subprocess.Popen([sys.executable, "-c", DB_WRITER, str(db),
                                       str(svc.side), "0"])
        svc.group.add(svc.writer.pid)
        time.sleep(0.3)
        j.close_epoch("mark")
        attacker = sqlite3.connect(db, isolation_level=None, timeout=10)
        attacker.execute("INSERT INTO accounts VALUES (66, 'mallory', 'admin')")
        attacker.close()
        time.sleep(0.1)
        j.close_epoch("incident", incidents=["inc-1"])
        time.sleep(0.2)
        result = excise_running(j, svc.spec, 2, 2, None)
        assert result["processes"] == "restarted"
        assert svc.writer.wait(5) == -9
        [entry] = [c for c in result["conflicts"] + result["merged"] if c["path"] == "app.db"]
        assert entry["how"] == "rows" and result["conflicts"] == []
        # The stretch's rows (the attacker's, and the writer's own meanwhile: a row carries
        # no author) are undone; every row the writer committed before or after it stays.
        [change] = [c for c in j.diff(2, detail=True)["changes"] if c["path"] == "app.db"]
        stretch = {r["key"][0] for r in change["rows"]["rows"] if r["table"] == "orders"}
        assert stretch and ["accounts", "insert", [66]] in [
            [r["table"], r["op"], r["key"]] for r in change["rows"]["rows"]]
        check = sqlite3.connect(db)
        ids = {n for (n,) in check.execute("SELECT id FROM orders")}
        admins = check.execute("SELECT name FROM accounts").fetchall()
        check.close()
        assert admins == [("alice",)]
        committed = {int(x) for x in svc.side.read_text().split()}
        assert not ids & stretch and committed - stretch <= ids
        assert max(committed) > max(stretch)  # the writer went on after the stretch
        assert j.check()["problems"] == []
    finally:
        svc.cleanup()

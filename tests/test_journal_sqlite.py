"""Row-level epochs of SQLite databases (corral.recover.journal.sqlite) and the scenario corpus
modelled on RETRO (OSDI 2010) and Warp (SOSP 2011): an attacker's stretch in the middle of the
redo log is taken out of a real database (real SQLite, WAL mode, a writer holding it open), a
text page and a log, and every legitimate change after it stays. Conflicts (the same row or line
touched by the stretch and later) are listed, never silent."""
from __future__ import annotations

import sqlite3

import apsw
import pytest

from corral.recover.journal import sqlite as rows
from test_journal import make_env, put

PAGE = b"".join(f"<p>paragraph {i}</p>\n".encode() for i in range(10))


class App:
    """The service's writer: one connection held open, as a server would (so its WAL lives
    across epoch boundaries)."""

    def __init__(self, vol):
        self.path = vol / "app.db"
        self.con = sqlite3.connect(self.path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")

    def sql(self, script: str) -> None:
        self.con.executescript(f"BEGIN; {script}; COMMIT;")

    def close(self) -> None:
        self.con.close()


def query(path, sql):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def attacked(tmp_path):
    """Epoch 1 good, epoch 2 the attack (incident), epoch 3 good again; the writer still open.
    Returns (env, app)."""
    env = make_env(tmp_path)
    app = App(env.vol)
    app.sql("""CREATE TABLE accounts(id INTEGER PRIMARY KEY, name TEXT, role TEXT);
               CREATE TABLE audit(id INTEGER PRIMARY KEY, event TEXT);
               CREATE TABLE products(sku TEXT PRIMARY KEY, price REAL) WITHOUT ROWID;
               INSERT INTO accounts VALUES (1, 'alice', 'admin'), (2, 'bob', 'user');
               INSERT INTO audit VALUES (1, 'alice login'), (2, 'bob login'), (3, 'bob buy');
               INSERT INTO products VALUES ('A', 10.0), ('B', 20.0), ('C', 30.0)""")
    put(env.vol, "www/index.html", PAGE)
    put(env.vol, "www/about.html", PAGE)
    put(env.vol, "logs/access.log", b"GET / 200\n")
    env.journal.ensure()
    # epoch 1: legitimate users
    app.sql("INSERT INTO accounts VALUES (3, 'carol', 'user'); "
            "INSERT INTO audit VALUES (4, 'carol signup'); "
            "UPDATE products SET price = 11.0 WHERE sku = 'B'")
    put(env.vol, "logs/access.log", b"GET / 200\nGET /b 200\n")
    assert env.journal.close_epoch("mark") == 1
    # epoch 2: the attacker
    app.sql("INSERT INTO accounts VALUES (66, 'mallory', 'admin'); "
            "DELETE FROM audit WHERE id IN (2, 3); "
            "UPDATE products SET price = 0.01 WHERE sku = 'A'")
    put(env.vol, "www/index.html", PAGE.replace(b"paragraph 3", b"HACKED BY M"))
    put(env.vol, "www/about.html", PAGE.replace(b"paragraph 5", b"HACKED BY M"))
    put(env.vol, "logs/access.log", b"GET / 200\nGET /b 200\n\x1b[2Jjunk junk junk\n")
    assert env.journal.close_epoch("incident", incidents=["inc-1"]) == 2
    # epoch 3: legitimate users again, one of them touching what the attacker touched
    app.sql("INSERT INTO accounts VALUES (4, 'dave', 'user'); "
            "UPDATE accounts SET name = 'bobby' WHERE id = 2; "
            "INSERT INTO audit VALUES (5, 'dave signup'); "
            "UPDATE products SET price = 12.5 WHERE sku = 'A'; "  # the same row: a conflict
            "UPDATE products SET price = 33.0 WHERE sku = 'C'")
    put(env.vol, "www/index.html",
        PAGE.replace(b"paragraph 3", b"HACKED BY M").replace(b"paragraph 8", b"news"))
    put(env.vol, "www/about.html", PAGE.replace(b"paragraph 5", b"edited by staff"))
    put(env.vol, "logs/access.log",
        b"GET / 200\nGET /b 200\n\x1b[2Jjunk junk junk\nGET /c 200\n")
    assert env.journal.close_epoch("mark") == 3
    return env, app


def test_epochs_of_a_database_carry_its_rows(tmp_path):
    env, app = attacked(tmp_path)
    app.close()
    [change] = [c for c in env.journal.diff(2)["changes"] if c["path"] == "app.db"]
    assert change["rows"]["tables"] == {
        "accounts": {"insert": 1, "update": 0, "delete": 0},
        "audit": {"insert": 0, "update": 0, "delete": 2},
        "products": {"insert": 0, "update": 1, "delete": 0}}
    detail = env.journal.diff(2, detail=True)
    [change] = [c for c in detail["changes"] if c["path"] == "app.db"]
    assert {"table": "accounts", "op": "insert", "key": [66], "before": None,
            "after": [66, "mallory", "admin"]} in change["rows"]["rows"]
    assert {"table": "audit", "op": "delete", "key": [2], "before": [2, "bob login"],
            "after": None} in change["rows"]["rows"]
    [page] = [c for c in detail["changes"] if c["path"] == "www/index.html"]
    assert "-<p>paragraph 3</p>" in page["lines"] and "+<p>HACKED BY M</p>" in page["lines"]
    assert env.journal.check()["problems"] == []


def test_the_scenario_corpus_excise_the_attack_keep_everything_after(tmp_path):
    env, app = attacked(tmp_path)
    app.close()  # the service is stopped for an offline excision
    result = env.journal.excise(2, 2, stopped=True)
    assert env.journal.close_epoch("schedule") is None  # the log describes the volume
    db = env.vol / "app.db"
    assert not (env.vol / "app.db-wal").exists()  # the result is whole in the file
    # every attacker change is gone...
    assert query(db, "SELECT * FROM accounts WHERE role = 'admin'") == [(1, "alice", "admin")]
    assert query(db, "SELECT id FROM audit ORDER BY id") == [(1,), (2,), (3,), (4,), (5,)]
    assert b"HACKED" not in (env.vol / "www/index.html").read_bytes()
    assert b"junk" not in (env.vol / "logs/access.log").read_bytes()
    # ...every later legitimate change is there...
    assert query(db, "SELECT * FROM accounts ORDER BY id") == [
        (1, "alice", "admin"), (2, "bobby", "user"), (3, "carol", "user"), (4, "dave", "user")]
    assert query(db, "SELECT * FROM products ORDER BY sku") == [
        ("A", 12.5), ("B", 11.0), ("C", 33.0)]
    assert (env.vol / "www/index.html").read_bytes() == PAGE.replace(b"paragraph 8", b"news")
    assert (env.vol / "logs/access.log").read_bytes() == b"GET / 200\nGET /b 200\nGET /c 200\n"
    assert (env.vol / "www/about.html").read_bytes() == \
        PAGE.replace(b"paragraph 5", b"edited by staff")
    # ...and each conflict is reported: the price both changed, the line both changed
    by_path = {c["path"]: c for c in result["conflicts"]}
    assert set(by_path) == {"app.db", "www/about.html"}
    [row] = by_path["app.db"]["rows"]
    assert row == {"table": "products", "reason": "DATA", "why": "changed again later",
                   "key": ["A"], "before_stretch": ["(unchanged)", 10.0],
                   "stretch": ["A", 0.01], "later": ["A", 12.5], "kept": "after"}
    assert by_path["app.db"]["how"] == "rows" and by_path["app.db"]["undone_rows"] == 3
    assert by_path["www/about.html"]["regions"][0]["later"] == {
        "lines": ["<p>edited by staff</p>"]}
    assert {m["path"]: m["how"] for m in result["merged"]} == {
        "www/index.html": "lines", "logs/access.log": "append"}
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "PRAGMA journal_mode") == [("wal",)]  # as the service had it
    assert env.journal.check()["problems"] == []


def test_prefer_before_puts_the_conflicting_row_back_as_it_was(tmp_path):
    env, app = attacked(tmp_path)
    app.close()
    result = env.journal.excise(2, 2, "before", stopped=True)
    assert query(env.vol / "app.db", "SELECT price FROM products WHERE sku = 'A'") == [(10.0,)]
    [conflict] = [c for c in result["conflicts"] if c["path"] == "app.db"]
    assert conflict["rows"][0]["kept"] == "before"


def test_a_row_deleted_later_is_listed_not_found(tmp_path):
    env, app = attacked(tmp_path)
    app.sql("DELETE FROM accounts WHERE id = 66")  # an admin noticed mallory
    env.journal.close_epoch("mark")
    app.close()
    result = env.journal.excise(2, 2, stopped=True)
    [conflict] = [c for c in result["conflicts"] if c["path"] == "app.db"]
    reasons = {(r["table"], r["reason"]) for r in conflict["rows"]}
    assert reasons == {("products", "DATA"), ("accounts", "NOTFOUND")}
    assert query(env.vol / "app.db", "SELECT count(*) FROM accounts WHERE id = 66") == [(0,)]


def test_the_excision_is_itself_recorded_in_rows_and_can_be_undone(tmp_path):
    env, app = attacked(tmp_path)
    app.close()
    epoch = env.journal.excise(2, 2, stopped=True)["epoch"]
    [change] = [c for c in env.journal.diff(epoch)["changes"] if c["path"] == "app.db"]
    assert "file_level" not in change["rows"] and change["rows"]["tables"]["audit"]["insert"] == 2
    env.journal.excise(epoch, epoch, stopped=True)
    assert query(env.vol / "app.db", "SELECT count(*) FROM accounts WHERE id = 66") == [(1,)]
    assert env.journal.check()["problems"] == []


def test_a_table_without_a_primary_key_falls_back_to_file_level(tmp_path):
    env = make_env(tmp_path)
    con = sqlite3.connect(env.vol / "t.db", isolation_level=None)
    con.executescript("CREATE TABLE log(line TEXT); INSERT INTO log VALUES ('a');")
    env.journal.ensure()
    con.execute("INSERT INTO log VALUES ('evil')")
    env.journal.close_epoch("incident")
    con.execute("INSERT INTO log VALUES ('good')")
    env.journal.close_epoch("mark")
    con.close()
    assert "log" in env.journal.diff(1)["changes"][0]["rows"]["file_level"]
    result = env.journal.excise(1, 1, stopped=True)
    [conflict] = result["conflicts"]
    assert conflict["path"] == "t.db" and "without a primary key" in conflict["file_level"]
    assert "rows" not in conflict and conflict["kept"] == "after"


def test_a_schema_change_falls_back_to_file_level(tmp_path):
    env = make_env(tmp_path)
    con = sqlite3.connect(env.vol / "t.db", isolation_level=None)
    con.executescript("CREATE TABLE t(id INTEGER PRIMARY KEY, v); INSERT INTO t VALUES (1, 1);")
    env.journal.ensure()
    con.execute("ALTER TABLE t ADD COLUMN w")
    env.journal.close_epoch("mark")
    con.close()
    assert env.journal.diff(1)["changes"][0]["rows"]["file_level"] == "the schema changed"


def test_a_crafted_file_with_a_database_header_stays_at_file_level(tmp_path):
    env = make_env(tmp_path)
    put(env.vol, "fake.db", rows.HEADER + b"\xff" * 4000)
    env.journal.ensure()
    put(env.vol, "fake.db", rows.HEADER + b"\xee" * 4000)
    env.journal.close_epoch("mark")
    [change] = env.journal.diff(1)["changes"]
    assert change["rows"]["file_level"].startswith("unreadable")
    assert env.journal.check()["problems"] == []


def test_changesets_match_sqldiff(tmp_path):
    """Our snapshot-to-snapshot changeset is byte-identical to sqlite3-tools' `sqldiff`."""
    import shutil
    import subprocess

    if shutil.which("sqldiff") is None:
        pytest.skip("sqldiff (Debian's sqlite3-tools) is not installed")
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    for path, script in ((old, "INSERT INTO t VALUES (1, 'a'), (2, 'b')"),
                         (new, "INSERT INTO t VALUES (1, 'A'), (3, 'c')")):
        con = sqlite3.connect(path)
        con.executescript(f"CREATE TABLE t(id INTEGER PRIMARY KEY, v); {script};")
        con.close()
    ours, _ = rows.changeset(old, new)
    out = tmp_path / "cs"
    subprocess.run(["sqldiff", "--changeset", str(out), str(old), str(new)], check=True)
    assert ours == out.read_bytes()
    assert apsw.Changeset.invert(ours)

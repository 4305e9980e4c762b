"""Row-level epochs for SQLite databases in a journaled volume (apsw: SQLite's session extension).

At each close, a file that is an SQLite database (its header) and whose content or WAL changed
gets the changeset between its state at the previous close and now, stored with the chunks
and named by the epoch record (`rows` in the file's change). Excising a stretch inverts the
stretch's changesets, concatenated, and applies them to the current database: rows the stretch
inserted, deleted or updated go back, later rows stay, and every row a later epoch also touched
(SQLite's DATA, NOTFOUND, CONFLICT, CONSTRAINT and FOREIGN_KEY conflicts) is listed, kept at its
later value or per `prefer`. Never silent.

Snapshots. The state of a database is what the journal recorded at the boundary: the file, its
`-wal` and a hot `-journal`, read together (frozen or stopped), so the row level and the file
level describe the same instant. A snapshot is that state copied to a private file under
STORE/sqlite/ and opened there: SQLite replays the WAL (or rolls back the hot journal), the WAL
is checkpointed into the file and the copy switched to a rollback journal. So no connection is
ever opened on the service's own file (no backup API needed, nothing written to it), and the
snapshot is a cache: named by the contents it was made from, rebuilt from the object store
when missing (after a crash, or a first close), never needed for recovery.

Falls back to the file level (the existing `journal.merge` path: the whole file, a conflict when
it changed again after the stretch), said in the record and in the excision's result, when:
the schema changed; a table without a primary key changed (the session extension cannot name
its rows); the database is larger than MAX_BYTES; it cannot be read; it was created, deleted
or was not a database on either side.

The database is the service's: hostile. It is opened only in our private copies, with
SQLITE_DBCONFIG_DEFENSIVE, trusted_schema off, no extension loading (apsw's default), and
its size bounded before a byte is copied.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from corral.core.fsio import write_all
from corral.recover.journal.store import CHUNK, Meta, chunks_of, digest, meta_json, point

HEADER = b"SQLite format 3\0"
COMPANIONS = ("-wal", "-journal", "-shm")  # -shm: an index of the WAL, rebuilt from it
MAX_BYTES = 4 << 30  # larger databases stay at file level (two copies per close)
SHOWN_ROWS = 200  # rows listed per change by `state diff`; the rest is counted
SHOWN_CHARS = 200  # per value
OPS = {"INSERT": "insert", "UPDATE": "update", "DELETE": "delete"}


def companion_of(path: str) -> str | None:
    """The database a -wal/-journal/-shm path belongs to."""
    for suffix in COMPANIONS:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return None


def _is_db(objects: Any, meta: Meta | None) -> bool:
    if meta is None or meta.kind != "file" or not meta.chunks or (meta.size or 0) < 512 \
            or (meta.size or 0) > MAX_BYTES:
        return False
    try:
        return objects.read(meta.chunks[0])[:16] == HEADER
    except (OSError, ValueError):
        return False


def _key(state: dict[str, Meta], path: str) -> str:
    """The name of the snapshot of `path` in `state`: its contents, with its WAL and journal."""
    parts = [path]
    for name in (path, path + "-wal", path + "-journal"):
        meta = state.get(name)
        parts.append(meta.digest or "" if meta is not None and meta.kind == "file" else "")
    return digest("\0".join(parts).encode(errors="surrogateescape"))[:32]


# -- connections and snapshots ---------------------------------------------------------------

@contextmanager
def _connect(path: Path, readonly: bool = False) -> Iterator[Any]:
    import apsw

    flags = (apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE) | \
        apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_NOFOLLOW
    con = apsw.Connection(str(path), flags=flags)
    try:
        con.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        con.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
        con.setbusytimeout(0)
        yield con
    finally:
        con.close()


def _write_meta(objects: Any, meta: Meta, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        for chunk in meta.chunks:
            write_all(fd, objects.read(chunk))
    finally:
        os.close(fd)


def _materialize(log: Any, state: dict[str, Meta], path: str, out: Path) -> str:
    """Write the database `path` as of `state` to `out`, its WAL checkpointed into it and in
    rollback-journal mode. Returns the journal mode it had ("wal", "delete"...)."""
    work = out.with_name(out.name + ".d")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        db = work / "db"
        for suffix in ("", "-wal", "-journal"):
            meta = state.get(path + suffix)
            if meta is not None and meta.kind == "file":
                _write_meta(log.objects, meta, work / f"db{suffix}")
        with _connect(db) as con:
            mode = str(con.execute("PRAGMA journal_mode").get)
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.execute("PRAGMA journal_mode=DELETE")
        os.replace(db, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return mode


def snapshot(log: Any, state: dict[str, Meta], path: str) -> Path:
    """The snapshot of `path` as of `state`, made if missing (see the module's docstring)."""
    folder = log.dir / "sqlite"
    folder.mkdir(exist_ok=True, mode=0o700)
    out = folder / f"{_key(state, path)}.db"
    if not out.exists():
        tmp = folder / f".{out.name}.tmp"
        _materialize(log, state, path, tmp)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # a cache, but one a power loss must not leave torn under its name
        finally:
            os.close(fd)
        os.replace(tmp, out)
        point()
    return out


def clean(folder: Path) -> int:
    """Remove what an interrupted snapshot or excision left (hidden names); returns how many."""
    left = [p for p in folder.iterdir() if p.name.startswith(".")]
    for path in left:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return len(left)


def _tables(con: Any, schema: str) -> list[tuple[str, str | None, bool]]:
    """(name, sql, has a primary key) of each ordinary table."""
    out = []
    for name, sql in con.execute(f"SELECT name, sql FROM {schema}.sqlite_schema WHERE "
                                 "type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"):
        if (sql or "").upper().startswith("CREATE VIRTUAL"):
            continue  # its content lives in ordinary shadow tables
        pk = con.execute(f"SELECT count(*) FROM pragma_table_info(?, '{schema}') WHERE pk > 0",
                         (name,)).get
        out.append((name, sql, bool(pk)))
    return out


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def changeset(old: Path, new: Path) -> tuple[bytes, dict[str, Any]]:
    """The changeset taking snapshot `old` to `new`, and what the record says of it: per
    table counts, and `file_level` (why rows cannot describe it) when they cannot."""
    import apsw

    info: dict[str, Any] = {"tables": {}}
    with _connect(new, readonly=True) as con:
        con.execute("ATTACH DATABASE ? AS old", (f"file:{old}?mode=ro",))
        schema = "SELECT type, name, tbl_name, sql FROM {}.sqlite_schema ORDER BY type, name"
        if list(con.execute(schema.format("main"))) != list(con.execute(schema.format("old"))):
            return b"", info | {"file_level": "the schema changed"}
        session = apsw.Session(con, "main")
        no_pk = []
        for name, _, has_pk in _tables(con, "main"):
            if not has_pk:
                q = _quote(name)
                if con.execute(f"SELECT (SELECT count(*) FROM main.{q}) != (SELECT count(*) "
                               f"FROM old.{q}) OR EXISTS (SELECT * FROM main.{q} EXCEPT "
                               f"SELECT * FROM old.{q})").get:
                    no_pk.append(name)
                continue
            session.attach(name)
            session.diff("old", name)
        data = session.changeset()
        session.close()
    for change in apsw.Changeset.iter(data):
        counts = info["tables"].setdefault(change.name, {"insert": 0, "update": 0, "delete": 0})
        counts[OPS[change.op]] += 1
    if no_pk:
        info["no_primary_key"] = no_pk
        info["file_level"] = f"table(s) without a primary key changed: {', '.join(no_pk)}"
    return data, info


# -- the epoch record ------------------------------------------------------------------------

def annotate(log: Any, old: dict[str, Meta], new: dict[str, Meta],
             changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `rows` to the change of each database whose content or WAL changed between `old`
    and `new` (a change of the database itself is added when only its WAL changed). Stages
    the changesets in log.objects; `new`'s contents must be readable (flushed)."""
    from corral.recover.journal.store import path_from_json, path_json

    by_path = {path_from_json(c): c for c in changes}
    candidates = {companion_of(p) or p for p in by_path}
    out = list(changes)
    for path in sorted(candidates):
        if not _is_db(log.objects, new.get(path)):
            continue
        if not _is_db(log.objects, old.get(path)):
            continue  # created, or not a database before: file level
        try:
            data, info = changeset(snapshot(log, old, path), snapshot(log, new, path))
        except Exception as exc:  # noqa: BLE001 - apsw's errors on a hostile file: file level
            data, info = b"", {"tables": {}, "file_level": f"unreadable: {exc}"}
        size, digest_, chunks = _store(log.objects, data)
        info["changeset"] = {"size": size, "blake3": digest_} | (
            {"chunks": list(chunks)} if len(chunks) > 1 else {})
        entry = by_path.get(path)
        if entry is None:  # only its WAL changed: the database changed all the same
            entry = path_json(path) | {"change": "modified", "details": ["rows"],
                                       "before": meta_json(new[path]),
                                       "after": meta_json(new[path])}
            out.append(entry)
        entry["rows"] = info
        if _key(old, path) != _key(new, path):  # the cache holds the latest state only
            (log.dir / "sqlite" / f"{_key(old, path)}.db").unlink(missing_ok=True)
    out.sort(key=lambda c: os.fsencode(path_from_json(c)))
    return out


def _store(objects: Any, data: bytes) -> tuple[int, str, tuple[str, ...]]:
    from corral.recover.journal import merge

    return merge.store(objects, data)


def _read(objects: Any, rows: dict[str, Any]) -> bytes:
    return b"".join(objects.read(c) for c in chunks_of(rows))


def _value(value: Any) -> Any:
    import apsw

    if value is apsw.no_change:
        return "(unchanged)"
    if isinstance(value, bytes):
        return {"blob": value[:SHOWN_CHARS // 2].hex(), "bytes": len(value)}
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return value[:SHOWN_CHARS] + f"... ({len(value)} chars)"
    return value


def _row(values: Any) -> list[Any] | None:
    return None if values is None else [_value(v) for v in values]


def rows_of(objects: Any, rows: dict[str, Any]) -> dict[str, Any]:
    """A `rows` entry spelled out for `state diff`: (table, op, key, before, after) per row."""
    import apsw

    out: list[dict[str, Any]] = []
    more = 0
    for change in apsw.Changeset.iter(_read(objects, rows)):
        if len(out) >= SHOWN_ROWS:
            more += 1
            continue
        side: Any = change.new if change.op == "INSERT" else change.old
        out.append({"table": change.name, "op": OPS[change.op],
                    "key": [_value(side[i]) for i in sorted(change.pk_columns)],
                    "before": _row(change.old), "after": _row(change.new)})
    return {"rows": out, "more_rows": more}


# -- excision --------------------------------------------------------------------------------

REASONS = {"DATA": "changed again later", "NOTFOUND": "deleted later",
           "CONFLICT": "a row with this key was added later",
           "CONSTRAINT": "would break a constraint", "FOREIGN_KEY": "would break foreign keys"}


def revert(log: Any, state: dict[str, Meta], path: str, stretch: list[dict[str, Any]],
           prefer: str | None) -> tuple[Path, str, dict[str, Any], list[dict[str, Any]]]:
    """The current database (`path` in `state`) without what the stretch's changesets did.
    Returns (the result, a private file; its journal mode; info; conflicting rows)."""
    import apsw

    names = {getattr(apsw, f"SQLITE_CHANGESET_{r}"): r for r in REASONS}
    folder = log.dir / "sqlite"
    folder.mkdir(exist_ok=True, mode=0o700)
    out = folder / f".excise-{_key(state, path)}"
    mode = _materialize(log, state, path, out)
    combined = b""
    for rows in stretch:
        data = _read(log.objects, rows)
        combined = apsw.Changeset.concat(combined, data) if combined else data
    undo = apsw.Changeset.invert(combined) if combined else b""
    conflicts: list[dict[str, Any]] = []
    kept = "before" if prefer == "before" else "after"

    def on_conflict(reason: int, change: Any) -> int:
        why = names.get(reason, str(reason))
        if why == "FOREIGN_KEY":
            conflicts.append({"reason": why, "why": REASONS[why], "kept": "after",
                              "count": change.fk_conflicts})
            return apsw.SQLITE_CHANGESET_OMIT  # for FOREIGN_KEY: apply anyway, listed
        side: Any = change.new if change.op == "INSERT" else change.old
        # The undo's "old" is what the stretch left, its "new" what was there before it.
        conflicts.append({"table": change.name, "reason": why, "why": REASONS[why],
                          "key": [_value(side[i]) for i in sorted(change.pk_columns)],
                          "before_stretch": _row(change.new), "stretch": _row(change.old),
                          "later": _row(change.conflict), "kept": kept})
        if kept == "before" and why in ("DATA", "CONFLICT"):
            return apsw.SQLITE_CHANGESET_REPLACE
        if kept == "before" and why == "NOTFOUND":
            conflicts[-1]["kept"] = "after"  # a row deleted later cannot be updated back
        return apsw.SQLITE_CHANGESET_OMIT

    total = sum(1 for _ in apsw.Changeset.iter(undo)) if undo else 0
    with _connect(out) as con:
        if undo:
            apsw.Changeset.apply(undo, con, conflict=on_conflict)
        if mode == "wal":
            con.execute("PRAGMA journal_mode=WAL")  # as the service had it
    for name in (out.name + "-wal", out.name + "-shm"):
        (folder / name).unlink(missing_ok=True)
    info = {"how": "rows", "undone_rows": total - len([c for c in conflicts if "key" in c]),
            "conflicting_rows": len(conflicts)}
    return out, mode, info, conflicts


def store_file(objects: Any, path: Path) -> tuple[int, str, tuple[str, ...]]:
    """Stage a file's content in chunks, as the scanner would: (size, digest, chunks)."""
    import blake3

    from corral.recover.journal.fs import EMPTY

    whole, chunks, size = blake3.blake3(), [], 0
    with open(path, "rb") as handle:
        while data := handle.read(CHUNK):
            whole.update(data)
            chunks.append(blake3.blake3(data).hexdigest())
            objects.stage(chunks[-1], data)
            size += len(data)
    if not chunks:
        return 0, EMPTY, ()
    return size, chunks[0] if len(chunks) == 1 else whole.hexdigest(), tuple(chunks)


def merger(log: Any, state: dict[str, Meta], prefer: str | None
           ) -> Callable[[str, Meta, Meta, Meta, list[dict[str, Any]]], Any]:
    """For plan_excision: a database's content with the stretch's rows undone."""

    def merged(path: str, before: Meta, end: Meta, current: Meta,
               stretch: list[dict[str, Any]]) -> Any:
        if not _is_db(log.objects, current):
            return None
        try:
            result, _, info, conflicts = revert(log, state, path, stretch, prefer)
        except Exception as exc:  # noqa: BLE001 - apsw's errors on a hostile file
            return {"file_level": f"rows could not be applied: {exc}"}
        try:
            size, digest_, chunks = store_file(log.objects, result)
        finally:
            result.unlink(missing_ok=True)
        meta = current._replace(size=size, digest=digest_, chunks=chunks, mtime_ns=None)
        return meta, info, conflicts

    return merged

"""The redo log's decisions, as pure functions over states (path -> Meta) and epoch records:
what changed, replaying a record, planning an excision, choosing what commit may fold. No I/O,
so the property tests can exercise them directly."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.recover.journal.store import (
    Meta,
    differences,
    meta_from_json,
    meta_json,
    path_from_json,
    path_json,
    same,
)

State = dict[str, Meta]
# (path, before the stretch, at its end, current) -> (merged content as a Meta, what the merge
# did, its conflicting regions), or None when the file stays at file level (binary, too big).
Merged = tuple[Meta, dict[str, Any], list[dict[str, Any]]]
Merger = Callable[[str, Meta, Meta, Meta], Merged | None]
# The same for an SQLite database, given the `rows` of its changes inside the stretch
# (journal.sqlite); a dict {"file_level": why} when the rows cannot be applied.
RowMerger = Callable[[str, Meta, Meta, Meta, list[dict[str, Any]]],
                     Merged | dict[str, Any] | None]
COMPANIONS = ("-wal", "-journal", "-shm")  # of a database: its state, with the file


def changes(old: State, new: State, writer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One entry per path that differs, sorted by path. Linear in the volume's size but only
    the changed paths are sorted and serialised."""
    changed = [p for p, m in new.items() if (o := old.get(p)) is not m and not same(o, m)]
    changed += [p for p in old if p not in new]
    out = []
    for path in sorted(changed):
        before, after = old.get(path), new.get(path)
        entry: dict[str, Any] = path_json(path)
        entry["change"] = "added" if before is None else "deleted" if after is None \
            else "modified"
        if before is not None and after is not None:
            entry["details"] = differences(before, after)
        entry["before"], entry["after"] = meta_json(before), meta_json(after)
        if writer:
            entry["writer"] = writer
        out.append(entry)
    return out


def apply(state: State, record: dict[str, Any]) -> None:
    """Replay one epoch: each changed path takes its "after" value."""
    for change in record["changes"]:
        after = meta_from_json(change["after"])
        if after is None:
            state.pop(path_from_json(change), None)
        else:
            state[path_from_json(change)] = after


def summary(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: record[k] for k in ("id", "start", "end", "reason", "note", "incidents")}
    out["files_changed"] = len(record["changes"])
    if record.get("skipped"):  # not journaled this epoch: other fs, too deep, past the budget
        out["skipped"] = record["skipped"]
    if "excised" in record:
        out["excised"] = record["excised"]
        out["conflicts"] = len(record["conflicts"])
    return out


def change_line(change: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in change.items() if k in ("path", "raw", "change", "details")}


# -- excision -------------------------------------------------------------------------------

@dataclass
class Excision:
    target: dict[str, Meta | None] = field(default_factory=dict)  # None: must not exist
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    forced: list[dict[str, Any]] = field(default_factory=list)
    merged: list[dict[str, Any]] = field(default_factory=list)  # settled within the file

    def final(self, current: State) -> State:
        out = dict(current)
        for path, meta in self.target.items():
            if meta is None:
                out.pop(path, None)
            else:
                out[path] = meta
        return out


def plan_excision(records: Iterable[dict[str, Any]], to: int, current: State,
                  prefer: str | None, merge: Merger | None = None,
                  rows: RowMerger | None = None) -> Excision:
    """`records` run from the stretch's first epoch to the latest; `to` ends the stretch;
    `current` is the state after the latest. A path changed inside the stretch goes back to
    its value before the stretch (the "before" of its first change there) unless it changed
    again after the stretch. Such a file, a file in all three versions, is handed to `merge`
    (journal.merge: byte ranges, lines): what it settles is listed in `merged`, its
    conflicting regions make it a conflict. Otherwise it is a conflict at file level, kept at
    its later value (the default and prefer="after") or put back (prefer="before").
    An SQLite database whose every change since the stretch began carries its rows, and that
    changed again after it, is handed to `rows` instead: the stretch's rows undone, each row a
    later epoch also touched a conflict; its -wal, -journal and -shm then go (the result is
    whole in the file)."""
    before: dict[str, Meta | None] = {}
    end: dict[str, Meta | None] = {}
    inside: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    row_sets: dict[str, list[dict[str, Any] | None]] = {}  # inside the stretch
    row_level: dict[str, bool] = {}  # every change since the stretch began has its rows
    file_level: dict[str, str] = {}  # databases whose rows cannot be used, and why
    for record in records:
        for change in record["changes"]:
            path = path_from_json(change)
            has_rows = "rows" in change and "file_level" not in change["rows"]
            if "rows" in change and not has_rows:
                file_level[path] = change["rows"]["file_level"]
            row_level[path] = row_level.get(path, True) and has_rows
            if record["id"] <= to:
                if path not in inside:
                    before[path] = meta_from_json(change["before"])
                end[path] = meta_from_json(change["after"])
                inside.setdefault(path, []).append(record["id"])
                row_sets.setdefault(path, []).append(change.get("rows"))
            else:
                after.setdefault(path, []).append(record["id"])
    plan = Excision()
    by_path = {}
    databases = {p for p in inside if rows is not None and row_level.get(p) and p in after}
    for path in sorted(inside):
        if _database(path, databases) is not None:
            continue  # a companion of a database its rows settle: see below
        if path not in after:
            plan.target[path] = before[path]
            continue
        kept = "before" if prefer == "before" else "after"
        conflict: dict[str, Any] = path_json(path)
        conflict |= {"inside": inside[path], "after": after[path]}
        if path in databases:
            assert rows is not None
            stretch = row_sets[path]
            settled = _merge(lambda *m, s=stretch: rows(*m, s),  # type: ignore[call-arg]
                             path, before[path], end[path], current.get(path), prefer)
            if settled is not None and isinstance(settled[0], str):  # rows failed: file level
                file_level[path] = settled[0]
                databases.discard(path)
                settled = None
        else:
            settled = _merge(merge, path, before[path], end[path], current.get(path), prefer)
        if path in file_level:
            conflict["file_level"] = file_level[path]
        if settled is not None:
            plan.target[path], info, hunks, fields = settled
            if not hunks and not fields:
                plan.merged.append(conflict | info)
                continue
            conflict |= info | {"kept": kept, "review": True,
                                "rows" if info.get("how") == "rows" else "regions": hunks,
                                "fields": fields}
        else:
            plan.target[path] = before[path] if kept == "before" else current.get(path)
            conflict |= {"kept": kept, "review": True}
        conflict |= {"before_stretch": meta_json(before[path]),
                     "later": meta_json(current.get(path))}
        plan.conflicts.append(conflict)
        by_path[path] = conflict
    for db in databases:  # settled by rows: the result is whole in the file, so a WAL or a
        for suffix in COMPANIONS:  # journal of the current version would be replayed on it
            if db + suffix in current or db + suffix in inside:
                plan.target[db + suffix] = None
    for path, needed_by in _fix_structure(current, plan.target):
        plan.forced.append(path_json(path) | {"kept": "later", "needed_by": path_json(needed_by)})
        if path in by_path:
            by_path[path]["kept"] = "after"
    return plan


def _database(path: str, databases: set[str]) -> str | None:
    """The database `path` is a companion of (-wal...), if it is one of `databases`."""
    for suffix in COMPANIONS:
        if path.endswith(suffix) and path[: -len(suffix)] in databases:
            return path[: -len(suffix)]
    return None


def _merge(merge: Any, path: str, before: Meta | None, end: Meta | None,
           current: Meta | None, prefer: str | None) -> Any:
    """The file's content merged by `merge`, its mode and owner three-way here: each takes the
    later epochs' value if they changed it, else goes back to its value before the stretch; a
    field both changed differently is a conflict settled by `prefer` (default: the later)."""
    if merge is None or before is None or end is None or current is None or \
            not before.kind == end.kind == current.kind == "file":
        return None
    done = merge(path, before, end, current)
    if done is None:
        return None
    if isinstance(done, dict):  # a database whose rows could not be applied: say why
        return (done["file_level"],)
    content, info, hunks = done
    fields: list[str] = []
    values: dict[str, tuple[int, ...]] = {}
    for name, get in (("mode", lambda m: (m.mode,)), ("owner", lambda m: (m.uid, m.gid))):
        b, e, c = get(before), get(end), get(current)
        if c == e:
            values[name] = b
        elif b in (e, c):
            values[name] = c
        else:
            fields.append(name)
            values[name] = b if prefer == "before" else c
    (mode,), (uid, gid) = values["mode"], values["owner"]
    return content._replace(mode=mode, uid=uid, gid=gid), info, hunks, fields


def _is_dir(meta: Meta | None) -> bool:
    return meta is not None and meta.kind == "dir"


def _ancestors(path: str) -> Iterable[str]:
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _fix_structure(current: State, target: dict[str, Meta | None]) -> list[tuple[str, str]]:
    """Per-path decisions can break the tree: a file kept from after the stretch inside a
    directory the stretch created (and the excision removes), a directory restored as a file
    while a later file lives in it. Each such pair is settled by keeping the later value (the
    current one, which is a consistent tree) of whichever side the excision was changing;
    repeated until the tree holds. Returns (path kept, path that needed it)."""
    forced: list[tuple[str, str]] = []

    def final(path: str) -> Meta | None:
        return target[path] if path in target else current.get(path)

    while True:
        clash: dict[str, str] = {}  # path to put back to its current value -> why
        for path, meta in target.items():
            if meta is None or path in clash:
                continue
            for parent in _ancestors(path):
                if not _is_dir(final(parent)):
                    keep = parent if parent in target and _is_dir(current.get(parent)) else path
                    clash.setdefault(keep, path if keep == parent else parent)
                    break
        removed_dirs = {p for p, m in target.items() if not _is_dir(m) and _is_dir(current.get(p))}
        if removed_dirs:
            for path in current:
                if path not in target:
                    for parent in _ancestors(path):
                        if parent in removed_dirs:
                            clash.setdefault(parent, path)
                            break
        if not clash:
            return forced
        for path, why in clash.items():
            target[path] = current.get(path)
            forced.append((path, why))


# -- commit ---------------------------------------------------------------------------------

def fold_prefix(records: list[dict[str, Any]], ends: list[float], cutoff: float,
                accept: set[int]) -> tuple[int, str]:
    """How many of `records` (the live log, oldest first) commit may fold, and why it stops.
    Only a prefix folds, in order. An epoch folds when it ended before `cutoff` and saw no
    incident, or the operator accepted it, or an excision later in the folded prefix took it
    out (its writes were undone; what remains was reviewed at the excision)."""
    excised_by: dict[int, int] = {}
    for record in records:
        if "excised" in record:
            span = record["excised"]
            for epoch in range(span["from"], span["to"] + 1):
                excised_by.setdefault(epoch, record["id"])
    count, why = 0, "nothing left to fold"
    for record, end in zip(records, ends, strict=True):  # an end per record
        if end > cutoff:
            why = f"epoch {record['id']} is younger than the quiet period"
            break
        if (record["incidents"] or record["reason"] == "incident") \
                and record["id"] not in accept and record["id"] not in excised_by:
            why = f"epoch {record['id']} saw an incident (excise it, or accept it)"
            break
        count += 1
    while count:  # an incident epoch folds only with the excision that undid it
        last = records[count - 1]["id"]
        late = [r["id"] for r in records[:count] if (r["incidents"] or r["reason"] == "incident")
                and r["id"] not in accept and excised_by.get(r["id"], 0) > last]
        if not late:
            break
        count = next(i for i, r in enumerate(records) if r["id"] == late[0])
        why = f"epoch {late[0]} saw an incident; its excision is not old enough to commit yet"
    return count, why

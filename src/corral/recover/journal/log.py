"""The persistent-state redo log of a journaled volume (spec: "Persistent state: the redo log").

Per volume, in STATE/journal/STORE/:

    head.json          the commit point: latest closed epoch (id, record hash), first live
                       epoch, baseline file and hash, when the open epoch began
    baseline-K.json    the volume as of epoch K (path -> metadata): what `commit` folded
    epochs/N.json      one record per closed epoch: what changed, before and after, who, why;
                       `prev` is the blake3 of the previous record's bytes (a hash chain)
    objects/packs/     content chunks, blake3-named, zstd, deduplicated (journal_objects.py)
    state.cache        the state at some epoch, and what each file looked like on disk then
                       (inode, size, mtime, ctime), so unchanged files are not read again
    excise.json        an excision under way: its record, written before the volume is touched
    lock               flock: one writer at a time (supervisor, CLI), readers shared

Everything is written before head.json names it, and head.json is replaced atomically; anything
a crash leaves that head.json does not reach is garbage that recover() removes. An excision is
rolled forward (redone from excise.json) rather than back: the volume may be half rewritten.
History is never rewritten: an excision is a new epoch, commit folds a prefix into the baseline.

The chain makes the journal tamper-evident, not tamper-proof: whoever can write it all can write
a new consistent chain. Log head hashes elsewhere (incident records) to anchor it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from corral.core.errors import RuntimeFailure, UsageError
from corral.core.fsio import keep_reserve
from corral.core.text import iso, show
from corral.host import loopfs
from corral.recover.journal.fs import Scan, restore
from corral.recover.journal.objects import Objects
from corral.recover.journal.plan import apply as _apply
from corral.recover.journal.plan import change_line as _change_line
from corral.recover.journal.plan import changes as _changes
from corral.recover.journal.plan import plan_excision
from corral.recover.journal.plan import summary as _summary
from corral.recover.journal.store import (
    GENESIS,
    HEAD,
    Meta,
    chunks_of,
    digest,
    encode,
    failed,
    from_index_key,
    index_key,
    meta_from_json,
    meta_from_row,
    meta_row,
    path_from_json,
    path_json,
    read_cache,
    unlink_durable,
    write_cache,
    write_durable,
)

REASONS = ("schedule", "incident", "revert", "mark", "excise")
CACHE, INTENT, LOCK = "state.cache", "excise.json", "lock"
SAVE_AFTER_READS = 1000
Freeze = Callable[[], AbstractContextManager[Any]]


class JournalBusy(RuntimeFailure):
    """Another process holds the journal's lock."""


class Log:
    def __init__(self, spec_or_state_dir: Any, volume_store: str,
                 volume_path: str | os.PathLike[str] | None = None, *,
                 clock: Callable[[], float] = time.time):
        state = Path(getattr(spec_or_state_dir, "state", spec_or_state_dir))
        self.store = volume_store
        self.dir = state / "journal" / volume_store
        self.volume = Path(volume_path) if volume_path else state / "volumes" / volume_store
        # A volume with a file system of its own (host.loopfs) is read only while mounted:
        # its empty mount point would be journaled as every file deleted.
        self.sized_image = None if volume_path else \
            state / loopfs.IMAGES / f"{volume_store}.img"
        self.objects = Objects(self.dir / "objects")
        self.clock = clock
        # The state at head, kept in memory between calls (the supervisor's Journal lives
        # long), with the tag of the head it belongs to: another process may close meanwhile.
        self._tag: tuple[int, str] | None = None
        self._state: dict[str, Meta] = {}
        # What the files looked like when last read (path -> Meta, path -> observation):
        # usually the same dict as _state, different after loading a stale cache.
        self._known: dict[str, Meta] = {}
        self._observed: dict[str, Any] = {}
        self._unsaved_reads = 0  # files read since the cache was last written
        self.last_scan: dict[str, Any] = {}  # what the last close read and stored
        # Where an excision writes: the volume directory, or, while the service runs, its
        # mount of the volume (an overlay whose upper layer is that directory: writing the
        # upper layer under a mounted overlay is undefined, and the service would keep
        # seeing the old files). See journal.online.
        self.write_root: Path | None = None
        # SQLite databases get row-level epochs (journal.sqlite); off: file level only
        # (the bench compares both).
        self.row_level = True

    # -- files ------------------------------------------------------------------------------

    def _record_path(self, epoch: int) -> Path:
        return self.dir / "epochs" / f"{epoch:08d}.json"

    def head(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / HEAD).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RuntimeFailure(f"{self.dir / HEAD}: unreadable ({exc}); run `corral state "
                                 "check`") from None

    def record(self, epoch: int) -> tuple[dict[str, Any], str]:
        data = self._record_path(epoch).read_bytes()
        return json.loads(data), digest(data)

    def records(self, first: int, last: int) -> Iterator[dict[str, Any]]:
        for epoch in range(first, last + 1):
            yield self.record(epoch)[0]

    def baseline(self, head: dict[str, Any]) -> tuple[dict[str, Any], str]:
        data = (self.dir / head["baseline"]["file"]).read_bytes()
        return json.loads(data), digest(data)

    @contextmanager
    def _staging(self, what: str) -> Iterator[None]:
        """Objects staged inside are discarded if the block fails: they must never outlive the
        record that would have named them. An OSError becomes a RuntimeFailure saying what was
        being done."""
        try:
            yield
        except OSError as exc:
            self.objects.discard()
            raise failed(exc, what) from exc
        except BaseException:
            self.objects.discard()
            raise

    @contextmanager
    def locked(self, exclusive: bool = True, wait: bool = True) -> Iterator[bool]:
        """Yields False (and locks nothing) when a reader finds no journal at all. Without
        `wait`, raises JournalBusy instead of waiting for another writer."""
        if exclusive:  # objects hold the volume's data: for root's eyes only
            self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dir.mkdir(exist_ok=True, mode=0o700)
        elif not (self.dir / LOCK).exists():
            yield False
            return
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) |
                            (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise JournalBusy(f"{self.volume}: another process is writing its journal "
                                  "(a close or an excision); try again") from None
            yield True
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return (self.dir / HEAD).exists()

    # -- the state at head ------------------------------------------------------------------

    def _load(self, head: dict[str, Any]) -> None:
        tag = (head["epoch"], head["hash"])
        if self._tag == tag:
            return
        cache_tag, self._known, self._observed = read_cache(self.dir / CACHE)
        if cache_tag == tag:
            self._state = self._known
        elif cache_tag and self._is_state_at(head, *cache_tag):
            # Older than head but still on the chain: replay only the epochs since.
            self._state = dict(self._known)
            for record in self.records(cache_tag[0] + 1, head["epoch"]):
                _apply(self._state, record)
        else:  # no usable cache: replay the log from the baseline
            self._state = self._replay(head, head["epoch"])
        self._tag = tag

    def _is_state_at(self, head: dict[str, Any], epoch: int, digest_: str) -> bool:
        """Is (epoch, hash) a point of the live chain: the baseline's, or a live record's?"""
        if epoch == head["first"] - 1:
            return digest_ == head["baseline"].get("anchor")
        return head["first"] <= epoch < head["epoch"] and self.record(epoch)[1] == digest_

    def _replay(self, head: dict[str, Any], last: int) -> dict[str, Meta]:
        state = {from_index_key(k): meta_from_row(r)
                 for k, r in self.baseline(head)[0]["entries"].items()}
        for record in self.records(head["first"], last):
            _apply(state, record)
        return state

    def _save_cache(self, force: bool = False) -> None:
        """Writing the cache costs as much as a scan of a big volume, and a stale cache only
        costs a replay of the log plus reading again the files read since it was written.
        So it is written when that would be more than SAVE_AFTER_READS files."""
        assert self._tag is not None
        if force or self._unsaved_reads >= SAVE_AFTER_READS:
            write_cache(self.dir / CACHE, self._tag, self._state, self._known, self._observed)
            self._unsaved_reads = 0

    def _adopt(self, scan: Scan) -> None:
        self._state = self._known = scan.entries
        self._observed = scan.observed
        self._unsaved_reads += scan.read_files

    # -- creating and closing epochs --------------------------------------------------------

    def _init(self, freeze: Freeze | None) -> dict[str, Any]:
        """The journal starts from the volume as it is: every file is stored once, so the
        first epoch can say what any file was before it changed."""
        now = iso(self.clock())
        base_ref = {"file": "baseline-0.json", "hash": "", "anchor": GENESIS}  # hash: once written
        head = {"format": 1, "epoch": 0, "hash": GENESIS, "first": 1, "opened": now,
                "baseline": base_ref}
        self._known, self._observed = {}, {}  # nothing read before is stored in this journal
        with self._staging(f"starting the journal of {self.volume}"):
            (self.dir / "epochs").mkdir(exist_ok=True, mode=0o700)
            self.objects.create()
            scan = self._snapshot(freeze)
            self.objects.flush()
            baseline = encode({"format": 1, "epoch": 0, "anchor": GENESIS, "created": now,
                               "entries": {index_key(p): meta_row(m)
                                           for p, m in scan.entries.items()}})
            write_durable(self.dir / "baseline-0.json", baseline)
            base_ref["hash"] = digest(baseline)
            write_durable(self.dir / HEAD, encode(head))  # the journal exists from here on
        self._tag = (0, GENESIS)
        self._adopt(scan)
        self._save_cache(force=True)
        return head

    def ensure(self, freeze: Freeze | None = None) -> None:
        """Start journaling the volume as it is now, if not yet. The supervisor calls this (and
        recover()) before it starts the service, so the first epoch holds its first write."""
        with self.locked():
            self.recover_locked()
            if self.head() is None:
                self._init(freeze)

    def close_epoch(self, reason: str, note: str | None = None, incidents: Iterable[str] = (),
                    writer_hint: dict[str, Any] | None = None, freeze: Freeze | None = None,
                    wait: bool = True) -> int | None:
        """End the open epoch: record what changed in the volume since the last close. Returns
        the new epoch's id, or None for a scheduled close that found nothing changed (an
        incident, revert or mark always records its boundary, even with no change).
        `freeze`, if given, is entered around the boundary scan (see _snapshot). With
        wait=False, JournalBusy is raised at once if another process holds the journal (an
        event loop should not block on a `corral state` command)."""
        if reason not in REASONS:
            raise ValueError(f"{reason!r}: not one of {', '.join(REASONS)}")
        with self.locked(wait=wait):
            self.recover_locked()
            if self.head() is None:
                self._init(freeze)
            return self._close(reason, note, list(incidents), writer_hint, freeze,
                               skip_empty=reason == "schedule")

    def close_locked(self, reason: str, note: str | None = None,
                     freeze: Freeze | None = None) -> int | None:
        """A close that records nothing when nothing changed, for a caller holding the lock
        (journal.online, before an excision)."""
        if self.head() is None:
            self._init(freeze)
        return self._close(reason, note, [], None, freeze, skip_empty=True)

    def _close(self, reason: str, note: str | None, incidents: list[str],
               writer: dict[str, Any] | None, freeze: Freeze | None,
               skip_empty: bool) -> int | None:
        head = self.head()
        assert head is not None
        self._load(head)
        with self._staging(f"closing an epoch of {self.volume}"):
            keep_reserve(self.dir, 0, f"closing an epoch of {self.volume}")
            scan = self._snapshot(freeze)
            changes = _changes(self._state, scan.entries, writer)
            stored_bytes = self.objects.staged_bytes
            stored = self.objects.flush()  # before the record that names them
            changes = self._rows(self._state, scan.entries, changes)
            stored_bytes += self.objects.staged_bytes
            stored += self.objects.flush()
        self.last_scan = {"entries": len(scan.entries), "frozen_ms": scan.frozen_ms,
                          "read_files": scan.read_files,
                          "read_bytes": scan.read_bytes, "stored_objects": stored,
                          "stored_bytes": stored_bytes, "changes": len(changes)}
        if not changes and skip_empty:
            if scan.read_files:
                self._adopt(scan)
                self._save_cache()
            return None
        record: dict[str, Any] = {
            "id": head["epoch"] + 1, "start": head["opened"], "end": iso(self.clock()),
            "reason": reason, "note": note, "incidents": incidents, "prev": head["hash"],
            "changes": changes}
        if scan.skipped:
            record["skipped"] = [path_json(p) for p in scan.skipped]
        self._commit_record(head, record)
        self._adopt(scan)
        self._save_cache()
        return record["id"]

    def _rows(self, old: dict[str, Meta], new: dict[str, Meta],
              changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Row-level changesets of the SQLite databases among `changes` (journal.sqlite;
        apsw is imported only when a changed file may be one)."""
        if not self.row_level or not any(
                (m := new.get(path_from_json(c))) is not None and m.kind == "file" and
                (m.size or 0) >= 512 or path_from_json(c).endswith(("-wal", "-journal"))
                for c in changes):
            return changes
        from corral.recover.journal import sqlite

        return sqlite.annotate(self, old, new, changes)

    def _snapshot(self, freeze: Freeze | None) -> Scan:
        """Scan the volume. With a freezer, twice: first while the service runs (reading and
        storing what changed: the slow part), then frozen, where only files that changed
        again meanwhile are read (stat shows which). The second scan is the epoch's boundary;
        the service stands still for a stat walk and a few reads, not for all of them."""
        if self.sized_image is not None and self.sized_image.exists() \
                and loopfs.mounted_at(self.volume) is None:
            raise RuntimeFailure(f"{self.volume}: the volume's file system is not mounted "
                                 "(after a reboot, `corral up` mounts it); its journal reads "
                                 "nothing from an empty mount point")
        if freeze is None:
            return Scan(self.objects, self._known, self._observed).run(self.volume)
        pre = Scan(self.objects, self._known, self._observed, defer_fresh=True).run(self.volume)
        started = time.monotonic()
        with freeze():
            scan = Scan(self.objects, pre.entries, pre.observed).run(self.volume)
        scan.frozen_ms = round((time.monotonic() - started) * 1000, 1)
        scan.read_files += pre.read_files
        scan.read_bytes += pre.read_bytes
        if self.objects.staged:  # versions read first and overwritten before the freeze
            self.objects.keep_only({c for p, m in scan.entries.items()
                                    if self._state.get(p) is not m for c in m.chunks})
        return scan

    def _commit_record(self, head: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        data = encode(record)
        new_head = dict(head, epoch=record["id"], hash=digest(data), opened=record["end"])
        try:
            write_durable(self._record_path(record["id"]), data)
            write_durable(self.dir / HEAD, encode(new_head))  # the commit point
        except OSError as exc:
            if (self.head() or {}).get("hash") != new_head["hash"]:  # not renamed: not done
                raise failed(exc, f"recording epoch {record['id']} of {self.volume}") from exc
        self._tag = (new_head["epoch"], new_head["hash"])
        return new_head

    # -- reading ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        with self.locked(exclusive=False) as present:
            head = self.head() if present else None
            if head is None:
                return {"journaled": False, "epoch": 0, "first": 1, "open_since": None}
            baseline = self.baseline(head)[0]
            return {"journaled": True, "epoch": head["epoch"], "first": head["first"],
                    "open_since": head["opened"],
                    "baseline": {"epoch": baseline["epoch"], "created": baseline["created"],
                                 "entries": len(baseline["entries"])}}

    def log(self) -> list[dict[str, Any]]:
        """Closed epochs still in the log, oldest first (committed ones are in the baseline)."""
        with self.locked(exclusive=False) as present:
            head = self.head() if present else None
            if head is None:
                return []
            return [_summary(r) for r in self.records(head["first"], head["epoch"])]

    def diff(self, epoch: int, detail: bool = False) -> dict[str, Any]:
        """The epoch's record; with `detail`, each database's change spelled out in rows
        (table, op, key, before, after) and each text file's in lines (a unified diff)."""
        with self.locked(exclusive=False) as present:
            head = self.head() if present else None
            self._check_epoch(head, epoch)
            record = self.record(epoch)[0]
            if detail:
                self.objects.refresh()
                for change in record["changes"]:
                    self._detail(change)
            return record

    def _detail(self, change: dict[str, Any]) -> None:
        from corral.recover.journal import merge

        if "rows" in change:
            from corral.recover.journal import sqlite

            try:
                change["rows"] |= sqlite.rows_of(self.objects, change["rows"])
            except Exception as exc:  # noqa: BLE001 - a damaged changeset: say so, go on
                change["rows"]["unreadable"] = str(exc)
            return
        before, after = meta_from_json(change["before"]), meta_from_json(change["after"])
        sizes = [m.size or 0 for m in (before, after) if m is not None and m.kind == "file"]
        if sizes and max(sizes) <= merge.DIFF_BYTES and "content" in change.get(
                "details", ["content"]):
            read = lambda m: b"".join(self.objects.read(c) for c in m.chunks) \
                if m is not None and m.kind == "file" else b""  # noqa: E731
            lines = merge.line_diff(read(before), read(after))
            if lines is not None:
                change["lines"] = lines

    def _check_epoch(self, head: dict[str, Any] | None, epoch: int) -> dict[str, Any]:
        if head is None or epoch > head["epoch"] or epoch < 1:
            last = head["epoch"] if head else 0
            raise UsageError(f"{self.volume}: no epoch {epoch} (latest: {last})")
        if epoch < head["first"]:
            raise UsageError(f"{self.volume}: epoch {epoch} was committed into the baseline; "
                             f"the log starts at {head['first']}")
        return head

    # -- excise -----------------------------------------------------------------------------

    def excise(self, from_: int, to: int | None = None, prefer: str | None = None, *,
               stopped: bool = False, note: str | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        """Take epochs from_..to (default: through the latest) out of the volume and keep
        what came after them. Each path changed inside the stretch goes back to its value
        before it; a file changed again after the stretch is merged (journal.merge: byte
        ranges for an append-only file, lines for text), and what cannot be merged is a
        conflict: kept at its later value (or per `prefer`), listed, and marked for review.
        Applied to the volume and recorded as a new epoch (reason "excise"), so it can itself
        be excised. `stopped` says no process writes the volume (stopped, or frozen by
        journal.online). `dry_run` closes the open epoch (as a mark would, so the plan covers
        everything written so far) and returns the plan without changing the volume."""
        if not stopped and not dry_run:
            raise RuntimeFailure("excise rewrites the volume: stop the service first")
        with self.locked():
            return self.excise_locked(from_, to, prefer, note=note, dry_run=dry_run)

    def excise_locked(self, from_: int, to: int | None = None, prefer: str | None = None, *,
                      note: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """excise(), for a caller that holds the lock and has quiesced the writers."""
        if prefer not in (None, "before", "after"):
            raise UsageError(f"{prefer!r}: prefer is before or after")
        self.recover_locked()
        self._check_epoch(self.head(), from_)
        if to is not None:
            self._check_epoch(self.head(), to)
            if to < from_:
                raise UsageError(f"--to {to} comes before --from {from_}")
        # What changed since the last close belongs in the log before anything is undone.
        closed = self._close("mark", "closed before an excision", [], None, None, True)
        head = self.head()
        assert head is not None
        self._load(head)
        to = head["epoch"] if to is None else to
        with self._staging(f"excising from {self.volume}"):
            plan = plan_excision(self.records(from_, head["epoch"]), to, self._state, prefer,
                                 self._merger(prefer), self._row_merger(prefer))
            final = plan.final(self._state)
            changes = _changes(self._state, final, {"process": "corral", "pid": os.getpid()})
            if dry_run:
                self.objects.discard()
            else:
                self.objects.flush()  # merged contents, before the intent that names them
                changes = self._rows(self._state, final, changes)  # undoable at row level too
                self.objects.flush()
        record = {"id": head["epoch"] + 1, "start": head["opened"],
                  "end": iso(self.clock()), "reason": "excise",
                  "note": note or f"excised epochs {from_}..{to}", "incidents": [],
                  "prev": head["hash"],
                  "excised": {"from": from_, "to": to, "prefer": prefer},
                  "conflicts": plan.conflicts, "forced": plan.forced, "merged": plan.merged,
                  "changes": changes}
        result = {"epoch": None if dry_run else record["id"], "dry_run": dry_run,
                  "closed_before": closed, "from": from_, "to": to, "prefer": prefer,
                  "changes": [_change_line(c) for c in record["changes"]],
                  "merged": plan.merged, "conflicts": plan.conflicts, "forced": plan.forced,
                  "not_restored": []}
        if dry_run:
            return result
        intent = {"base": {"epoch": head["epoch"], "hash": head["hash"]}, "record": record}
        try:
            write_durable(self.dir / INTENT, encode(intent))
        except OSError as exc:
            raise failed(exc, f"excising from {self.volume}") from exc
        try:
            not_restored = self._finish_excise(head, intent)
        except OSError as exc:  # the volume may be half rewritten: say how it ends
            raise RuntimeFailure(
                f"excising from {self.volume}: {exc}; the excision is recorded as under way "
                "and is finished by `corral state check` or the next close (the service "
                "must stay stopped until then)") from exc
        result["not_restored"] = [show(os.fsencode(p)) for p in not_restored]
        return result

    def _merger(self, prefer: str | None) -> Any:
        """journal.merge over the object store: reads the three versions, stages the result."""
        from corral.recover.journal import merge

        def merged(path: str, before: Meta, end: Meta, current: Meta) -> Any:
            if max(m.size or 0 for m in (before, end, current)) > merge.MAX_BYTES:
                return None
            read = lambda m: b"".join(self.objects.read(c) for c in m.chunks)  # noqa: E731
            done = merge.revert(read(before), read(end), read(current), prefer)
            if done is None:
                return None
            size, digest_, chunks = merge.store(self.objects, done.content)
            return (current._replace(size=size, digest=digest_, chunks=chunks, mtime_ns=None),
                    done.info(), done.hunks)

        return merged

    def _row_merger(self, prefer: str | None) -> Any:
        """journal.sqlite's excision of rows, imported only for a stretch with databases."""

        def merged(*args: Any) -> Any:
            from corral.recover.journal import sqlite

            return sqlite.merger(self, self._state, prefer)(*args)

        return merged if self.row_level else None

    def _finish_excise(self, head: dict[str, Any], intent: dict[str, Any]) -> list[str]:
        """Apply the planned excision to the volume and commit it; run again (from
        excise.json) after a crash until it has been done once completely."""
        record = intent["record"]
        target = {path_from_json(c): meta_from_json(c["after"]) for c in record["changes"]}
        not_restored = restore(self.write_root or self.volume, self.objects, target)
        in_memory = self._tag == (head["epoch"], head["hash"])
        self._commit_record(head, record)
        unlink_durable([self.dir / INTENT])
        if in_memory:  # keep the state at head; the rewritten files are read again next time
            for path, meta in target.items():
                self._observed.pop(path, None)
                if meta is None:
                    self._state.pop(path, None)
                else:
                    self._state[path] = meta
            self._save_cache()
        else:
            self._tag = None
        return not_restored

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, Any]:
        """Remove what interrupted writes left and finish an interrupted excision. Call it
        before the service starts (an excision rewrites the stopped service's volume)."""
        with self.locked():
            return self.recover_locked()

    def recover_locked(self) -> dict[str, Any]:
        """recover(), for a caller that holds the lock."""
        done: dict[str, Any] = {"removed": 0, "excise_finished": None}
        head = self.head()
        garbage = [p for p in self.dir.glob(".*.tmp")] + list(self.dir.glob("epochs/.*.tmp"))
        if head is None:  # never committed: all but objects is a leftover of an interrupted init
            garbage += list(self.dir.glob("epochs/*.json")) + list(self.dir.glob("baseline-*"))
            garbage += [self.dir / CACHE, self.dir / INTENT]
        else:
            for path in self.dir.glob("epochs/*.json"):
                stem = path.name.split(".")[0]
                if not stem.isdigit() or not head["first"] <= int(stem) <= head["epoch"]:
                    garbage.append(path)
            garbage += [p for p in self.dir.glob("baseline-*.json")
                        if p.name != head["baseline"]["file"]]
        garbage = [p for p in garbage if p.exists()]
        unlink_durable(garbage)
        done["removed"] = len(garbage)
        if (self.dir / "sqlite").is_dir():  # a snapshot or an excision's copy half made
            from corral.recover.journal import sqlite

            done["removed"] += sqlite.clean(self.dir / "sqlite")
        self.objects.clear_staging()
        orphans = self.objects.orphans()  # packs whose flush was interrupted
        unlink_durable(orphans)
        done["removed"] += len(orphans)
        self.objects.refresh()
        intent_path = self.dir / INTENT
        if head is not None and intent_path.exists():
            try:
                intent = json.loads(intent_path.read_bytes())
            except ValueError:  # torn: it was never durable, so the volume was not touched
                intent = None
            if intent and intent["base"] == {"epoch": head["epoch"], "hash": head["hash"]}:
                self._finish_excise(head, intent)
                done["excise_finished"] = intent["record"]["id"]
            else:
                unlink_durable([intent_path])
        return done

    # -- commit and check -------------------------------------------------------------------

    def sweep(self) -> tuple[int, int]:
        """Drop the chunks neither the baseline nor a live record names. Under the lock."""
        head = self.head()
        return self.objects.sweep(self.referenced(head)) if head else (0, 0)

    def referenced(self, head: dict[str, Any]) -> set[str]:
        out = {chunk for meta in self.all_metas(head) for chunk in meta.chunks}
        for record in self.records(head["first"], head["epoch"]):
            for change in record["changes"]:
                if "rows" in change:  # the changeset of a database (journal.sqlite)
                    out.update(chunks_of(change["rows"]))
        return out

    def all_metas(self, head: dict[str, Any]) -> Iterator[Meta]:
        """Every state the journal can still restore: the baseline and both sides of each
        live change."""
        for row in self.baseline(head)[0]["entries"].values():
            yield meta_from_row(row)
        for record in self.records(head["first"], head["epoch"]):
            for change in record["changes"]:
                for side in ("before", "after"):
                    if (meta := meta_from_json(change[side])) is not None:
                        yield meta

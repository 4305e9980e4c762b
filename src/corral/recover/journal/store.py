"""The journal's storage: how paths and file metadata are written down, durable writes, the
state cache. journal.py builds the redo log on top of it; journal_objects.py stores contents;
journal_fs.py reads and restores the (hostile) volume.

Crash consistency rests on one rule: a file that others rely on is made durable before anything
that refers to it is written. Objects before the epoch record naming them, the record before
head.json, and head.json replaced atomically (tmp + fsync + rename + fsync of the directory).
Whatever a crash leaves behind that head.json does not reach is garbage, removed later.
"""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path
from typing import Any, NamedTuple

from corral.core import fsio
from corral.core.errors import RuntimeFailure
from corral.core.text import show
from corral.kernel import syscalls

CHUNK = 256 << 10  # files are stored in chunks of this size: a page written in place in a
#                    big file (a database) costs one chunk, not a copy of the whole file
GENESIS = "0" * 64  # the chain's anchor before the first epoch

# -- test hook ------------------------------------------------------------------------------
# Crash tests must stop the library exactly between two durable steps. With
# CORRAL_JOURNAL_CRASH_AFTER=N in the environment (or `crash_after` set in a forked child) the
# process SIGKILLs itself at its Nth durability point. Unset (0), a point costs one comparison.
CRASH_ENV = "CORRAL_JOURNAL_CRASH_AFTER"
crash_after = int(os.environ.get(CRASH_ENV) or 0)
_points = 0


def point() -> None:
    """Called after every write, fsync, rename and unlink that crash consistency depends on."""
    global _points
    if crash_after:
        _points += 1
        if _points >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)


# -- paths ----------------------------------------------------------------------------------
# In memory a path is text as os.fsdecode gives it (surrogateescape: exact for any bytes),
# relative to the volume, "/"-separated. Files corral writes must be valid UTF-8 JSON, so:

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def path_json(path: str, key: str = "path") -> dict[str, str]:
    """For records people read: show()'s printable one-line text, plus the exact bytes in
    base64 under "raw" whenever that text is not the name itself (invalid UTF-8, control
    characters, backslashes)."""
    raw = os.fsencode(path)
    out = {key: show(raw)}
    if out[key] != path:
        out[key + "_raw" if key != "path" else "raw"] = _b64(raw)
    return out


def path_from_json(doc: dict[str, Any], key: str = "path") -> str:
    raw = doc.get(key + "_raw" if key != "path" else "raw")
    return os.fsdecode(base64.b64decode(raw)) if raw is not None else doc[key]


def index_key(path: str) -> str:
    """For the big index files: the name itself when it is valid UTF-8, else NUL + base64 (a
    NUL cannot occur in a file name, so the two forms never collide)."""
    try:
        path.encode()
        return path
    except UnicodeEncodeError:
        return "\0" + _b64(os.fsencode(path))


def from_index_key(key: str) -> str:
    return os.fsdecode(base64.b64decode(key[1:])) if key.startswith("\0") else key


# -- metadata -------------------------------------------------------------------------------

class Meta(NamedTuple):
    """One entry of a volume as the journal knows it. A tuple, not a dict: a 100,000-file
    volume's index lives in memory."""

    kind: str  # file, dir, symlink, fifo, socket, chardev, blockdev
    mode: int
    uid: int
    gid: int
    size: int | None = None  # files only
    digest: str | None = None  # blake3 of the whole content
    chunks: tuple[str, ...] = ()  # blake3 of each CHUNK-sized piece: the objects to restore it
    target: str | None = None  # symlink text, never followed
    mtime_ns: int | None = None  # informative (restored by excise), not part of equality


def same(a: Meta | None, b: Meta | None) -> bool:
    """Equal for the journal: type, permissions, owner and content; mtime alone is no change
    (anyone can set it, and a rewrite with the same bytes is not worth an entry)."""
    if a is None or b is None:
        return a is b
    return a[:8] == b[:8]


def differences(a: Meta, b: Meta) -> list[str]:
    if a.kind != b.kind:
        return ["type"]
    out = []
    if (a.digest, a.target) != (b.digest, b.target):
        out.append("content")
    if a.mode != b.mode:
        out.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        out.append("owner")
    return out


def meta_json(m: Meta | None) -> dict[str, Any] | None:
    if m is None:
        return None
    out: dict[str, Any] = {"kind": m.kind, "uid": m.uid, "gid": m.gid}
    if m.kind != "symlink":
        out["mode"] = f"{m.mode:04o}"
    if m.kind == "file":
        out.update(size=m.size, blake3=m.digest)
        if len(m.chunks) > 1:
            out["chunks"] = list(m.chunks)
    if m.target is not None:
        out.update(path_json(m.target, "target"))
    if m.mtime_ns is not None:
        out["mtime_ns"] = m.mtime_ns
    return out


def implied_chunks(size: int | None, digest: str | None) -> tuple[str, ...]:
    """A file of at most one chunk is its own object: its chunk list need not be written."""
    if not size:
        return ()
    return (digest,) if size <= CHUNK and digest else ()


def meta_from_json(doc: dict[str, Any] | None) -> Meta | None:
    if doc is None:
        return None
    size, digest = doc.get("size"), doc.get("blake3")
    chunks = tuple(doc["chunks"]) if "chunks" in doc else implied_chunks(size, digest)
    target = path_from_json(doc, "target") if "target" in doc else None
    return Meta(doc["kind"], int(doc.get("mode", "0777"), 8), doc["uid"], doc["gid"], size,
                digest, chunks, target, doc.get("mtime_ns"))


def chunks_of(rows: dict[str, Any]) -> tuple[str, ...]:
    """The objects holding the changeset of a database's `rows` entry (journal.sqlite)."""
    ref = rows["changeset"]
    return tuple(ref["chunks"]) if "chunks" in ref else implied_chunks(ref["size"], ref["blake3"])


def meta_row(m: Meta) -> list[Any]:
    """The compact form of the index files. A chunk list is implied unless there are
    several chunks (one chunk is the whole file: its hash is the file's)."""
    return [m.kind, m.mode, m.uid, m.gid, m.size, m.digest,
            m.chunks if len(m.chunks) > 1 else None,
            index_key(m.target) if m.target is not None else None, m.mtime_ns]


def meta_from_row(row: list[Any]) -> Meta:
    kind, mode, uid, gid, size, digest, chunks, target, mtime = row[:9]
    return Meta(kind, mode, uid, gid, size, digest,
                tuple(chunks) if chunks is not None else implied_chunks(size, digest),
                from_index_key(target) if target is not None else None, mtime)


# -- encoding and durability ----------------------------------------------------------------

def encode(doc: Any) -> bytes:
    # Compact: a record of 10,000 changes stays a few MB. Strict UTF-8: a surrogate that slipped
    # past path_json would fail here instead of writing a file other tools cannot read.
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def digest(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


def fsync_dir(path: Path) -> None:
    fsio.fsync_dir(path, step=point)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Everything written to the file system holding `path` reaches the disk: one call instead
    of thousands of fsyncs when an epoch stages thousands of objects."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syscalls.syncfs(fd, f"syncfs {path}")
    finally:
        os.close(fd)
    point()


# The package's durable writer (core.fsio), with this journal's crash points between steps.

def write_durable(path: Path, data: bytes) -> None:
    """Replace `path` atomically: readers (and a crash) see the old file or the new one."""
    fsio.write_durable(path, data, mode=0o600, step=point)


def unlink_durable(paths: list[Path]) -> None:
    fsio.unlink_durable(paths, step=point)


# -- the state cache ------------------------------------------------------------------------
# One header line {epoch, hash, blake3 of the body}, then the body: per path its Meta and its
# last observation (inode, size, mtime_ns, ctime_ns) or None. A convenience, not part of the
# commit: not fsynced, checksummed, and ignored when anything is wrong with it. The body is
# marshal, not JSON: 100,000 entries take 0.05 s instead of a second, and it keeps any name as
# is. marshal trusts its input; the checksum is verified first, and the file is root's alone,
# in a directory only root can write (whoever can forge it can edit the journal anyway).

def read_cache(path: Path) -> tuple[Any, dict[str, Meta], dict[str, Any]]:
    """(tag, path -> Meta, path -> observation) or (None, {}, {})."""
    import marshal

    try:
        with open(path, "rb") as handle:
            header = json.loads(handle.readline())
            body = handle.read()
        if digest(body) != header["blake3"]:
            return None, {}, {}
        known, observed = {}, {}
        for name, row, obs in marshal.loads(body):
            known[name] = Meta(*row)
            if obs is not None:
                observed[name] = obs
        return (header["epoch"], header["hash"]), known, observed
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None, {}, {}


def write_cache(path: Path, tag: tuple[int, str], state: dict[str, Meta],
                known: dict[str, Meta], observed: dict[str, Any]) -> None:
    import marshal

    rows = []
    for name, m in state.items():
        obs = observed.get(name)
        if obs is not None and known.get(name) is not m and not same(known.get(name), m):
            obs = None  # observed as something else than the state says: read it again
        rows.append((name, tuple(m), obs))
    body = marshal.dumps(rows)
    header = encode({"epoch": tag[0], "hash": tag[1], "blake3": digest(body)})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fsio.write_all(fd, header + body)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:  # disk full: the next open replays the log instead
        tmp.unlink(missing_ok=True)


HEAD = "head.json"  # a journal's commit point: the latest record's id and hash


def failed(exc: OSError, what: str) -> RuntimeFailure:
    """A write that failed (a full disk, most likely) before the commit point: nothing was
    lost, the changes are still in the volume for the next close."""
    where = f" ({exc.filename})" if exc.filename else ""
    return RuntimeFailure(f"{what}: {exc.strerror or exc}{where}; the journal is unchanged")

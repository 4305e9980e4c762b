"""Archive a delta before it is thrown away: a zstd-compressed tar plus a metadata file.

The archive keeps symlinks as symlinks (their text, never their target), whiteouts as 0/0
character devices, and copies file contents through descriptors opened with O_NOFOLLOW below the
delta's own directory descriptor, so no host file can ever end up in it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

from corral.core import tree
from corral.core.fsio import keep_reserve
from corral.core.text import show
from corral.recover import delta

ARCHIVE = "delta.tar.zst"
META = "meta.json"
DEFAULT_KEEP = 10


PREFIX = 1 << 20  # bytes of data kept of a sparse file, or of one past the budget


def _add_tree(tar: tarfile.TarFile, dir_fd: int, truncated: list[bytes],
              budget: tree.Budget, cut: list[bytes]) -> int:
    """Every entry of the upper layer, as deep as the walk goes: the directories too deep to
    enter are listed in `truncated` (the meta says so) rather than failing the archive, which
    is the revert's only record of what the service did. File data is read within `budget`:
    a file with holes, or one past the budget, is kept as its extents (PAX header
    corral.extents, its size in corral.size) and at most PREFIX bytes of their data, listed
    in `cut`; no hole is ever read or written as zeros."""
    count = 0
    for entry in tree.walk(dir_fd, on_too_deep=lambda e: truncated.append(e.path)):
        name, st = entry.name, entry.st
        info = tarfile.TarInfo(os.fsdecode(entry.path[1:]))
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)
        fileobj = None
        if stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=entry.dir_fd)
            except FileNotFoundError:
                continue  # gone since listed (see tree.walk)
            fileobj = _content(fd, info, entry.path, budget, cut)
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.fsdecode(os.readlink(name, dir_fd=entry.dir_fd))
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISCHR(st.st_mode):  # whiteouts (0/0) and anything else the service made
            info.type = tarfile.CHRTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            continue  # sockets and block devices carry no content worth keeping
        try:
            tar.addfile(info, fileobj)
        finally:
            if fileobj is not None:
                fileobj.close()
        count += 1
    return count


def _content(fd: int, info: tarfile.TarInfo, path: bytes, budget: tree.Budget,
             cut: list[bytes]) -> BinaryIO:
    size = os.fstat(fd).st_size
    try:
        spans = tree.extents(fd, size)
    except OSError:
        spans = []
    if (spans == [(0, size)] or not size) and budget.take(path, size):
        info.size = size
        return os.fdopen(fd, "rb")
    try:
        keep = bytearray()
        limit = min(PREFIX, max(0, budget.left))
        for start, end in spans:
            if len(keep) >= limit:
                break
            keep += os.pread(fd, min(end - start, limit - len(keep)), start)
        budget.take(path, len(keep))
    finally:
        os.close(fd)
    info.size = len(keep)
    info.pax_headers = {"corral.size": str(size), "corral.data": str(sum(e - b for b, e in spans)),
                        "corral.extents": json.dumps(spans[:64])}
    cut.append(path)
    return io.BytesIO(bytes(keep))


RESERVE_CHECK = 4 << 20  # bytes written between two checks of corral's reserve


class _Reserved:
    """The archive's file, which keeps corral's reserve on the state file system: a delta
    can be as large as its size allows, the state file system may have less left."""

    def __init__(self, raw: BinaryIO, where: Path):
        self.raw, self.where, self.pending = raw, where, 0

    def write(self, data: bytes) -> int:
        self.pending += len(data)
        if self.pending >= RESERVE_CHECK:
            keep_reserve(self.where, self.pending, "archiving the delta")
            self.pending = 0
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def archive_delta(upper_fd: int, base_fd: int, archives: str | Path, meta: dict[str, Any],
                  keep: int = DEFAULT_KEEP) -> Path:
    """Write archives/<time>-<reason>/{delta.tar.zst,meta.json}; returns the directory."""
    archives = Path(archives)
    import zstandard

    too_deep: list[bytes] = []
    hashed = tree.Budget(delta.READ_BUDGET)
    found = delta.changes(upper_fd, base_fd, truncated=too_deep, budget=hashed)
    read = tree.Budget(delta.READ_BUDGET)
    cut: list[bytes] = []
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    reason = "".join(c if c.isalnum() else "-" for c in str(meta.get("reason", "revert")))[:32]
    archives.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = archives / f"{stamp}-{reason}"
    work = archives / f".{stamp}-{reason}.tmp"
    keep_reserve(archives, 0, "archiving the delta")
    work.mkdir(mode=0o700)
    try:
        with open(work / ARCHIVE, "wb") as raw:
            out = cast(BinaryIO, _Reserved(raw, archives))  # only write and flush are used
            with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as zst:
                with tarfile.open(fileobj=zst, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    entries = _add_tree(tar, upper_fd, [], read, cut)
            raw.flush()
            os.fsync(raw.fileno())
        record = dict(meta, created_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                      + f".{int(now % 1 * 1e6):06d}Z", entries=entries,
                      changes=[c.to_json() for c in found])
        truncated: dict[str, Any] = {}
        if too_deep:  # the archive and the changes stop there; the revert removes it all
            truncated |= {"max_depth": tree.MAX_DEPTH,
                          "not_entered": [show(p) for p in too_deep[:50]]}
        if cut or hashed.skipped:  # bounded: sparse files and what the budget left unread
            truncated |= {"read_budget": delta.READ_BUDGET,
                          "files_cut": [show(p) for p in cut[:50]],
                          "not_hashed": [show(p) for p in hashed.skipped[:50]]}
        if truncated:
            record["truncated"] = truncated
        (work / META).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    prune(archives, keep)
    return final


def prune(archives: Path, keep: int) -> None:
    kept = sorted(p for p in archives.iterdir() if not p.name.startswith("."))
    for old in kept[:-keep] if keep > 0 else kept:
        shutil.rmtree(old, ignore_errors=True)


def list_archives(archives: str | Path) -> list[dict[str, Any]]:
    archives = Path(archives)
    out: list[dict[str, Any]] = []
    if not archives.is_dir():
        return out
    for path in sorted(p for p in archives.iterdir() if not p.name.startswith(".")):
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            continue
        out.append({"path": str(path / ARCHIVE), "created_at": meta.get("created_at"),
                    "reason": meta.get("reason"), "incident": meta.get("incident"),
                    "changes": len(meta.get("changes", [])),
                    "bytes": (path / ARCHIVE).stat().st_size})
    return out

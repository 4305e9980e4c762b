"""The journal's side of the volume: snapshot it (scan) and put paths back (restore).

The volume was written by the contained service, so it is hostile like a delta (see delta.py):
names may hold newlines or invalid UTF-8, symlinks may point at /etc/shadow. Every access is
relative to a directory file descriptor with O_NOFOLLOW; a symlink is recorded by its text and
never followed, on the way in or out; the walk stays on the volume's own file system.

Cost: a scan stats every entry (there is no cheaper way to know what changed without a kernel
change log), but it reads only files whose (inode, size, mtime, ctime) differ from the last
scan, and it stores only chunks that are not in the object store yet. ctime cannot be set from
user space, so a writer cannot hide a change by restoring the mtime.

Bounds: a file of holes costs its writer nothing (1 TiB of them is one block), so holes are
never read (core.tree.extents: a chunk wholly in a hole is the zero chunk, its hash known), and a
pass hashes at most SCAN_BUDGET bytes (data read and zeros hashed alike): a file past it keeps
its last journaled version, is listed in the epoch's `skipped`, and is tried again next pass.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from corral.core import tree
from corral.core.fsio import write_all
from corral.core.tree import KINDS
from corral.recover.journal.objects import Objects
from corral.recover.journal.store import CHUNK, Meta, digest, point, syncfs

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = tree.MAX_DEPTH  # deeper entries are not journaled (listed as skipped): a
#                            contained service must not crash the journal with depth
# A file whose ctime is this close to the scan's start is read again next time rather than
# trusted to its observation: timestamps come from a coarse clock, so a second write within the
# same tick as the one observed could leave (size, mtime, ctime) unchanged ("racy git"). Any
# write after the read gets a ctime past start - tick, so a margin above the longest tick
# (10 ms at HZ=100) suffices; 100 ms leaves room for clock slew.
RACY_NS = 100_000_000
EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"  # blake3(b"")
# Bytes one scan may hash: a few seconds of work on the journal's worker thread, so a close
# ends in bounded time whatever the service wrote (a legitimate file bigger than this is
# skipped, listed in the epoch, and not journaled: the volume's `size` should stay below it).
SCAN_BUDGET = 4 << 30
ZEROS = bytes(CHUNK)

Observation = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def _observe(st: os.stat_result) -> Observation:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Scan:
    """One walk of a volume. `known` and `last_observed` are what an earlier scan found: a file
    observed identically now has the same metadata and content and is not read again."""

    objects: Objects
    known: dict[str, Meta]
    last_observed: dict[str, Observation | None]
    entries: dict[str, Meta] = field(default_factory=dict)
    observed: dict[str, Observation | None] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # not journaled: other fs, too deep,
    #                                                  past the budget
    budget: tree.Budget = field(default_factory=lambda: tree.Budget(SCAN_BUDGET))
    defer_fresh: bool = False  # leave files written just now to a second, frozen scan
    frozen_ms: float = 0.0
    read_files: int = 0
    read_bytes: int = 0
    start_ns: int = 0
    dev: int = 0

    def run(self, root: str | os.PathLike[str]) -> Scan:
        self.start_ns = time.time_ns()
        fd = os.open(root, DIR_FLAGS)
        try:
            self.dev = os.fstat(fd).st_dev
            self._walk(fd)
        finally:
            os.close(fd)
        return self

    def _walk(self, fd: int) -> None:
        entries, observed, last, known = self.entries, self.observed, self.last_observed, \
            self.known  # locals: this loop runs once per file of the volume
        skipped = self.skipped
        too_deep = lambda e: skipped.append(os.fsdecode(e.path[1:]))  # noqa: E731
        for entry in tree.walk(fd, on_too_deep=too_deep):
            name, path, st = os.fsdecode(entry.name), os.fsdecode(entry.path[1:]), entry.st
            mode = st.st_mode
            if stat.S_ISREG(mode):
                obs = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if last.get(path) == obs:
                    # Same ctime: no write, chmod or chown since (each sets it): same Meta.
                    # The very object, so comparing with the state stops at `is`.
                    entries[path] = known[path]
                    observed[path] = obs
                elif not (self.defer_fresh and st.st_ctime_ns >= self.start_ns - RACY_NS):
                    self._read(entry.dir_fd, name, path, st)
                # (a fresh file would be read again when frozen anyway: its observation is
                # not trusted; reading it now would only store a version about to be replaced)
                continue
            if stat.S_ISDIR(mode):
                meta = Meta("dir", stat.S_IMODE(mode), st.st_uid, st.st_gid)
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=entry.dir_fd)
                except OSError:
                    continue
                meta = Meta("symlink", 0o777, st.st_uid, st.st_gid, target=target)
            else:
                meta = Meta(KINDS.get(stat.S_IFMT(mode), "other"), stat.S_IMODE(mode),
                            st.st_uid, st.st_gid)
            entries[path] = meta if known.get(path) != meta else known[path]
            if stat.S_ISDIR(mode) and st.st_dev != self.dev:
                skipped.append(path)  # another file system mounted in the volume
                entry.enter = False

    def _read(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> None:
        """Read a new or changed file once: hash it whole and by chunk, stage new chunks. Holes
        are not read; a file past the pass's budget is not read at all (see the module)."""
        import blake3

        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:
            return self._swapped(dir_fd, name, path)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return self._swapped(dir_fd, name, path)
            if not self.budget.take(os.fsencode(path), before.st_size):
                self.skipped.append(path)
                if path in self.known:  # its last journaled version stands until read
                    self.entries[path] = self.known[path]
                self.observed[path] = None
                return None
            spans = tree.extents(fd, before.st_size)
            # A file of one chunk is hashed once: the chunk's hash is the file's.
            chunks: list[str]
            whole, chunks, size, first = None, [], 0, b""
            for data in _chunks(fd, before.st_size, spans):
                if chunks:
                    if whole is None:
                        whole = blake3.blake3(first)
                    whole.update(data)
                else:
                    first = data
                chunks.append(_zero_hash() if data is ZEROS else blake3.blake3(data).hexdigest())
                self.objects.stage(chunks[-1], data)
                size += len(data)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        self.read_files += 1
        self.read_bytes += size
        digest = whole.hexdigest() if whole else chunks[0] if chunks else EMPTY
        self.entries[path] = Meta("file", stat.S_IMODE(after.st_mode), after.st_uid,
                                  after.st_gid, size, digest, tuple(chunks), None,
                                  after.st_mtime_ns)
        # Cache the observation only if the file held still while read and is not racy.
        steady = _observe(before) == _observe(after) and after.st_size == size
        fresh = after.st_ctime_ns >= self.start_ns - RACY_NS
        self.observed[path] = _observe(after) if steady and not fresh else None

    def _swapped(self, dir_fd: int, name: str, path: str) -> None:
        """The file became something else between listing and opening (possible only when
        the service is not frozen): record what is there now, never open it."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
        except OSError:
            return  # gone: recorded as deleted, which it is
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            self.entries[path] = Meta(KINDS.get(stat.S_IFMT(st.st_mode), "other"),
                                      0o777 if target is not None else stat.S_IMODE(st.st_mode),
                                      st.st_uid, st.st_gid, target=target)


_ZERO_HASH: list[str] = []


def _zero_hash() -> str:
    """blake3 of a whole chunk of zeros, computed once."""
    import blake3

    if not _ZERO_HASH:
        _ZERO_HASH.append(blake3.blake3(ZEROS).hexdigest())
    return _ZERO_HASH[0]


def _chunks(fd: int, size: int, spans: list[tuple[int, int]]) -> Iterator[bytes]:
    """The file's CHUNK-sized pieces up to `size` (or its end, if it shrank meanwhile): a piece
    wholly inside a hole is ZEROS, never read."""
    pos, span = 0, 0
    while pos < size:
        end = min(pos + CHUNK, size)
        while span < len(spans) and spans[span][1] <= pos:
            span += 1
        if end - pos == CHUNK and (span == len(spans) or spans[span][0] >= end):
            yield ZEROS
        else:
            data = _read_chunk(fd, pos, end - pos)
            if data:
                yield data
            if len(data) < end - pos:
                return  # shrunk while read: not steady, read again by the next scan
        pos = end


def _read_chunk(fd: int, offset: int, length: int) -> bytes:
    parts, left = [], length
    while left:
        data = os.pread(fd, left, offset)
        if not data:
            break
        parts.append(data)
        left -= len(data)
        offset += len(data)
    return b"".join(parts)


# -- restore --------------------------------------------------------------------------------

def _depth(path: str) -> int:
    return path.count("/")


def _open_parent(root_fd: int, path: str) -> tuple[int, str]:
    """The directory holding `path`, reached component by component without following any
    symlink (ELOOP/ENOTDIR if one is in the way)."""
    *dirs, name = path.split("/")
    fd = os.dup(root_fd)
    try:
        for part in dirs:
            sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _remove(dir_fd: int, name: str) -> None:
    """Remove an entry, a directory with everything under it (tree.remove: iterative, one
    descriptor at a time, however deep the service made it)."""
    tree.remove(dir_fd, name)
    point()


def _tmp_name(path: str) -> str:
    # Deterministic: a restore interrupted by a crash and run again reuses (replaces) it.
    return f".corral-restore-{digest(os.fsencode(path))[:16]}"


def restore(root: str | os.PathLike[str], objects: Objects,
            target: dict[str, Meta | None]) -> list[str]:
    """Make each path of `target` what it says (None: absent). Idempotent, so a restore cut
    short by a crash can simply run again. The caller ensures the service is stopped and that
    `target` describes a consistent tree together with the untouched paths. Returns the paths
    that could not be restored as recorded (sockets and devices: only their kernel can)."""
    root_fd = os.open(root, DIR_FLAGS)
    not_restored = []
    try:
        # Removals and type changes first, deepest first: a directory empties before it goes.
        for path in sorted(target, key=_depth, reverse=True):
            want = target[path]
            try:
                parent, name = _open_parent(root_fd, path)
            except (FileNotFoundError, NotADirectoryError, OSError):
                continue  # its parent is not a directory: nothing there to remove
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if want is None or KINDS.get(stat.S_IFMT(st.st_mode)) != want.kind:
                    _remove(parent, name)
            except FileNotFoundError:
                pass
            finally:
                os.close(parent)
        # Then creations and updates, shallowest first: a directory exists before its files.
        for path in sorted(target, key=_depth):
            want = target[path]
            if want is None:
                continue
            parent, name = _open_parent(root_fd, path)
            try:
                if not _put(parent, name, want, objects, _tmp_name(path)):
                    not_restored.append(path)
            finally:
                os.close(parent)
        syncfs(root)  # durable before the journal records the restore as done
    finally:
        os.close(root_fd)
    return not_restored


def _put(dir_fd: int, name: str, want: Meta, objects: Objects, tmp: str) -> bool:
    if want.kind == "dir":
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.fchown(fd, want.uid, want.gid)
            os.fchmod(fd, want.mode)
        finally:
            os.close(fd)
        point()
        return True
    try:
        os.unlink(tmp, dir_fd=dir_fd)  # left by an interrupted restore
    except FileNotFoundError:
        pass
    if want.kind == "file":
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        try:
            for chunk in want.chunks:
                write_all(fd, objects.read(chunk))
            os.fchown(fd, want.uid, want.gid)
            os.fchmod(fd, want.mode)  # after chown, which clears setuid/setgid bits
            if want.mtime_ns is not None:
                os.utime(fd, ns=(want.mtime_ns, want.mtime_ns))
        finally:
            os.close(fd)
    elif want.kind == "symlink":
        if want.target is None:
            raise ValueError(f"journal entry {name!r}: a symlink without its target")
        os.symlink(want.target, tmp, dir_fd=dir_fd)
        os.chown(tmp, want.uid, want.gid, dir_fd=dir_fd, follow_symlinks=False)
    elif want.kind == "fifo":
        os.mkfifo(tmp, want.mode, dir_fd=dir_fd)
        os.chown(tmp, want.uid, want.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.chmod(tmp, want.mode, dir_fd=dir_fd)  # ours, just made: mkfifo applied the umask
    else:
        return False
    point()
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    point()
    return True

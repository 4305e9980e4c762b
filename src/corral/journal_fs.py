"""The journal's side of the volume: snapshot it (scan) and put paths back (restore).

The volume was written by the contained service, so it is hostile like a delta (see delta.py):
names may hold newlines or invalid UTF-8, symlinks may point at /etc/shadow. Every access is
relative to a directory file descriptor with O_NOFOLLOW; a symlink is recorded by its text and
never followed, on the way in or out; the walk stays on the volume's own file system.

Cost: a scan stats every entry (there is no cheaper way to know what changed without a kernel
change log), but it reads only files whose (inode, size, mtime, ctime) differ from the last
scan, and it stores only chunks that are not in the object store yet. ctime cannot be set from
user space, so a writer cannot hide a change by restoring the mtime.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field

from .delta import KINDS
from .journal_store import CHUNK, Meta, Objects, point, syncfs

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 400  # deeper entries are not journaled (listed as skipped): Python's recursion
#                  limit is 1000, and a contained service must not crash the journal with depth
# A file whose ctime is this close to the scan's start is not trusted to the cache next time:
# timestamps come from a coarse clock, so a second write within the same tick could leave
# (size, mtime, ctime) unchanged ("racy git"). A second is far more than any tick.
RACY_NS = 1_000_000_000

Observation = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def _observe(st: os.stat_result) -> Observation:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Scan:
    """One walk of a volume. `seen` holds the last scan's observations: path -> (observation,
    meta); a file observed identically is not read again."""

    objects: Objects
    seen: dict[str, tuple[Observation | None, Meta]]
    entries: dict[str, Meta] = field(default_factory=dict)
    observed: dict[str, Observation | None] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # not journaled: other fs, too deep
    read_files: int = 0
    read_bytes: int = 0
    start_ns: int = 0
    dev: int = 0

    def run(self, root: str | os.PathLike[str]) -> Scan:
        self.start_ns = time.time_ns()
        fd = os.open(root, DIR_FLAGS)
        try:
            self.dev = os.fstat(fd).st_dev
            self._walk(fd, "", 0)
        finally:
            os.close(fd)
        return self

    def _walk(self, fd: int, prefix: str, depth: int) -> None:
        for entry in os.scandir(fd):  # an fd: fstatat(fd, name, AT_SYMLINK_NOFOLLOW) below
            name, path = entry.name, prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                self._file(fd, name, path, st)
            elif stat.S_ISDIR(mode):
                self.entries[path] = Meta("dir", stat.S_IMODE(mode), st.st_uid, st.st_gid)
                if st.st_dev != self.dev or depth >= MAX_DEPTH:
                    self.skipped.append(path)
                    continue
                try:
                    sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:  # swapped for something else meanwhile
                    continue
                try:
                    self._walk(sub, path + "/", depth + 1)
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError:
                    continue
                self.entries[path] = Meta("symlink", 0o777, st.st_uid, st.st_gid, target=target)
            else:
                self.entries[path] = Meta(KINDS.get(stat.S_IFMT(mode), "other"),
                                          stat.S_IMODE(mode), st.st_uid, st.st_gid)

    def _file(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> None:
        obs = _observe(st)
        last = self.seen.get(path)
        if last is not None and last[0] == obs:
            m = last[1]
            self.entries[path] = Meta("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                      m.size, m.digest, m.chunks, None, st.st_mtime_ns)
            self.observed[path] = obs
            return
        import blake3

        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:
            return  # gone or swapped for a symlink since the listing: the next scan sees it
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return
            whole, chunks, size = blake3.blake3(), [], 0
            while data := _read_chunk(fd):
                whole.update(data)
                name_of = blake3.blake3(data).hexdigest()
                chunks.append(name_of)
                self.objects.stage(name_of, data)
                size += len(data)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        self.read_files += 1
        self.read_bytes += size
        self.entries[path] = Meta("file", stat.S_IMODE(after.st_mode), after.st_uid,
                                  after.st_gid, size, whole.hexdigest(), tuple(chunks), None,
                                  after.st_mtime_ns)
        # Cache the observation only if the file held still while read and is not racy.
        steady = _observe(before) == _observe(after) and after.st_size == size
        fresh = after.st_ctime_ns >= self.start_ns - RACY_NS
        self.observed[path] = _observe(after) if steady and not fresh else None


def _read_chunk(fd: int) -> bytes:
    parts, left = [], CHUNK
    while left:
        data = os.read(fd, left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
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
    """Remove an entry, a directory with everything under it, never following a symlink."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            for entry in list(os.scandir(sub)):
                _remove(sub, entry.name)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    point()


def _tmp_name(path: str) -> str:
    from .journal_store import digest

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
                data = objects.read(chunk)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            os.fchown(fd, want.uid, want.gid)
            os.fchmod(fd, want.mode)  # after chown, which clears setuid/setgid bits
            if want.mtime_ns is not None:
                os.utime(fd, ns=(want.mtime_ns, want.mtime_ns))
        finally:
            os.close(fd)
    elif want.kind == "symlink":
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

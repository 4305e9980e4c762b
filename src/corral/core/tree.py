"""File access that never follows a symlink out of a tree corral does not trust.

Python has no openat2(2) binding, so RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS is done the portable
way: walk the path one component at a time with O_NOFOLLOW from a directory file descriptor.
Any symlink on the way is an error (ELOOP), and ".." is refused before anything is opened.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from corral.core.errors import RuntimeFailure
from corral.core.record import record

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any, BinaryIO

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _components(relpath: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PermissionError(f"{relpath!r}: '..' is not allowed")
    return parts


def open_beneath(root_fd: int, relpath: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open `relpath` below the directory `root_fd`, refusing every symlink on the way."""
    parts = _components(relpath)
    if not parts:
        return os.dup(root_fd)
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


@contextmanager
def opened(root_fd: int, relpath: str, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = open_beneath(root_fd, relpath, flags)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def directory(path: str) -> Iterator[int]:
    """A directory fd for a trusted path (one corral chose, not one read from a service)."""
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


# ------------------------------------------------------- reading a tree corral did not write

OPAQUE_XATTR = "trusted.overlay.opaque"
READ_CHUNK = 1 << 20
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket"}


class Budget:
    """Bytes a whole pass (a revert's archive, a commit, `corral delta`) may read from files a
    service wrote: the delta may hold a file of 8 EiB of holes that costs nothing to make and
    would take decades to read. Files past the budget are listed in `skipped`, not read."""

    def __init__(self, limit: int):
        self.left = limit
        self.skipped: list[bytes] = []

    def take(self, name: bytes, wanted: int) -> bool:
        if wanted > self.left:
            self.skipped.append(name)
            return False
        self.left -= wanted
        return True


def extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, end) spans of a file that hold data (SEEK_DATA/SEEK_HOLE): holes are
    never read. A file system without them reports one span, the whole file."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    finally:
        os.lseek(fd, 0, os.SEEK_SET)  # a reader after us starts at the start
    return out


def hash_and_magic(dir_fd: int, name: bytes, sink: BinaryIO | None = None,
                   budget: Budget | None = None, path: bytes = b""
                   ) -> tuple[str | None, bool]:
    """blake3 and "is it ELF" of a regular file; `sink`, when given, receives the very bytes
    hashed (commit copies what it checked, not a second read that may differ), written at
    their offsets so that holes stay holes. Only data is read; a hole is hashed as the zeros it
    reads as, so the hash is the content's whatever the allocation (mksquashfs, cp --sparse and
    a copy-up all make holes of zero blocks: a dense file and its sparse copy must agree). The
    `budget` counts the whole size, holes included (they are hashed); past it, no hash (None):
    reported as a change whose content is not known, `path` (the file's name in the tree)
    listed in budget.skipped."""
    import blake3

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None, False  # removed or swapped for a symlink meanwhile: reported without hash
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, False
        spans = extents(fd, st.st_size)
        dense = spans == [(0, st.st_size)] or not st.st_size
        first = os.pread(fd, 4, 0) if spans and spans[0][0] == 0 else b""
        if budget is not None and not budget.take(path or name, st.st_size):
            return None, first == b"\x7fELF"
        hasher = blake3.blake3()
        pos = 0
        for start, end in spans:
            _hash_zeros(hasher, start - pos)  # the hole before this extent
            if sink is not None and not dense:
                sink.seek(start)
            pos = start
            while pos < end and (chunk := os.pread(fd, min(READ_CHUNK, end - pos), pos)):
                hasher.update(chunk)
                if sink is not None:
                    sink.write(chunk)
                pos += len(chunk)
        _hash_zeros(hasher, st.st_size - pos)  # the tail hole
        if sink is not None and not dense:
            sink.truncate(st.st_size)  # the tail hole, and the size
        return hasher.hexdigest(), first == b"\x7fELF"
    finally:
        os.close(fd)


_ZEROS = bytes(READ_CHUNK)


def _hash_zeros(hasher: Any, count: int) -> None:
    while count > 0:
        hasher.update(_ZEROS[:min(count, READ_CHUNK)])
        count -= READ_CHUNK


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


# ---------------------------------------------------------------- the one walker of hostile trees
#
# Every tree corral did not write (a delta's upper layer, a volume, a base someone may have
# touched, the host for `audit`) is walked by `walk` and emptied by `remove`. The service decides
# the shape of its tree, so the walk must not depend on it being reasonable:
# - iterative: a frame per directory level on a list, never Python's stack (1,200 nested
#   directories made every recursive walker raise RecursionError);
# - depth-bounded: directories up to MAX_DEPTH levels below the root are entered; one deeper
#   is TooDeep, raised unless the caller asked to have it reported (on_too_deep);
# - descriptor-bounded: at most FD_WINDOW directory descriptors per tree stay open (the levels
#   nearest the current one); a level whose descriptor was closed is opened again, name by
#   name from the nearest open ancestor, and must be the same directory (st_dev, st_ino);
# - fd-relative and O_NOFOLLOW: a symlink is an entry, never followed;
# - complete or loud: an error raises WalkError (or goes to the caller's on_error, which then
#   owns reporting it), never a silently missing subtree. A walk that cannot see everything must
#   not be taken for one that did (a commit's refusal gate was bypassed that way).
#
# A vanished entry is the one error that is not: the walk reports each directory as it was when
# listed, minus what was removed, renamed or swapped for something else before it was reached
# (ENOENT, or a directory that became a non-directory, a symlink or another directory). That is
# a tree the walk could have seen a moment later, so nothing is hidden that a later walk would
# not show; a caller that needs a still tree (commit, revert) walks a stopped service or checks
# and copies in the same walk.

MAX_DEPTH = 400  # levels of directories entered; beyond: TooDeep. Generous for real trees.
FD_WINDOW = 16  # directory descriptors a walk keeps open per tree (upper and base: twice)
_RACES = {2, 20, 40}  # ENOENT, ENOTDIR, ELOOP: the entry went or changed since it was listed


class WalkError(RuntimeFailure):
    """A tree could not be walked whole; `path` is where (below the walk's root)."""

    def __init__(self, path: bytes, why: str):
        from corral.core.text import show

        self.path, self.why = path, why
        super().__init__(f"{show(path or b'/')}: {why}")


class TooDeep(WalkError):
    def __init__(self, path: bytes):
        super().__init__(path, f"directories nested deeper than {MAX_DEPTH} levels; "
                               "not walked")


@record(eq=False, slots=True)
class Entry:
    """One entry of a walk. The descriptors belong to the walk: valid until the next one."""

    path: bytes  # below the walk's root, b"/a/b" (the prefix prepended)
    name: bytes
    st: os.stat_result  # lstat
    dir_fd: int  # the directory holding it: open, hash, readlink relative to this
    depth: int  # 1 for the root's children
    base_st: os.stat_result | None = None  # the same path in the base tree, if there is one
    base_fd: int | None = None  # the base directory holding that
    opaque: bool = False  # a directory hiding the base's one (overlayfs' opaque xattr)
    enter: bool = True  # the caller clears it to keep the walk out of this directory

    # One per entry of every walk: written out, ~7x faster than record's generic __init__.
    def __init__(self, path: bytes, name: bytes, st: os.stat_result, dir_fd: int, depth: int,
                 base_st: os.stat_result | None = None, base_fd: int | None = None,
                 opaque: bool = False, enter: bool = True) -> None:
        self.path, self.name, self.st, self.dir_fd, self.depth = path, name, st, dir_fd, depth
        self.base_st, self.base_fd, self.opaque, self.enter = base_st, base_fd, opaque, enter


@record(eq=False, slots=True)
class _Frame:
    path: bytes
    name: bytes  # in the parent frame, to open this directory again
    depth: int
    names: list[bytes]  # still to visit, last first
    fds: list[int | None]  # [tree, base]: open, or None (closed, or no such base directory)
    ids: list[tuple[int, int] | None]  # [tree, base]: (st_dev, st_ino), None: no such dir

    def __init__(self, path: bytes, name: bytes, depth: int, names: list[bytes],
                 fds: list[int | None], ids: list[tuple[int, int] | None]) -> None:
        self.path, self.name, self.depth, self.names, self.fds, self.ids = \
            path, name, depth, names, fds, ids


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _listing(fd: int) -> list[bytes]:
    return sorted((os.fsencode(n) for n in os.listdir(fd)), reverse=True)


def walk(root_fd: int, *, base_fd: int | None = None, prefix: bytes = b"",
         depth: int = 0, on_too_deep: Callable[[Entry], None] | None = None,
         on_error: Callable[[bytes, OSError], None] | None = None) -> Iterator[Entry]:
    """Every entry below the directory `root_fd`, parents before children, names sorted.

    With `base_fd`, the walk goes through a second tree in parallel (an overlay's lower layer):
    each entry carries the same path's lstat there, except below a directory the entry hides
    (opaque, or not a directory in the base). `depth` and `prefix` place a walk of a subtree.
    `on_error(path, exc)` takes errors instead of raising (the subtree is then not walked);
    `on_too_deep(entry)` takes directories too deep to enter instead of raising TooDeep.
    The caller's own descriptors are never closed."""
    base_id = _ident(os.fstat(base_fd)) if base_fd is not None else None
    root = _Frame(prefix.rstrip(b"/"), b"", depth, [], [root_fd, base_fd],
                  [_ident(os.fstat(root_fd)), base_id])
    frames = [root]
    try:
        root.names = _listing(root_fd)
    except OSError as exc:
        _failed(on_error, root.path, exc)
        return
    try:
        while frames:
            top = frames[-1]
            if not top.names:
                _close(frames.pop(), root)
                continue
            name = top.names.pop()
            path = top.path + b"/" + name
            try:
                fd = _fd(frames, 0)
                if fd is None:  # the directory itself moved away meanwhile
                    top.names.clear()
                    continue
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                base_dir = _fd(frames, 1) if top.ids[1] is not None else None
                base_st = _lstat(base_dir, name)
            except OSError as exc:
                if exc.errno not in _RACES:
                    _failed(on_error, path, exc)
                continue
            entry = Entry(path, name, st, fd, top.depth + 1, base_st, base_dir)
            if not stat.S_ISDIR(st.st_mode):
                yield entry
                continue
            if entry.depth > MAX_DEPTH:
                yield entry
                if entry.enter:
                    if on_too_deep is None:
                        raise TooDeep(path)
                    on_too_deep(entry)
                continue
            try:
                frame = _open_frame(entry, top)
            except OSError as exc:
                if exc.errno not in _RACES:
                    _failed(on_error, path, exc)
                continue
            if frame is None:
                continue  # swapped for another directory since the lstat: as if vanished
            try:
                yield entry
                if entry.enter:
                    frame.names = _listing(frame.fds[0])  # type: ignore[arg-type]
            except OSError as exc:
                _close(frame, root)
                _failed(on_error, path, exc)
                continue
            except BaseException:
                _close(frame, root)
                raise
            if not entry.enter:
                _close(frame, root)
                continue
            frames.append(frame)
            _trim(frames)
    finally:
        for frame in frames:
            _close(frame, root)


def _failed(on_error: Callable[[bytes, OSError], None] | None, path: bytes,
            exc: OSError) -> None:
    if on_error is None:
        raise WalkError(path, exc.strerror or str(exc)) from exc
    on_error(path, exc)


def _lstat(dir_fd: int | None, name: bytes) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_frame(entry: Entry, parent: _Frame) -> _Frame | None:
    """The directory `entry` opened in both trees; None if it is no longer what was stat'ed."""
    fd = os.open(entry.name, DIR_FLAGS, dir_fd=entry.dir_fd)
    base: int | None = None
    try:
        if _ident(os.fstat(fd)) != _ident(entry.st):
            os.close(fd)
            return None
        base_id = None
        entry.opaque = entry.base_st is not None and is_opaque(fd)
        if entry.base_st is not None and stat.S_ISDIR(entry.base_st.st_mode) \
                and not entry.opaque:
            base = os.open(entry.name, DIR_FLAGS, dir_fd=entry.base_fd)
            base_id = _ident(os.fstat(base))
    except BaseException:
        os.close(fd)
        raise
    return _Frame(entry.path, entry.name, entry.depth, [], [fd, base],
                  [_ident(entry.st), base_id])


def _fd(frames: list[_Frame], side: int) -> int | None:
    """The top frame's descriptor in one tree, opening it again (and the levels between) from
    the nearest open ancestor if the window had closed it; None if it moved away."""
    top = len(frames) - 1
    if frames[top].fds[side] is not None:
        return frames[top].fds[side]
    start = max(i for i in range(top + 1) if frames[i].fds[side] is not None)
    for i in range(start + 1, top + 1):
        parent, frame = frames[i - 1], frames[i]
        try:
            fd = os.open(frame.name, DIR_FLAGS, dir_fd=parent.fds[side])
        except OSError as exc:
            if exc.errno in _RACES:
                return None
            raise
        if _ident(os.fstat(fd)) != frame.ids[side]:
            os.close(fd)
            return None
        frame.fds[side] = fd
    _trim(frames)
    return frames[top].fds[side]


def _trim(frames: list[_Frame]) -> None:
    """Close the shallowest descriptors beyond FD_WINDOW per tree (never the root's)."""
    for side in (0, 1):
        open_ones = [f for f in frames[1:] if f.fds[side] is not None]
        for frame in open_ones[:max(0, len(open_ones) - FD_WINDOW)]:
            os.close(frame.fds[side])  # type: ignore[arg-type]
            frame.fds[side] = None


def _close(frame: _Frame, root: _Frame) -> None:
    if frame is root:
        return
    for side in (0, 1):
        if frame.fds[side] is not None:
            os.close(frame.fds[side])  # type: ignore[arg-type]
            frame.fds[side] = None


def remove(dir_fd: int, name: bytes | str) -> None:
    """Remove an entry, and a directory with everything under it, however deep, never following
    a symlink. Depth first with one directory descriptor at a time: the way back up is "..",
    checked to be the directory it came down from (st_dev, st_ino), so a tree moved meanwhile
    raises instead of sending the removal elsewhere. No depth bound: a tree too deep to walk
    must still go (revert, clear_delta). An entry already gone is not an error."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    names, ids = [name], [_ident(os.fstat(dir_fd))]
    try:
        if _ident(os.fstat(fd)) != _ident(st):
            raise WalkError(os.fsencode(name), "replaced while being removed")
        while names:
            sub = None
            for child in os.listdir(fd):
                try:
                    if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                        sub = child
                        break
                    os.unlink(child, dir_fd=fd)
                except FileNotFoundError:
                    continue
            if sub is not None:
                child_fd = os.open(sub, DIR_FLAGS, dir_fd=fd)
                ids.append(_ident(os.fstat(fd)))
                os.close(fd)
                fd = child_fd
                names.append(sub)
                continue
            up = os.open("..", DIR_FLAGS, dir_fd=fd) if len(names) > 1 else os.dup(dir_fd)
            os.close(fd)
            fd = up
            if _ident(os.fstat(fd)) != ids.pop():
                raise WalkError(os.fsencode(names[-1]), "moved while being removed")
            try:
                os.rmdir(names.pop(), dir_fd=fd)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


def raise_nofile_limit() -> None:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard one, as nsjail does
    (setFDLimit). systemd and shells start processes with a soft limit of 1024, kept low only
    for programs that still use select(); corral does not (selectors/poll). The walks above are
    bounded, but the supervisor holds descriptors per process (pidfds, pipes, notify, journals)
    and a service must not make it run out of them: EMFILE half-way through a walk was how
    a commit's refusal gate was once bypassed. Services never inherit it: the launch sets each
    process's own limit from its manifest."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass  # a hard limit the kernel will not give (above fs.nr_open): keep the soft one

"""File access that never follows a symlink out of a tree corral does not trust.

Python has no openat2(2) binding, so RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS is done the portable
way: walk the path one component at a time with O_NOFOLLOW from a directory file descriptor.
Any symlink on the way is an error (ELOOP), and ".." is refused before anything is opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

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


# ---------------------------------------------------------------- reading a tree corral did not write

OPAQUE_XATTR = "trusted.overlay.opaque"
READ_CHUNK = 1 << 20
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket"}


def hash_and_magic(dir_fd: int, name: bytes) -> tuple[str | None, bool]:
    import blake3

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None, False  # removed or swapped for a symlink meanwhile: reported without hash
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, False
        hasher = blake3.blake3()
        first = b""
        while chunk := os.read(fd, READ_CHUNK):
            if not first:
                first = chunk[:4]
            hasher.update(chunk)
        return hasher.hexdigest(), first == b"\x7fELF"
    finally:
        os.close(fd)


def open_dir(dir_fd: int, name: bytes) -> int | None:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except OSError:
        return None


def lstat_at(dir_fd: int | None, name: bytes) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False

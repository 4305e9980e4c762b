"""File access that never follows a symlink out of a tree corral does not trust.

Python has no openat2(2) binding, so RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS is done the portable
way: walk the path one component at a time with O_NOFOLLOW from a directory file descriptor.
Any symlink on the way is an error (ELOOP), and ".." is refused before anything is opened.
"""

from __future__ import annotations

import os
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

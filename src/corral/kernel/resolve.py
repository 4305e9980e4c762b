"""Resolve a path the way the kernel resolves it for another process: from that process's
root and cwd, through its own /proc. The exec check needs this: resolved from the supervisor,
`/dev/fd/3` (a link to /proc/self/fd) names the supervisor's fd 3, or nothing at all since the
supervisor is not in the service's PID namespace, while the kernel gives the caller its own
fd 3, which may be ld.so (red team 2026-12-04, finding 2).

One component at a time, every symlink read here and followed inside the caller's root (as
openat2's RESOLVE_IN_ROOT does), never a magic link followed blindly: a walk that enters the
caller's procfs takes what is left of the path as a /proc path, and only the forms that name the
caller's own fds, root, cwd or executable are resolved (through /proc/PID of the caller, as the
supervisor sees it); anything else there is UNRESOLVED. Paths are bytes throughout: a service
may name anything.
"""

from __future__ import annotations

import errno
import os
import stat

PROC_SUPER_MAGIC = 0x9FA0
PROC_ROOT_INO = 1
MAX_LINKS = 40  # the kernel's own limit (MAXSYMLINKS)
MAX_STEPS = 4096  # components, links included: a bound on the work one exec may cost

Identity = tuple[int, int]
UNRESOLVED: Identity = (-1, -1)  # cannot be told safely: refused (fail closed)


class Missing(Exception):
    """The exec fails with this errno whoever asks: the path names nothing (ENOENT, ENOTDIR),
    or something no one can execute (EACCES: a directory, or a file with no x bit at all, which
    even CAP_DAC_OVERRIDE cannot run). Answered without an incident: nothing could run."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.errno = err


def _fs_type(fd: int) -> int:
    import ctypes

    from corral.kernel.syscalls import libc

    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type is its first field
    if libc.fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def _ns_pid(pid: int) -> int | None:
    """The caller's pid as its own PID namespace numbers it (what /proc/N means there)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def _identity(fd: int) -> Identity:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else UNRESOLVED


def _open(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def resolve(pid: int, path: bytes, dirfd: int | None = None) -> Identity:
    """The (st_dev, st_ino) of the regular file `path` names for process `pid` (relative to
    its cwd, or to its descriptor `dirfd` for execveat); UNRESOLVED if it cannot be told or is
    not a regular file. Raises Missing if nothing is there, OSError if the process is gone."""
    root = _open(f"/proc/{pid}/root")
    fds = [root]
    try:
        if path.startswith(b"/"):
            cur = root
        else:
            cur = _open(f"/proc/{pid}/cwd" if dirfd is None else f"/proc/{pid}/fd/{dirfd}")
            fds.append(cur)
        root_id = os.fstat(root)
        parts = path.split(b"/")
        parts.reverse()  # a stack: the next component last
        links = steps = 0
        while parts:
            name = parts.pop()
            steps += 1
            if steps > MAX_STEPS:
                return UNRESOLVED
            if name in (b"", b"."):
                continue
            if _fs_type(cur) == PROC_SUPER_MAGIC:
                if os.fstat(cur).st_ino != PROC_ROOT_INO:
                    return UNRESOLVED  # somewhere inside someone's /proc: not told
                return _in_proc(pid, [name] + parts[::-1])
            if name == b"..":
                st = os.fstat(cur)
                if (st.st_dev, st.st_ino) == (root_id.st_dev, root_id.st_ino):
                    continue  # ".." of the root is the root
                cur = os.open(b"..", os.O_PATH | os.O_CLOEXEC, dir_fd=cur)
                fds.append(cur)
                continue
            try:
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise Missing(exc.errno) from None
                return UNRESOLVED
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    return UNRESOLVED
                target = os.readlink(name, dir_fd=cur)
                if target.startswith(b"/"):
                    cur = root
                more = target.split(b"/")
                more.reverse()
                parts.extend(more)
                continue
            if not parts or all(p in (b"", b".") for p in parts):
                if stat.S_ISDIR(st.st_mode) or (
                        stat.S_ISREG(st.st_mode) and not st.st_mode & 0o111):
                    raise Missing(errno.EACCES)
                return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else UNRESOLVED
            if not stat.S_ISDIR(st.st_mode):
                raise Missing(errno.ENOTDIR)
            cur = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=cur)
            fds.append(cur)
        return _identity(cur)
    finally:
        for fd in fds:
            os.close(fd)


def _in_proc(pid: int, rest: list[bytes]) -> Identity:
    """`rest`, a path inside the caller's /proc: its own fd, root, cwd or exe, or UNRESOLVED."""
    parts = [p for p in rest if p not in (b"", b".")]
    if not parts or b".." in parts:
        return UNRESOLVED
    who, *parts = parts  # thread-self: the notification's pid is the thread's own id
    if who not in (b"self", b"thread-self") and not (who.isdigit() and int(who) == _ns_pid(pid)):
        return UNRESOLVED  # another process of the service: not followed
    mine = f"/proc/{pid}"
    if parts == [b"exe"]:
        return _identity_of(f"{mine}/exe")
    if len(parts) == 2 and parts[0] == b"fd" and parts[1].isdigit():
        return _identity_of(f"{mine}/fd/{int(parts[1])}")
    if parts[:1] in ([b"root"], [b"cwd"]):
        rest_path = b"/".join(parts[1:])
        if parts[0] == b"root":
            return resolve(pid, b"/" + rest_path)
        return resolve(pid, rest_path or b".")
    return UNRESOLVED


def fd_identity(pid: int, fd: int) -> Identity:
    """The file the caller's descriptor `fd` is open on (fexecve)."""
    return _identity_of(f"/proc/{pid}/fd/{fd}")


def _identity_of(magic: str) -> Identity:
    """The file a magic link of the caller's stands for, as the kernel would take it."""
    try:
        fd = os.open(magic, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return UNRESOLVED
    try:
        return _identity(fd)
    finally:
        os.close(fd)

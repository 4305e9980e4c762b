"""seccomp user notification for execve/execveat: the `exec` tripwire, and its enforcement.

The contained process's execve blocks in the kernel until the supervisor answers, so a
forbidden exec is caught before it runs (latency: the time to decide), and is refused with
EPERM. This also closes a hole Landlock leaves open: the dynamic loader must be executable for
any program to start, and `ld.so /tmp/payload` would run a payload through it; here only the
manifest's `exec` paths may be the target of an exec.

The ioctls are done with fcntl on raw structs: pyseccomp only wraps them for the filter object
in the process that loaded it, and the supervisor only holds the descriptor.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass

from corral.kernel.syscalls import check, libc

NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data
RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
IOCTL_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)
IOCTL_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)
IOCTL_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
FLAG_CONTINUE = 1
AT_EMPTY_PATH = 0x1000
SYS_EXECVE, SYS_EXECVEAT = 59, 322  # x86_64
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
O_PATH = 0o10000000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str) -> int:
    """openat2(RESOLVE_IN_ROOT): resolve `path` as if root_fd were "/", symlinks included, so a
    link planted by the service can never lead outside its root. Returns an O_PATH fd."""
    how = _OpenHow(O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    return check(libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(root_fd), path.encode(),
                              ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))), path)


MISSING = None  # the path names nothing: the kernel will fail the exec by itself
UNRESOLVED = (-1, -1)  # names something we cannot resolve safely: refused (fail closed)


def identity(root_fd: int, path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the regular file `path` names inside the root; MISSING if nothing
    is there, UNRESOLVED if it cannot be resolved safely (a magic link, a loop...)."""
    try:
        fd = open_in_root(root_fd, path)
    except OSError as exc:
        return MISSING if exc.errno in (errno.ENOENT, errno.ENOTDIR) else UNRESOLVED
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else UNRESOLVED
    finally:
        os.close(fd)


_PROC_FD = re.compile(r"^/proc/(self|thread-self|\d+)/fd/(\d+)$")
_PROC_ROOT = re.compile(r"^/proc/(self|thread-self|\d+)/root(/.*)?$")


@dataclass
class Request:
    id: int
    pid: int
    nr: int
    args: tuple[int, ...]


def receive(fd: int) -> Request | None:
    buf = bytearray(NOTIF.size)
    try:
        fcntl.ioctl(fd, IOCTL_RECV, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):  # the task died or the call was interrupted
            return None
        raise
    ident, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf)
    return Request(ident, pid, nr, tuple(args))


def still_valid(fd: int, ident: int) -> bool:
    try:
        fcntl.ioctl(fd, IOCTL_ID_VALID, struct.pack("=Q", ident))
        return True
    except OSError:
        return False


def respond(fd: int, ident: int, allow: bool) -> None:
    resp = RESP.pack(ident, 0, 0 if allow else -errno.EPERM, FLAG_CONTINUE if allow else 0)
    try:
        fcntl.ioctl(fd, IOCTL_SEND, bytearray(resp), True)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the task is gone; nothing to answer
            raise


def _read_string(pid: int, address: int, limit: int = 4096) -> str:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        data = mem.read(limit)
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def target_of(req: Request) -> tuple[str, tuple[int, int] | None]:
    """What the exec asks for: the path (as text, for the record) and the file's identity
    resolved inside the process's own root: MISSING if nothing is there, UNRESOLVED if it
    cannot be told safely. Must be checked with still_valid() afterwards (pid reuse).

    A check like this one can be raced (the path is looked up again when the kernel runs the
    exec), so it is a tripwire, not the lock: writable places are mounted noexec, memfds are
    noexec, and Landlock allows execute only on the `exec` paths."""
    pid = req.pid
    if req.nr == SYS_EXECVEAT:
        dirfd, address, flags = req.args[0], req.args[1], req.args[4]
    else:
        dirfd, address, flags = -100, req.args[0], 0
    path = _read_string(pid, address)
    if not path and flags & AT_EMPTY_PATH:  # fexecve of an open file (a memfd, say)
        return f"fd {dirfd}", _fd_identity(pid, dirfd & 0xFFFFFFFF)
    # The process's own /proc magic links, which openat2 refuses to follow: resolve them the
    # way the kernel would for that process (its fds, its root), never by following them here.
    if match := _PROC_FD.match(path):
        owner = pid if match.group(1) in ("self", "thread-self") else int(match.group(1))
        if owner != pid:
            return path, UNRESOLVED
        return path, _fd_identity(pid, int(match.group(2)))
    if match := _PROC_ROOT.match(path):
        if match.group(1) not in ("self", "thread-self") and int(match.group(1)) != pid:
            return path, UNRESOLVED
        path = match.group(2) or "/"
    if not path.startswith("/"):
        base = f"/proc/{pid}/cwd" if dirfd in (-100, 0xFFFFFF9C) else \
            f"/proc/{pid}/fd/{dirfd & 0xFFFFFFFF}"
        try:
            path = os.path.join(os.readlink(base), path)
        except OSError:
            return path, UNRESOLVED
    try:
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return path, UNRESOLVED
    try:
        return path, identity(root, path)
    finally:
        os.close(root)


def _fd_identity(pid: int, fd: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")  # the open file itself, as the kernel would
    except OSError:
        return UNRESOLVED
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else UNRESOLVED


def send_fd(sock: socket.socket, fd: int, message: bytes = b"fd") -> None:
    socket.send_fds(sock, [message], [fd])


def recv_fd(sock: socket.socket) -> tuple[bytes, int | None]:
    message, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    return message, (fds[0] if fds else None)


def unix_path(path: str) -> tuple[str, int]:
    """A short name for a UNIX socket path of any length (sun_path holds 108 bytes; test and
    state directories can be longer): the directory through /proc/self/fd. The caller closes
    the returned descriptor after bind/connect."""
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd

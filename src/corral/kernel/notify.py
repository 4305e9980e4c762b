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
import socket
import stat
import struct

from corral.core.record import record
from corral.core.text import show
from corral.kernel import resolve
from corral.kernel.syscalls import check, libc

NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data
RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
IOCTL_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)
IOCTL_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)
IOCTL_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
FLAG_CONTINUE = 1
AT_EMPTY_PATH = 0x1000
AT_FDCWD = 0xFFFFFF9C  # -100, as the low 32 bits of a syscall argument
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
    # fsencode: a path the service wrote may be any bytes (a strict encode once ended the
    # supervisor on b"/x\xff")
    return check(libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(root_fd),
                              os.fsencode(path), ctypes.byref(how),
                              ctypes.c_size_t(ctypes.sizeof(how))), path)


MISSING = None  # the path names nothing
UNRESOLVED = resolve.UNRESOLVED  # names something we cannot resolve safely: refused


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


@record
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


def respond(fd: int, ident: int, allow: bool, err: int = errno.EPERM) -> None:
    """Let the call go on (the kernel does the exec), or fail it here with `err`."""
    resp = RESP.pack(ident, 0, 0 if allow else -err, FLAG_CONTINUE if allow else 0)
    try:
        fcntl.ioctl(fd, IOCTL_SEND, bytearray(resp), True)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the task is gone; nothing to answer
            raise


class Unreadable(Exception):
    """The call's path cannot be read from the caller's memory (NULL, unmapped...)."""


def _read_string(pid: int, address: int, limit: int = 4096) -> bytes:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            data = mem.read(limit)
    except (OSError, OverflowError, ValueError) as exc:
        raise Unreadable(f"path at {address:#x}: {exc}") from None
    if b"\0" not in data:
        if len(data) < limit:  # ends in unmapped memory: the kernel would say EFAULT
            raise Unreadable(f"path at {address:#x}: no end")
        raise resolve.Missing(errno.ENAMETOOLONG)
    return data.split(b"\0", 1)[0]


@record
class Target:
    """What an exec asks for: `path` as text for the record (None if it could not be read),
    and what it names: an identity, UNRESOLVED (refused, with `error` saying why), or nothing
    (`missing`: the errno the exec fails with, answered here so the kernel never resolves a
    path this check did not)."""
    path: str | None
    ident: tuple[int, int] | None = None
    missing: int = 0
    error: str = ""


def target_of(req: Request) -> Target:
    """Resolve the exec's target as the kernel will for the caller: its root, its cwd or
    execveat's dirfd, its own /proc (kernel.resolve). Must be checked with still_valid()
    afterwards (pid reuse).

    A check like this one can be raced (the path is looked up again when the kernel runs the
    exec), so it is a tripwire, not the lock: writable places are mounted noexec, memfds are
    noexec, and Landlock allows execute only on the `exec` paths."""
    pid = req.pid
    if req.nr == SYS_EXECVEAT:
        dirfd, address, flags = req.args[0] & 0xFFFFFFFF, req.args[1], req.args[4]
    else:
        dirfd, address, flags = AT_FDCWD, req.args[0], 0
    try:
        raw = _read_string(pid, address)
    except Unreadable as exc:
        return Target(None, UNRESOLVED, error=f"unreadable path: {exc}")
    except resolve.Missing as exc:
        return Target(None, missing=exc.errno)
    path = show(raw)
    if not raw and flags & AT_EMPTY_PATH:  # fexecve of an open file (a memfd, say)
        return Target(f"fd {dirfd}", resolve.fd_identity(pid, dirfd))
    try:
        ident = resolve.resolve(pid, raw, None if dirfd == AT_FDCWD else dirfd)
    except resolve.Missing as exc:
        return Target(path, missing=exc.errno)
    except OSError as exc:  # the caller's root, cwd or dirfd cannot be opened
        return Target(path, UNRESOLVED, error=f"cannot resolve: {exc.strerror}")
    return Target(path, ident, error="" if ident != UNRESOLVED else "cannot resolve safely")


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

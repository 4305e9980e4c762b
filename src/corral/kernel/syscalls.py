"""Thin ctypes wrappers for the system calls Python 3.11's `os` lacks.

Written by hand because the calls are a handful and stable (unshare, setns, mount, umount2,
pivot_root, prctl, capget/capset), and the libraries that wrap them (python-prctl, pyroute2's
netns) either need a compiler or cost 150 ms to import on the launch path. Python 3.12 adds
os.unshare/os.setns; mount, pivot_root and capset are still missing there.

The package's one libc handle and one errno check: landlock, the seccomp notifier, the NFLOG
listener and the journal's syncfs call through `libc` and `call`/`check` here.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
# syscall(2) returns a long (a file descriptor, or an ABI number); ctypes' default is an int.
libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_PIVOT_ROOT = 155  # x86_64; pivot_root has no glibc wrapper
SYS_CAPGET, SYS_CAPSET = 125, 126
SYS_KEYCTL = 250  # x86_64
KEYCTL_JOIN_SESSION_KEYRING = 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def check(result: int, what: str | None = None) -> int:
    """A libc result, or OSError with the errno the call left (prefixed with `what`)."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}" if what else os.strerror(err))
    return result


def call(name: str, *args: int | bytes | None, what: str | None = None) -> int:
    """Call the libc function `name` with every integer widened to a long (syscall and prctl
    are variadic: a bare Python int would be passed as a 32-bit int); -1 raises OSError."""
    conv = [a if a is None or isinstance(a, bytes) else ctypes.c_long(a) for a in args]
    return check(getattr(libc, name)(*conv), what)


def join_new_session_keyring() -> int:
    """keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL): a fresh anonymous session keyring, so that
    nothing of the caller's session keyring (an administrator's tokens) is possessed after."""
    return call("syscall", SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None,
                what="keyctl(JOIN_SESSION_KEYRING)")


def syncfs(fd: int, what: str = "syncfs") -> None:
    check(libc.syncfs(ctypes.c_int(fd)), what)


def unshare(flags: int) -> None:
    check(libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    check(libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                     enc(data)), f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    check(libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    check(libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), new_root.encode(), put_old.encode()),
          "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                            ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (64-bit masks, bit N = capability N)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    check(libc.syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), data), "capset")


def capget(pid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of a thread, as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    check(libc.syscall(ctypes.c_long(SYS_CAPGET), ctypes.byref(header), data), "capget")
    join = lambda f: getattr(data[0], f) | (getattr(data[1], f) << 32)  # noqa: E731
    return join("effective"), join("permitted"), join("inheritable")

"""Apply a `LandlockPlan` to the calling process (the launch child, just before seccomp/execve).

The three Landlock system calls are called through ctypes. No PyPI binding is used:
- `landlock` 1.0.0.dev5 handles filesystem rights only (no TCP rules, no scoping), decides
  failure by errno != 0 instead of by the return value, and opens paths without O_CLOEXEC;
- `landlockpy` 0.2.0 covers ABI 1-11 with best-effort masking, but it would be a new dependency
  on the launch path for ~40 lines of syscall glue, and it leaves the parts corral needs anyway
  (file-vs-directory rights, optional paths, the degraded-feature report) to the caller.
The layer below is only: syscall numbers, flag values, and packed structs built with `struct`.

Landlock is per thread: `restrict` must run in a single-threaded process (the forked launch
child is), or other threads stay unrestricted. Only the standard library is imported here, and
ctypes itself is loaded on first use, so importing this module costs nothing on the CLI path.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Sequence

from corral.core import mountinfo
from corral.core.record import record

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:  # sandbox imports the manifest model (pydantic): not at import time
    from corral.plan.sandbox import LandlockPlan

# Same numbers on every architecture that uses the generic syscall table (x86_64, aarch64...).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
# kernel.syscalls' numbers, repeated so that importing this module needs no ctypes (the
# module test checks they agree).
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39

# LANDLOCK_ACCESS_FS_* (linux/landlock.h)
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
# The kernel rejects (EINVAL) a rule on a non-directory that grants anything else.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
# LANDLOCK_ACCESS_NET_* (ABI 4) and LANDLOCK_SCOPE_* (ABI 6)
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1
SCOPES = {"abstract-unix-socket": 1 << 0, "signal": 1 << 1}
# landlock_restrict_self flags (ABI 7). By default the kernel logs a domain's denials only until
# the first execve: the program itself would never be logged. The watcher turns refused TCP
# connects and binds into incidents from these records (watch.sensors.AuditReader).
RESTRICT_SELF_LOG_NEW_EXEC_ON = 1 << 1

# (first ABI, fs rights it added). A right missing from the running ABI cannot be handled, so
# the kernel does not control it at all: that is the best-effort degradation.
_FS_RIGHTS_SINCE = ((1, (1 << 13) - 1), (2, REFER), (3, TRUNCATE), (5, IOCTL_DEV))
# What a kernel below each ABI cannot enforce, for `corral status`.
_FEATURES = (
    (1, "filesystem rules"),
    (2, "rename/link across directories"),  # ABI 1 always denies them: breaks mv, not safety
    (3, "truncate control"),
    (4, "tcp port rules"),
    (5, "device ioctl control"),
    (6, "scoping"),
    # Below 7 no denial after execve is logged: refused connects and binds raise no incident.
    (7, "audit of refusals"),
)
KNOWN_ABI = 7  # newest ABI this table was checked against (7 only adds audit-log flags)

READ_EXEC = EXECUTE | READ_FILE | READ_DIR
READ_ONLY = READ_FILE | READ_DIR


@record(frozen=True)
class LandlockStatus:
    abi: int
    enforced: bool  # False when abi == 0
    degraded: tuple[str, ...]  # features the kernel lacks, e.g. "tcp port rules (ABI 4)"


def _call(name: str, *args: int | bytes | None) -> int:
    # kernel.syscalls (ctypes and the libc handle) loads on first use, not at import.
    from corral.kernel.syscalls import call

    return call(name, *args)


def abi_version() -> int:
    """The running kernel's Landlock ABI; 0 when it is unavailable."""
    try:
        return _call("syscall", SYS_LANDLOCK_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    except OSError:
        # ENOSYS: kernel built without Landlock; EOPNOTSUPP: not in the boot's lsm= list.
        # Anything else (a seccomp filter of an outer sandbox) makes it just as unusable.
        return 0


def fs_rights(abi: int) -> int:
    """Every filesystem right `abi` knows: what a ruleset handles (denies unless granted)."""
    rights = 0
    for since, bits in _FS_RIGHTS_SINCE:
        if abi >= since:
            rights |= bits
    return rights


def probe(abi: int | None = None) -> LandlockStatus:
    """What `restrict` would enforce on this kernel, without restricting anything."""
    abi = abi_version() if abi is None else abi
    degraded = [f"{name} (ABI {since})" for since, name in _FEATURES if abi < since]
    if abi > KNOWN_ABI:
        degraded.append(f"controls added after ABI {KNOWN_ABI} (unknown to corral)")
    return LandlockStatus(abi=abi, enforced=abi > 0, degraded=tuple(degraded))


def restrict(plan: LandlockPlan, extra_read_exec: Sequence[str] = ()) -> LandlockStatus:
    """Enforce `plan` on the calling thread and everything it executes, irreversibly.

    Paths are as this process sees them (after pivot_root); a path that does not exist is
    skipped, one that exists but cannot be opened raises OSError. `extra_read_exec` is for what
    the plan does not list but execve needs, such as the ELF interpreter (see the tests).
    """
    abi = abi_version()
    _ensure_no_new_privs()  # landlock_restrict_self needs it (or CAP_SYS_ADMIN) anyway
    status = probe(abi)
    if abi == 0:
        return status
    handled_fs = fs_rights(abi)
    handled_net = BIND_TCP | CONNECT_TCP if abi >= 4 else 0
    scoped = _scope_bits(plan.scoped)  # validated on every ABI, applied from ABI 6
    scoped = scoped if abi >= 6 else 0
    # struct landlock_ruleset_attr grew with the ABI; pass only the fields this kernel has.
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    attr = attr[: 8 if abi < 4 else 16 if abi < 6 else 24]
    try:
        ruleset = _call("syscall", SYS_LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    except OSError as e:
        raise OSError(e.errno, f"landlock_create_ruleset (ABI {abi}): {e.strerror}") from None
    try:
        # Writable paths get every handled right but EXECUTE: nothing the process writes can be
        # exec'd directly (W^X); an executable inside a volume is listed in read_exec instead.
        grants = ((tuple(plan.read_exec) + tuple(extra_read_exec), READ_EXEC),
                  (plan.read_only, READ_ONLY),
                  (plan.read_write, handled_fs & ~EXECUTE))
        moot = _moot_truncate(handled_fs)
        for paths, rights in grants:
            for path in paths:
                _allow_path(ruleset, path, rights & handled_fs, moot)
        if handled_net:
            for ports, right in ((plan.tcp_bind, BIND_TCP), (plan.tcp_connect, CONNECT_TCP)):
                for port in ports:
                    _allow_port(ruleset, port, right)
        try:
            flags = RESTRICT_SELF_LOG_NEW_EXEC_ON if abi >= 7 else 0
            _call("syscall", SYS_LANDLOCK_RESTRICT_SELF, ruleset, flags)
        except OSError as e:
            raise OSError(e.errno, f"landlock_restrict_self: {e.strerror}") from None
    finally:
        os.close(ruleset)
    return status


def _moot_truncate(handled_fs: int) -> Callable[[int], bool] | None:
    """Whether TRUNCATE may be added to a read-only rule, as a test of the rule's O_PATH fd.

    Why: Landlock asks for TRUNCATE at every open, as an optional right kept with the file for
    a later ftruncate (security/landlock/fs.c, hook_file_open). A rule that does not grant it
    does not end the walk from the opened file towards the root, so every read-only open of a
    library, a configuration file or a served file walked up to "/" and found no truncate.
    Granted on a rule whose path and every mount beneath it are read-only, it ends the walk at
    the rule's own directory and changes nothing else: a truncate there, by path, by O_TRUNC or
    by ftruncate, fails with EROFS before Landlock is asked (mnt_want_write), and the process
    cannot make those mounts writable (Landlock refuses every remount and mount in its domain).
    A rule covering a writable mount (a volume, /tmp, a runtime directory) is left as it was.
    None: no such rule (TRUNCATE not handled, or this process's mounts cannot be read)."""
    if not handled_fs & TRUNCATE:
        return None
    try:
        writable = [m.point for m in mountinfo.read() if not m.read_only]
    except OSError:
        return None

    def moot(fd: int) -> bool:
        if not os.fstatvfs(fd).f_flag & os.ST_RDONLY:
            return False
        where = os.readlink(f"/proc/self/fd/{fd}")  # as this process sees it, after pivot_root
        below = where.rstrip("/") + "/"
        return where.startswith("/") and not any(
            point == where or point.startswith(below) for point in writable)
    return moot


def _allow_path(ruleset: int, path: str, rights: int,
                moot_truncate: Callable[[int], bool] | None = None) -> None:
    if not os.path.isabs(path):
        raise ValueError(f"landlock: path {path!r} is not absolute")
    try:
        # O_PATH needs no permission on the object itself, only search on its parents; the
        # rule follows symlinks (/lib64/ld-linux-x86-64.so.2 grants its target).
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return  # optional: granting nothing is the safe side
    except OSError as e:
        # Landlock is not applied yet: what refused is the image's own modes and owners (a
        # 0750 directory of root's on the way, say). Say so: the fix is image.owner or a mode.
        error = OSError(e.errno, f"{path}: {e.strerror} for uid {os.geteuid()}: a file mode or "
                        "owner in the image (not Landlock); give it to the process with "
                        "image.owner or change its mode")
        error.stage = "image"  # type: ignore[attr-defined]  # the launch report's label
        raise error from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        if rights and not rights & WRITE_FILE and moot_truncate and moot_truncate(fd):
            rights |= TRUNCATE
        if rights:
            rule = struct.pack("=Qi", rights, fd)  # landlock_path_beneath_attr is packed
            _call("syscall", SYS_LANDLOCK_ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0)
    except OSError as e:
        raise OSError(e.errno, f"landlock_add_rule {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _allow_port(ruleset: int, port: int, right: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"landlock: tcp port {port} out of range")
    rule = struct.pack("=QQ", right, port)  # landlock_net_port_attr
    try:
        _call("syscall", SYS_LANDLOCK_ADD_RULE, ruleset, RULE_NET_PORT, rule, 0)
    except OSError as e:
        raise OSError(e.errno, f"landlock_add_rule tcp port {port}: {e.strerror}") from None


def _scope_bits(names: Sequence[str]) -> int:
    unknown = set(names) - set(SCOPES)
    if unknown:
        raise ValueError(f"landlock: unknown scope {', '.join(sorted(unknown))}")
    bits = 0
    for name in names:
        bits |= SCOPES[name]
    return bits


def _ensure_no_new_privs() -> None:
    try:
        if _call("prctl", PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
            _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except OSError as e:
        raise OSError(e.errno, f"prctl(PR_SET_NO_NEW_PRIVS): {e.strerror}") from None


def describe(status: LandlockStatus) -> str:
    """One line for `corral status`."""
    if status.abi == 0:
        return "landlock unavailable: not enforced"
    line = f"landlock ABI {status.abi}: {'enforced' if status.enforced else 'not enforced'}"
    if status.degraded:
        line += f" (without {', '.join(status.degraded)})"
    return line


def describe_abi() -> str:
    """`describe` of what this kernel would enforce: the supervisor records it at start."""
    return describe(probe())

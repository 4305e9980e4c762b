"""A process's seccomp filters compiled once, kept, and loaded without libseccomp.

libseccomp turns a plan into classic BPF (launch.seccomp.build). Importing it (pyseccomp, and
through ctypes.util subprocess, shutil and tempfile: ~3 ms) and compiling (~1 ms) were on every
`corral run`'s launch path, for programs that depend only on: the plan, the calls handed to
the supervisor, the logging flag, libseccomp's version (its syscall tables), the machine, and
corral's compiler (launch/seccomp.py, plan/sandbox.py, this file). `programs` keeps them in
STATE/seccomp/PROCESS.bpf under a SHA-256 of all of these and compiles again when any changed.
The file is root's, in the service's state directory (root's, 0700), like the runtime.json the
launch reads anyway; its shape and the programs' own SHA-256 are checked, and anything
unexpected is compiled anew, never loaded.

`load` hands the programs to the kernel with seccomp(2) as libseccomp's seccomp_load does: the
same instructions (seccomp_export_bpf writes what seccomp_load loads) and the same flags
(SECCOMP_FILTER_FLAG_LOG for the logged main filter, SECCOMP_FILTER_FLAG_NEW_LISTENER for the
quiet one's user notifications, which then returns the listener).
"""

from __future__ import annotations

import ctypes
import os
import struct

from corral.core.record import record
from corral.kernel import syscalls as kernel
from corral.plan.sandbox import SeccompPlan

try:  # Python's builtin SHA-256 (no stub in typeshed): hashlib loads OpenSSL, ~2 ms, for one hash
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.12 renamed it
    from hashlib import sha256

SYS_SECCOMP = 317  # x86_64
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
INSN = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
BPF_MAXINSNS = 4096
MAGIC = b"corral-seccomp-1\n"
# the key, the SHA-256 of the programs, main flags, quiet flags, main and quiet lengths
_HEADER = struct.Struct("=32s32sIIii")
COMPILER = (os.path.join(os.path.dirname(__file__), "seccomp.py"), __file__,
            os.path.join(os.path.dirname(os.path.dirname(__file__)), "plan", "sandbox.py"))


@record(frozen=True)
class Program:
    """One filter: its instructions (struct sock_filter array) and the flags of its load."""
    bpf: bytes
    flags: int


@record(frozen=True)
class Programs:
    """A plan's filters: `quiet` (unlogged ENOSYS and user notifications; None when there are
    none) is loaded first, then `main` (see launch.seccomp.Filters)."""
    main: Program
    quiet: Program | None


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def compile_plan(plan: SeccompPlan, *, log: bool = True,
                 notify: tuple[str, ...] = ()) -> Programs:
    """libseccomp's programs for the plan (imports pyseccomp)."""
    from corral.launch import seccomp

    filters = seccomp.build(plan, log=log, notify=notify)
    main = Program(_export(filters.main), SECCOMP_FILTER_FLAG_LOG if log else 0)
    quiet = None
    if filters.quiet is not None:
        notifying = any(seccomp.resolves(name) for name in notify)
        quiet = Program(_export(filters.quiet),
                        SECCOMP_FILTER_FLAG_NEW_LISTENER if notifying else 0)
    return Programs(main, quiet)


def _export(filt: object) -> bytes:
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            filt.export_bpf(out)  # type: ignore[attr-defined]  # pyseccomp's filter object
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def cache_key(plan: SeccompPlan, log: bool, notify: tuple[str, ...]) -> bytes:
    """What the programs depend on, hashed. None of it needs libseccomp's Python binding:
    its version comes from the shared library itself."""
    digest = sha256(MAGIC)
    for part in (repr(plan), repr(sorted(notify)), repr(log), _libseccomp_version(),
                 os.uname().machine):
        digest.update(part.encode() + b"\0")
    for path in COMPILER:
        with open(path, "rb") as handle:
            digest.update(handle.read() + b"\0")
    return digest.digest()


def _libseccomp_version() -> str:
    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint),
                    ("micro", ctypes.c_uint)]

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "?"  # compile_plan will say what is wrong
    lib.seccomp_version.restype = ctypes.POINTER(Version)
    version = lib.seccomp_version().contents
    return f"{version.major}.{version.minor}.{version.micro}"


def programs(plan: SeccompPlan, cache: str, *, log: bool = True,
             notify: tuple[str, ...] = ()) -> Programs:
    """The plan's programs from the cache file `cache`, compiled and stored there when it
    is missing, stale or not what it should be."""
    key = cache_key(plan, log, notify)
    found = _read(cache, key)
    if found is not None:
        return found
    compiled = compile_plan(plan, log=log, notify=notify)
    _write(cache, key, compiled)
    return compiled


def _read(path: str, key: bytes) -> Programs | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, len(MAGIC) + _HEADER.size + 2 * BPF_MAXINSNS * INSN + 1)
    finally:
        os.close(fd)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _HEADER.size:
        return None
    found, digest, main_flags, quiet_flags, main_len, quiet_len = _HEADER.unpack_from(
        data, len(MAGIC))
    body = data[len(MAGIC) + _HEADER.size:]
    if (found != key or not _valid(main_len) or not (quiet_len == -1 or _valid(quiet_len))
            or len(body) != main_len + max(quiet_len, 0) or sha256(body).digest() != digest):
        return None
    main = Program(body[:main_len], main_flags)
    quiet = None if quiet_len == -1 else Program(body[main_len:], quiet_flags)
    return Programs(main, quiet)


def _valid(length: int) -> bool:
    return 0 < length <= BPF_MAXINSNS * INSN and length % INSN == 0


def _write(path: str, key: bytes, compiled: Programs) -> None:
    """Atomically (a reader sees the old file or the new one), root-only. A cache that cannot
    be written only costs the next start a compile."""
    quiet = compiled.quiet
    body = compiled.main.bpf + (quiet.bpf if quiet else b"")
    header = _HEADER.pack(key, sha256(body).digest(), compiled.main.flags,
                          quiet.flags if quiet else 0, len(compiled.main.bpf),
                          len(quiet.bpf) if quiet else -1)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, MAGIC + header + body)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_all(programs: Programs, main: bool = True) -> int:
    """In the child, last thing before execve: `quiet`, then `main` (`main=False` is for
    attribution benchmarks only, launch.benchskip). Returns the quiet filter's listener, or
    -1. The kernel accepts a filter from an unprivileged process only under no_new_privs;
    launch sets it earlier, set it here if it did not (as libseccomp does)."""
    if kernel.prctl(kernel.PR_GET_NO_NEW_PRIVS) != 1:
        kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
    listener = -1
    if programs.quiet is not None:
        fd = load(programs.quiet)
        listener = fd if programs.quiet.flags & SECCOMP_FILTER_FLAG_NEW_LISTENER else -1
    if main:
        load(programs.main)  # the child is single-threaded after fork: no TSYNC needed
    return listener


def load(program: Program) -> int:
    """Install one filter on the calling thread; returns the listener with NEW_LISTENER (else
    0). The caller has set no_new_privs (launch.seccomp.load does, as libseccomp would)."""
    buf = ctypes.create_string_buffer(program.bpf, len(program.bpf))
    prog = _SockFprog(len(program.bpf) // INSN, ctypes.addressof(buf))
    return kernel.check(kernel.libc.syscall(ctypes.c_long(SYS_SECCOMP),
                                            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                                            ctypes.c_long(program.flags), ctypes.byref(prog)),
                        "seccomp")

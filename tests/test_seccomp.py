"""The seccomp filter on the real kernel (x86_64).

Every filter is loaded in a forked child, never in the test runner: the child reports through a
pipe (JSON) and always leaves with os._exit. Calls are made by number through libc.syscall, with
arguments that are harmless even if the filter failed (so a broken filter fails the test rather
than the host), and a control run without the filter shows the EPERMs come from the filter.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core.record import replace
from corral.launch import seccomp
from corral.plan.sandbox import CLONE_NAMESPACE_FLAGS, DEFAULT_DENY, SeccompPlan, default_deny

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers and ABIs"),
    pytest.mark.root,
]

DEFAULT = SeccompPlan("deny-list", tuple(default_deny()))
M64 = 2**64 - 1
SIGCHLD = int(signal.SIGCHLD)
CLONE_NEWUSER = 0x10000000
TIOCSTI, TIOCLINUX, TCGETS = 0x5412, 0x541C, 0x5401
PR_GET_NO_NEW_PRIVS = 39
X32_SYSCALL_BIT = 0x40000000
SYS = {"getpid": 39, "getppid": 110, "getuid": 102, "clone": 56, "clone3": 435, "ioctl": 16,
       "acct": 163, "prctl": 157}
# name -> (x86_64 number, arguments that fail or do nothing if the call were allowed). Order
# matters for the control run: unshare(CLONE_NEWUSER) would make the later calls fail with
# the kernel's own EPERM, and PTRACE_TRACEME is best made last.
DANGEROUS = {
    "mount": (165, 0, 0, 0, 0, 0),
    "keyctl": (250, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring, no create
    "bpf": (321, 0xFFFF, 0, 0),  # no such command
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "userfaultfd": (323, 0),
    "io_uring_setup": (425, 0, 0),
    "kexec_load": (246, 0, 1000, 0, 0),  # too many segments: EINVAL before anything happens
    "init_module": (175, 0, 0, 0),
    "reboot": (169, 0, 0, 0, 0),  # bad magic
    "swapon": (167, 0, 0),
    "syslog": (103, 10, 0, 0),  # SYSLOG_ACTION_SIZE_BUFFER: a read-only query
    "settimeofday": (164, 0, 0),  # both NULL: changes nothing
    "setns": (308, -1, 0),
    "pivot_root": (155, 0, 0),
    "chroot": (161, 0),
    "open_by_handle_at": (304, -1, 0, 0),
    "ptrace": (101, 0, 0, 0, 0),  # PTRACE_TRACEME
    "unshare": (272, CLONE_NEWUSER),
}

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def syscall(nr: int, *args: int) -> tuple[int, int]:
    """(return value, errno or 0)."""
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & M64) for a in args))
    return ret, (ctypes.get_errno() if ret == -1 else 0)


@dataclass
class Child:
    pid: int
    status: int
    result: object
    stderr: bytes = b""

    @property
    def exitcode(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read()


def in_child(body, plan: SeccompPlan | None = None, *, log: bool = True) -> Child:
    """Run body() in a forked child under `plan` (built here, loaded there, as launch does).
    body may also execve: the pipes are close-on-exec, its stderr is captured."""
    filt = None if plan is None else seccomp.build(plan) if log else seccomp.build(plan, log=False)
    r, w = os.pipe()
    er, ew = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.close(er)
            os.dup2(ew, 2)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSYS would dump core
            if filt is not None:
                seccomp.load(filt)
            out = json.dumps(body())
        except BaseException:  # noqa: BLE001 - report anything, never return into pytest
            out, code = json.dumps({"exception": traceback.format_exc()}), 70
        try:
            os.write(w, out.encode())
        finally:
            os._exit(code)
    os.close(w)
    os.close(ew)
    data, err = _read_all(r), _read_all(er)
    _, status = os.waitpid(pid, 0)
    result = json.loads(data) if data else None
    if isinstance(result, dict) and "exception" in result:
        pytest.fail(f"child raised:\n{result['exception']}")
    return Child(pid, status, result, err)


def in_child_then_exec(before, argv: list[str], plan: SeccompPlan) -> Child:
    """Like in_child, but body reports before() on its own pipe, then execs argv."""
    r, w = os.pipe()  # close-on-exec: only the report before execve gets through

    def body():
        os.write(w, json.dumps(before()).encode())
        os.execv(argv[0], argv)

    try:
        child = in_child(body, plan)
    finally:
        os.close(w)
    child.result = json.loads(_read_all(r) or b"null")
    return child


def raw_clone(flags: int) -> tuple[int, int]:
    """clone(flags, stack=0, ...) as fork does; a child it creates (filter bug) exits at once."""
    ret, err = syscall(SYS["clone"], flags, 0, 0, 0, 0)
    if ret == 0:
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
    return ret, err


def dangerous_calls() -> dict:
    return {name: syscall(*call) for name, call in DANGEROUS.items()}


# --- logging ----------------------------------------------------------------------------------


def test_denials_are_logged():
    """The filter carries SECCOMP_FILTER_FLAG_LOG: an EPERM leaves an audit record (type 1326),
    read here from the audit multicast group as the supervisor reads it (the kernel log was
    a flaky witness: its printk of audit records is rate-limited host-wide); the same denial
    from a filter without the flag leaves none."""
    from corral.watch import sensors

    reader = sensors.AuditReader()
    try:
        quiet = in_child(lambda: syscall(SYS["acct"], 0), DEFAULT, log=False)
        loud = in_child(lambda: syscall(SYS["acct"], 0), DEFAULT)
        assert quiet.result == loud.result == [-1, errno.EPERM]
        pids: list[int | None] = []
        deadline = time.monotonic() + 5
        while loud.pid not in pids and time.monotonic() < deadline:
            pids += [e.pid for e in reader.read() if e.detail.get("syscall") == "acct"]
            time.sleep(0.05)
        assert loud.pid in pids and quiet.pid not in pids
    finally:
        reader.close()


def test_threads_leave_no_audit_record(monkeypatch):
    """clone3's ENOSYS, which glibc meets at every new thread, comes from the unlogged filter:
    no audit record (each cost a kauditd round and a parse in the supervisor). A denial made
    after it is one, so the reader did see the child's records."""
    from corral.watch import sensors

    monkeypatch.setattr(sensors, "IGNORED_CALLS", set())  # see clone3 records, if any
    reader = sensors.AuditReader()
    try:
        def body():
            out = [syscall(SYS["clone3"], 0, 0)]
            thread = threading.Thread(target=out.append, args=("thread",))
            thread.start()
            thread.join()
            return out + [syscall(SYS["acct"], 0)]

        child = in_child(body, DEFAULT)
        assert child.result == [[-1, errno.ENOSYS], "thread", [-1, errno.EPERM]]
        seen: list[str] = []
        deadline = time.monotonic() + 5
        while "acct" not in seen and time.monotonic() < deadline:
            seen += [e.detail["syscall"] for e in reader.read() if e.pid == child.pid]
            time.sleep(0.05)
        assert seen == ["acct"]
    finally:
        reader.close()


# --- deny-list -------------------------------------------------------------------------------


def test_dangerous_calls_get_eperm():
    child = in_child(dangerous_calls, DEFAULT)
    assert child.exitcode == 0
    assert child.result == {name: [-1, errno.EPERM] for name in DANGEROUS}


def test_control_without_filter_no_eperm():
    """Without the filter none of these fails with EPERM (we are root): the EPERM above is the
    filter's, not the kernel's."""
    child = in_child(dangerous_calls)
    assert child.exitcode == 0
    assert [n for n, (_, err) in child.result.items() if err == errno.EPERM] == []


def test_every_default_deny_name_is_in_the_filter():
    """Every name of the default set is known on x86_64 and present in the compiled filter."""
    pfc = _pfc(DEFAULT)
    missing = [name for names in DEFAULT_DENY.values() for name in names
               if f'"{name}"' not in pfc]
    assert missing == []


def test_clone3_enosys_and_clone_namespace_flags_denied():
    def body():
        out = {"clone3": syscall(SYS["clone3"], 0, 0)}
        for bit in range(32):
            if CLONE_NAMESPACE_FLAGS >> bit & 1:
                out[hex(1 << bit)] = raw_clone((1 << bit) | SIGCHLD)
        out["newuser+newns"] = raw_clone(CLONE_NEWUSER | 0x00020000 | SIGCHLD)
        out["plain clone"] = raw_clone(SIGCHLD)[1]
        pid = os.fork()  # glibc's fork: clone(CHILD_SETTID|CHILD_CLEARTID|SIGCHLD)
        if pid == 0:
            os._exit(7)
        out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        seen = []
        t = threading.Thread(target=seen.append, args=(1,))  # clone3 -> ENOSYS -> clone
        t.start()
        t.join()
        out["thread"] = seen
        out["subprocess"] = subprocess.run(["/bin/true"]).returncode
        return out

    r = in_child(body, DEFAULT).result
    assert r.pop("clone3") == [-1, errno.ENOSYS]
    assert r.pop("plain clone") == 0
    assert (r.pop("fork"), r.pop("thread"), r.pop("subprocess")) == (7, [1], 0)
    assert len(r) == bin(CLONE_NAMESPACE_FLAGS).count("1") + 1
    assert all(v == [-1, errno.EPERM] for v in r.values()), r


def _tty_calls():
    master, slave = os.openpty()
    c = ctypes.c_char(b"x")
    ptr = ctypes.addressof(c)
    termios = ctypes.create_string_buffer(64)
    return {
        "TIOCSTI": syscall(SYS["ioctl"], slave, TIOCSTI, ptr),
        # the kernel truncates cmd to 32 bits, so must the filter
        "TIOCSTI high bits": syscall(SYS["ioctl"], slave, (1 << 32) | TIOCSTI, ptr),
        "TIOCLINUX": syscall(SYS["ioctl"], slave, TIOCLINUX, ptr),
        "TCGETS": syscall(SYS["ioctl"], slave, TCGETS, ctypes.addressof(termios)),
    }


def test_terminal_injection_denied():
    control = in_child(_tty_calls).result
    assert control["TIOCSTI"] == [0, 0]  # root may inject: the kernel would let it through
    r = in_child(_tty_calls, DEFAULT).result
    assert r["TIOCSTI"] == r["TIOCSTI high bits"] == r["TIOCLINUX"] == [-1, errno.EPERM]
    assert r["TCGETS"] == [0, 0]


def test_ordinary_calls_work(tmp_path):
    (tmp_path / "f").write_bytes(b"hello")

    def body():
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        data = os.read(fd, 5).decode()
        os.close(fd)
        socks = {}
        for name, fam, typ in (("inet", socket.AF_INET, socket.SOCK_STREAM),
                               ("netlink", socket.AF_NETLINK, socket.SOCK_RAW),
                               ("unix", socket.AF_UNIX, socket.SOCK_STREAM),
                               # left to capabilities, not seccomp: root here has CAP_NET_RAW
                               ("packet", socket.AF_PACKET, socket.SOCK_RAW)):
            with socket.socket(fam, typ):
                socks[name] = True
        return {"read": data, "getpid": syscall(SYS["getpid"])[0] == os.getpid(), **socks}

    assert in_child(body, DEFAULT).result == {"read": "hello", "getpid": True, "inet": True,
                                              "netlink": True, "unix": True, "packet": True}


def test_exec_after_load_and_filter_survives_exec():
    assert in_child(lambda: os.execv("/bin/true", ["/bin/true"]), DEFAULT).exitcode == 0
    child = in_child(lambda: os.execv("/usr/bin/unshare", ["unshare", "-U", "/bin/true"]),
                     DEFAULT)
    assert child.exitcode not in (0, None) and b"Operation not permitted" in child.stderr


def test_apply_sets_no_new_privs():
    def body():
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)  # unprivileged: seccomp needs no_new_privs now
        before = syscall(SYS["prctl"], PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)[0]
        seccomp.apply(DEFAULT)
        after = syscall(SYS["prctl"], PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)[0]
        return [before, after, syscall(SYS["clone3"], 0, 0)]

    assert in_child(body).result == [0, 1, [-1, errno.ENOSYS]]


# --- allow-list ------------------------------------------------------------------------------

# What a forked Python child needs to report back, plus clone/ioctl to check their arguments.
SMALL = ("brk", "mmap", "munmap", "mprotect", "madvise", "getuid", "clone", "ioctl",
         "set_robust_list", "rt_sigprocmask", "wait4", "openat", "close", "read")


def test_allow_list_denies_what_is_not_listed():
    def body():
        out = {name: syscall(SYS[name]) for name in ("getpid", "getppid", "getuid")}
        out["clone3"] = syscall(SYS["clone3"], 0, 0)
        out["clone newuser"] = raw_clone(CLONE_NEWUSER | SIGCHLD)
        pid = os.fork()
        if pid == 0:
            os._exit(5)
        out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out["tty"] = _tty_calls()
        return out

    r = in_child(body, SeccompPlan("allow-list", SMALL)).result
    assert r["getpid"] == r["getppid"] == [-1, errno.EPERM]
    assert r["getuid"] == [0, 0]
    assert r["clone3"] == [-1, errno.ENOSYS]
    assert r["clone newuser"] == [-1, errno.EPERM]
    assert r["fork"] == 5
    tty = r["tty"]
    assert tty["TIOCSTI"] == tty["TIOCSTI high bits"] == tty["TIOCLINUX"] == [-1, errno.EPERM]
    assert tty["TCGETS"] == [0, 0]


def test_allow_list_survives_a_signal_handler():
    """rt_sigreturn is always allowed: without it, returning from any signal handler between
    load and execve would crash the child (SIGSEGV, checked by hand)."""
    def body():
        seen = []
        signal.signal(signal.SIGUSR1, lambda *_: seen.append(1))
        seccomp.apply(SeccompPlan("allow-list", SMALL + ("getpid", "gettid", "tgkill")))
        signal.raise_signal(signal.SIGUSR1)
        return seen

    child = in_child(body)
    assert (child.signal, child.result) == (None, [1])


# Generous: what the dynamic loader and /bin/true use (strace) and what Python may touch;
# not getpid.
FOR_TRUE = SMALL + ("access", "arch_prctl", "set_tid_address", "newfstatat", "fstat",
                    "pread64", "prlimit64", "rseq", "getrandom", "futex", "rt_sigaction",
                    "geteuid", "getgid", "getegid", "lseek", "stat", "readlink")


def test_allow_list_exec():
    child = in_child_then_exec(lambda: syscall(SYS["getpid"]), ["/bin/true"],
                               SeccompPlan("allow-list", FOR_TRUE))
    assert child.result == [-1, errno.EPERM]  # getpid, before execve
    assert child.exitcode == 0, child.stderr  # and /bin/true still ran


def tiny_static_program(path) -> str:
    """A 132-byte static ELF that only calls exit_group(42): no loader, no libc."""
    code = bytes([0xBF, 42, 0, 0, 0,  # mov edi, 42
                  0xB8, 231, 0, 0, 0,  # mov eax, 231 (exit_group)
                  0x0F, 0x05])  # syscall
    base, size = 0x400000, 64 + 56 + len(code)
    header = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
                         2, 62, 1, base + 120, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    path.write_bytes(header + phdr + code)
    path.chmod(0o755)
    return str(path)


def test_allow_list_minimum_is_enough_to_exec(tmp_path):
    """An empty allow-list: the child can still report a failed execve, then execve a program
    that only exits. Everything else the program does is the allow-list's business."""
    def body():
        try:
            os.execv("/nonexistent", ["/nonexistent"])
        except OSError as exc:
            return [exc.errno, syscall(SYS["getpid"])]

    empty = SeccompPlan("allow-list", ())
    assert in_child(body, empty).result == [errno.ENOENT, [-1, errno.EPERM]]
    prog = tiny_static_program(tmp_path / "exit42")
    assert subprocess.run([prog]).returncode == 42
    assert in_child(lambda: os.execv(prog, [prog]), empty).exitcode == 42


# --- other architectures ---------------------------------------------------------------------


def int80_getpid() -> int:
    """getpid through the i386 entry (int 0x80) from this 64-bit process."""
    code = bytes([0xB8, 20, 0, 0, 0,  # mov eax, 20 (i386 getpid)
                  0xCD, 0x80,  # int 0x80
                  0xC3])  # ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_int)(addr)()


def test_control_other_abis_without_filter():
    r = in_child(lambda: [int80_getpid() == os.getpid(), syscall(X32_SYSCALL_BIT | 39)])
    assert r.result[0] is True  # IA32 emulation is on: int 0x80 really reaches the kernel
    assert r.signal is None


@pytest.mark.parametrize("plan", [DEFAULT, SeccompPlan("allow-list", SMALL)],
                         ids=["deny-list", "allow-list"])
@pytest.mark.parametrize("call", [int80_getpid, lambda: syscall(X32_SYSCALL_BIT | 39)],
                         ids=["i386 int 0x80", "x32"])
def test_other_abi_kills_the_process(plan, call):
    child = in_child(call, plan)
    assert child.signal == signal.SIGSYS and child.result is None


def test_other_abi_goes_through_the_bad_arch_action():
    """With another bad-arch action the same calls return it: the kill above is that action."""
    plan = replace(DEFAULT, other_arch="errno:EPERM")
    r = in_child(lambda: [int80_getpid(), syscall(X32_SYSCALL_BIT | 39)], plan)
    assert r.result == [-errno.EPERM, [-1, errno.EPERM]]  # int 0x80 returns -errno in eax


# --- the program itself ----------------------------------------------------------------------


def _pfc(plan: SeccompPlan) -> str:
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        seccomp.build(plan).main.export_pfc(out)
        out.seek(0)
        return out.read()


def test_export_bpf_is_deterministic():
    first = seccomp.export_bpf(DEFAULT)
    assert first == seccomp.export_bpf(DEFAULT)
    assert first == seccomp.export_bpf(replace(DEFAULT, syscalls=DEFAULT.syscalls[::-1]))
    insns = [struct.unpack("<HBBI", first[i:i + 8]) for i in range(0, len(first), 8)]
    assert insns[0] == (0x20, 0, 0, 4)  # load seccomp_data.arch
    assert insns[1][0] == 0x15 and insns[1][3] == 0xC000003E  # == AUDIT_ARCH_X86_64 or kill
    assert (0x35, X32_SYSCALL_BIT) in {(code, k) for code, _, _, k in insns}  # x32 check
    assert insns[-1] == (0x06, 0, 0, 0x80000000)  # RET KILL_PROCESS (bad arch)
    assert len(insns) < 200


def test_the_calls_whose_arguments_are_read_come_first_in_the_program():
    """Only the calls the kernel cannot answer from its action cache run the program: they come
    first (setsockopt, then openat: a server's per-request calls), the rest in any order."""
    import re

    order = re.findall(r'# filter for syscall "(\w+)"', _pfc(DEFAULT))
    checked = [name for name in seccomp.ARGUMENT_CHECKED if name in order]
    assert checked[:2] == ["setsockopt", "openat"]
    assert order[:len(checked)] == checked


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(default_deny() + ["nosuchcall", "socketcall", "vm86", "getpid",
                                                  "clone", "ioctl", "clone3", "ipc"])),
       st.sampled_from(["deny-list", "allow-list"]))
def test_any_plan_builds(names, mode):
    """Unknown names and names of other architectures are skipped; overlaps are fine."""
    plan = SeccompPlan(mode, tuple(names))
    assert seccomp.export_bpf(plan) == seccomp.export_bpf(plan)


def test_actions():
    import pyseccomp

    assert seccomp.action("errno:EPERM") == seccomp.action("errno:1") == pyseccomp.ERRNO(1)
    assert seccomp.action("kill-process") == pyseccomp.KILL_PROCESS
    for bad in ("errno:ENOPE", "kill", "kill-process:1", ""):
        with pytest.raises(ValueError):
            seccomp.action(bad)
    with pytest.raises(ValueError):
        seccomp.build(SeccompPlan("maybe", ()))


def test_import_is_lean():
    code = "import sys, corral.launch.seccomp; assert 'pyseccomp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the setuid rules read a mode only where the kernel does ---------------------------------

O_CREAT, O_TMPFILE_BIT, O_DIRECTORY = 0o100, 0o20000000, 0o200000
SYS_OPEN, SYS_OPENAT, SYS_CREAT, SYS_MKDIRAT, SYS_FCHMOD, SYS_OPENAT2 = 2, 257, 85, 258, 91, 437
AT_FDCWD = -100


def test_a_read_only_open_with_a_garbage_mode_is_allowed(tmp_path):
    """jemalloc opens /proc files with a raw open(path, O_RDONLY) and leaves garbage in the
    mode register (05007 seen with redis-server). The kernel ignores the mode without O_CREAT
    or O_TMPFILE, so must the filter; with them, a setuid or setgid bit is refused."""
    existing = tmp_path / "existing"
    existing.write_text("x")
    path = ctypes.create_string_buffer(str(existing).encode())
    new = {n: ctypes.create_string_buffer(str(tmp_path / n).encode())
           for n in ("open", "openat", "creat", "tmpfile", "dir", "plain")}
    where = ctypes.create_string_buffer(str(tmp_path).encode())

    def opened(ret_err):
        ret, err = ret_err
        if ret >= 0:
            os.close(ret)
        return [min(ret, 0), err]

    def body():
        a, d = ctypes.addressof, os.O_RDONLY
        return {
            "open ro": opened(syscall(SYS_OPEN, a(path), d, 0o5007)),
            "openat ro": opened(syscall(SYS_OPENAT, AT_FDCWD, a(path), d, 0o6755)),
            "openat ro high mode": opened(syscall(SYS_OPENAT, AT_FDCWD, a(path), d,
                                                  0x7FA77E1A6A07)),
            "open creat": opened(syscall(SYS_OPEN, a(new["open"]), O_CREAT | os.O_WRONLY,
                                         0o4755)),
            "openat creat setgid": opened(syscall(SYS_OPENAT, AT_FDCWD, a(new["openat"]),
                                                  O_CREAT | os.O_WRONLY, 0o2755)),
            "openat tmpfile": opened(syscall(SYS_OPENAT, AT_FDCWD, a(where),
                                             O_TMPFILE_BIT | O_DIRECTORY | os.O_WRONLY, 0o4755)),
            "creat": opened(syscall(SYS_CREAT, a(new["creat"]), 0o4755)),
            "mkdirat": opened(syscall(SYS_MKDIRAT, AT_FDCWD, a(new["dir"]), 0o2755)),
            "openat creat plain": opened(syscall(SYS_OPENAT, AT_FDCWD, a(new["plain"]),
                                                 O_CREAT | os.O_WRONLY, 0o755)),
            # openat2's mode is in memory seccomp cannot read: ENOSYS, programs fall back
            "openat2": opened(syscall(SYS_OPENAT2, AT_FDCWD, a(path), 0, 24)),
        }

    r = in_child(body, DEFAULT).result
    assert r.pop("open ro") == r.pop("openat ro") == r.pop("openat ro high mode") == [0, 0]
    assert r.pop("openat creat plain") == [0, 0]
    assert r.pop("openat2") == [-1, errno.ENOSYS]
    assert r == dict.fromkeys(r, [-1, errno.EPERM]), r
    assert not (tmp_path / "open").exists() and not (tmp_path / "creat").exists()

"""Escapes through the kernel: privileges left, system calls that open new attack surface or act
on the whole host, other processes, /proc and /sys, the terminal.

The attempts run in one `corral exec` (ATTACK, once per module); each is its own test, and the
host is checked where the attempt would have changed it."""

from __future__ import annotations

import os
import pty
import socket
import time
import tty

import pytest

from .attack import alive, blocked, returned

pytestmark = pytest.mark.root

# System calls the default seccomp policy refuses (EPERM) or that need a capability the process
# does not have. name -> (the call, as Python in the attack script, expected outcome). Numbers
# are x86_64's.
SYSCALLS = {
    # new namespaces: a user namespace would hand out every capability inside it
    "unshare_user_namespace": ("syscall(272, 0x10000000)", "EPERM"),
    "unshare_mount_namespace": ("syscall(272, 0x00020000)", "EPERM"),
    "unshare_network_namespace": ("syscall(272, 0x40000000)", "EPERM"),
    "clone_new_user_namespace": ("clone_child(0x10000000)", "EPERM"),
    "clone_new_pid_namespace": ("clone_child(0x20000000)", "EPERM"),
    # clone3 passes its flags in memory, out of seccomp's sight: ENOSYS makes libc use clone
    "clone3_new_user_namespace": ("clone3_child(0x10000000)", "ENOSYS"),
    "setns_own_mount_namespace": ("syscall(308, os.open('/proc/self/ns/mnt', os.O_RDONLY), 0)",
                                  "EPERM"),
    # another process: PID 1 here is the service's own program, the only one it can name
    "open_pid_1_mount_namespace": ("os.open('/proc/1/ns/mnt', os.O_RDONLY)", "EACCES"),
    "ns_get_parent_of_own_pid_namespace": (
        "__import__('fcntl').ioctl(os.open('/proc/self/ns/pid', os.O_RDONLY), 0xB702)", "EPERM"),
    "ptrace_traceme": ("syscall(101, 0, 0, 0, 0)", "EPERM"),
    "ptrace_attach_pid_1": ("syscall(101, 16, 1, 0, 0)", "EPERM"),
    "ptrace_seize_pid_1": ("syscall(101, 0x4206, 1, 0, 0)", "EPERM"),
    "process_vm_readv_pid_1": ("syscall(310, 1, iovec(), 1, iovec(), 1, 0)", "EPERM"),
    "write_proc_1_mem": ("open('/proc/1/mem', 'r+b')", "EACCES"),
    "pidfd_getfd_from_pid_1": ("syscall(438, os.pidfd_open(1), 0, 0)", "EPERM"),
    "kcmp_pid_1": ("syscall(312, 1, os.getpid(), 0, 0, 0)", "EPERM"),
    # kernel attack surface
    "keyctl_session_keyring": ("syscall(250, 0, -3, 1, 0, 0)", "EPERM"),
    "add_key": ("syscall(248, b'user', b'escape', b'x', 1, -3)", "EPERM"),
    "request_key": ("syscall(249, b'user', b'escape', None, 0)", "EPERM"),
    "bpf_map_create": ("syscall(321, 0, zeros(72), 72)", "EPERM"),
    "bpf_prog_load": ("syscall(321, 5, zeros(144), 144)", "EPERM"),
    "io_uring_setup": ("syscall(425, 8, zeros(120))", "EPERM"),
    "userfaultfd": ("syscall(323, 0)", "EPERM"),
    "perf_event_open": ("syscall(298, zeros(128), 0, -1, -1, 0)", "EPERM"),
    "fanotify_init": ("syscall(300, 0, 0)", "EPERM"),
    "open_by_handle_at": ("syscall(304, -100, zeros(136), 0)", "EPERM"),
    "name_to_handle_at": ("syscall(303, -100, b'/', zeros(136), zeros(4), 0)", "EPERM"),
    "lookup_dcookie": ("syscall(212, 0, None, 0)", "EPERM"),
    "personality_read_implies_exec": ("syscall(135, 0x0400000)", "EPERM"),
    # the whole host
    "init_module": ("syscall(175, zeros(64), 64, b'')", "EPERM"),
    "finit_module": ("syscall(313, os.open('/usr/bin/python3.11', os.O_RDONLY), b'', 0)",
                     "EPERM"),
    "delete_module": ("syscall(176, b'nf_tables', 0)", "EPERM"),
    "kexec_load": ("syscall(246, 0, 0, None, 0)", "EPERM"),
    "kexec_file_load": ("syscall(320, -1, -1, 0, b'', 2)", "EPERM"),
    "reboot": ("syscall(169, 0xfee1dead, 672274793, 0x4321FEDC, None)", "EPERM"),
    "swapon": ("syscall(167, b'/tmp/swap', 0)", "EPERM"),
    "acct": ("syscall(163, b'/tmp/acct')", "EPERM"),
    "quotactl": ("syscall(179, 0x800002, b'/', 0, None)", "EPERM"),
    "iopl": ("syscall(172, 3)", "EPERM"),
    "ioperm": ("syscall(173, 0x80, 8, 1)", "EPERM"),
    "vhangup": ("syscall(153)", "EPERM"),
    "setdomainname": ("syscall(171, b'evil', 4)", "EPERM"),
    # becoming root
    "setuid_0": ("syscall(105, 0)", "EPERM"),
    "setgid_0": ("syscall(106, 0)", "EPERM"),
    "setresuid_0": ("syscall(117, 0, 0, 0)", "EPERM"),
    "setgroups_0": ("syscall(116, 1, struct.pack('I', 0))", "EPERM"),
    "setfsuid_0": ("setfsuid_0()", "EPERM"),
    "capset_all": ("syscall(126, struct.pack('Ii', 0x20080522, 0), b'\\xff' * 24)", "EPERM"),
}

ATTACK = r'''
import fcntl, signal, stat, subprocess, time

def zeros(n):
    return ctypes.create_string_buffer(n)

def iovec():
    buf = ctypes.create_string_buffer(64)
    return struct.pack("QQ", ctypes.addressof(buf), 64)

def clone_child(flags):
    pid = syscall(56, flags | signal.SIGCHLD, 0, 0, 0, 0)  # fork-like: no new stack
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid

def clone3_child(flags):
    args = ctypes.create_string_buffer(88)  # struct clone_args
    struct.pack_into("QQQQQ", args, 0, flags, 0, 0, 0, signal.SIGCHLD)
    pid = syscall(435, args, 88)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid

def setfsuid_0():
    syscall(122, 0)  # setfsuid returns the old fsuid, never an error: check the effect
    if syscall(122, -1) == 0:
        return "fsuid 0"
    raise OSError(errno.EPERM, "fsuid unchanged")

for _name, _call in PARAMS["syscalls"].items():
    attempt(_name)(lambda _call=_call: eval(_call))

# ---- who it is ------------------------------------------------------------------------------
@attempt("identity")
def _():
    return {"uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups()}

@attempt("status")
def _():
    return dict(line.rstrip("\n").split(":\t", 1) for line in open("/proc/self/status")
                if ":\t" in line)

@attempt("hostname_after_sethostname")
def _():
    try:
        socket.sethostname("pwned")
    except OSError as exc:
        return {"sethostname": errname(exc), "hostname": socket.gethostname()}
    return {"sethostname": "done", "hostname": socket.gethostname()}

@attempt("sethostname")
def _():
    return syscall(170, b"pwned", 5)

# ---- the clock and the kernel log -----------------------------------------------------------
@attempt("settimeofday_to_2000")
def _():
    return syscall(164, struct.pack("qq", 946684800, 0), None)

@attempt("clock_settime_to_2000")
def _():
    return syscall(227, 0, struct.pack("qq", 946684800, 0))

@attempt("adjtimex_set_offset")
def _():
    buf = ctypes.create_string_buffer(208)
    struct.pack_into("Iq", buf, 0, 0x0001, 500000)  # ADJ_OFFSET
    return syscall(159, buf)

@attempt("clock_adjtime")
def _():
    buf = ctypes.create_string_buffer(208)
    struct.pack_into("Iq", buf, 0, 0x0001, 500000)
    return syscall(305, 0, buf)

@attempt("syslog_read_all")
def _():
    return syscall(103, 3, zeros(4096), 4096)

@attempt("read_proc_kmsg")
def _():
    return open("/proc/kmsg", "rb").read(1)

@attempt("read_dev_kmsg")
def _():
    return open("/dev/kmsg", "rb").read(1)

# ---- /proc/sys and friends ------------------------------------------------------------------
for _name, _path, _value in (
        ("write_core_pattern", "/proc/sys/kernel/core_pattern", "|/tmp/evil %p"),
        ("disable_aslr", "/proc/sys/kernel/randomize_va_space", "0"),
        ("write_proc_sys_hostname", "/proc/sys/kernel/hostname", "pwned"),
        ("drop_caches", "/proc/sys/vm/drop_caches", "3"),
        ("write_proc_sys_ip_forward", "/proc/sys/net/ipv4/ip_forward", "1"),
        ("write_sysrq_trigger", "/proc/sysrq-trigger", "h"),
        ("write_oom_score_adj_down", "/proc/self/oom_score_adj", "-1000"),
        ("write_proc_self_attr", "/proc/self/attr/current", "unconfined"),
        ("write_proc_self_setgroups", "/proc/self/setgroups", "allow"),
        ("write_proc_self_uid_map", "/proc/self/uid_map", "0 0 1"),
        ("write_proc_self_mem", "/proc/self/mem", "x")):
    def _write(path=_path, value=_value):
        with open(path, "w") as handle:
            return handle.write(value)
    attempt(_name)(_write)

@attempt("sys_fs_cgroup")
def _():
    return os.listdir("/sys/fs/cgroup")

# ---- other processes ---------------------------------------------------------------------------
@attempt("visible_processes")
def _():
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out[entry] = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")[0].decode()
            except OSError as exc:
                out[entry] = errname(exc)
    return {"pids": out, "self": os.getpid(), "ppid": os.getppid()}

VICTIM = PARAMS["victim"]

@attempt("proc_of_host_process")
def _():
    return os.listdir(f"/proc/{VICTIM}")

@attempt("kill_host_process")
def _():
    return os.kill(VICTIM, signal.SIGKILL)

@attempt("pidfd_open_host_process")
def _():
    return os.pidfd_open(VICTIM)

@attempt("host_process_mem")
def _():
    return open(f"/proc/{VICTIM}/mem", "r+b")

@attempt("kill_pid_1")  # the service's own program, in another Landlock domain
def _():
    return os.kill(1, signal.SIGKILL)

@attempt("pidfd_send_signal_pid_1")
def _():
    return signal.pidfd_send_signal(os.pidfd_open(1), signal.SIGKILL)

@attempt("kill_everything")
def _():
    return os.kill(-1, signal.SIGKILL)

@attempt("ptrace_pid_1_through_proc_environ")
def _():
    return open("/proc/1/environ", "rb").read()

# ---- the terminal ------------------------------------------------------------------------------
TIOCSTI = 0x5412

@attempt("tiocsti_stdin")
def _():
    return fcntl.ioctl(0, TIOCSTI, b"X")

@attempt("tiocsti_stdout")
def _():
    return fcntl.ioctl(1, TIOCSTI, b"X")

@attempt("tiocsti_stderr")
def _():
    return fcntl.ioctl(2, TIOCSTI, b"X")

@attempt("tiocsti_high_bits")  # the kernel ignores the upper 32 bits of the command
def _():
    char = ctypes.c_char(b"X")
    return syscall(16, 0, TIOCSTI | (1 << 32), ctypes.byref(char))

@attempt("open_dev_tty")
def _():
    return os.open("/dev/tty", os.O_RDWR)

# ---- the other ABIs: 32-bit int 0x80 and x32 numbers bypass a native-only filter ---------------
INT80 = (
    "import ctypes, mmap\n"
    "code = bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3])  # mov eax, 20 (getpid); int 0x80\n"
    "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "m.write(code)\n"
    "f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n"
    "print('SURVIVED', f())\n")
X32 = ("import ctypes; libc = ctypes.CDLL(None)\n"
       "print('SURVIVED', libc.syscall(ctypes.c_long(0x40000000 | 39)))\n")

def killed_by(code):
    done = subprocess.run(["/usr/bin/python3.11", "-I", "-c", code], capture_output=True)
    return {"returncode": done.returncode, "stdout": done.stdout.decode()[-200:]}

@attempt("i386_int80_syscall")
def _():
    return killed_by(INT80)

@attempt("x32_syscall")
def _():
    return killed_by(X32)
'''


@pytest.fixture(scope="module")
def attacked(svc, victim):
    svc.before_kernel = {
        "time": time.time(), "monotonic": time.monotonic(), "hostname": socket.gethostname(),
        "core_pattern": open("/proc/sys/kernel/core_pattern").read(),
        "aslr": open("/proc/sys/kernel/randomize_va_space").read(),
        "app": svc.app()["pid"],
    }
    return svc.attack(ATTACK, params={"syscalls": {k: v[0] for k, v in SYSCALLS.items()},
                                      "victim": victim.pid})


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_dangerous_system_call_is_refused(attacked, name):
    blocked(attacked, name, SYSCALLS[name][1])


# ---- who it is

def test_not_root(attacked, svc):
    uid = svc.app()["uid"]
    ids = returned(attacked, "identity")
    assert uid != 0 and ids["uid"] == [uid, uid, uid]
    assert ids["gid"][0] != 0 and len(set(ids["gid"])) == 1 and ids["groups"] == []


def test_no_capability_left(attacked):
    status = returned(attacked, "status")
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[field] == "0000000000000000", field


def test_no_new_privs_and_seccomp_filter(attacked):
    status = returned(attacked, "status")
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_sethostname(attacked, svc):
    blocked(attacked, "sethostname", "EPERM")
    assert returned(attacked, "hostname_after_sethostname") == {
        "sethostname": "EPERM", "hostname": svc.name}
    assert socket.gethostname() == svc.before_kernel["hostname"]


# ---- the clock and the kernel log

@pytest.mark.parametrize("name", ["settimeofday_to_2000", "clock_settime_to_2000",
                                  "adjtimex_set_offset", "clock_adjtime"])
def test_clock_cannot_be_changed(attacked, svc, name):
    blocked(attacked, name, "EPERM")
    before = svc.before_kernel
    expected = before["time"] + (time.monotonic() - before["monotonic"])
    assert abs(time.time() - expected) < 5


@pytest.mark.parametrize("name, expected", [
    ("syslog_read_all", "EPERM"),
    ("read_proc_kmsg", "EACCES"),  # root's file (and Landlock: read-only /proc)
    ("read_dev_kmsg", "ENOENT"),
])
def test_kernel_log_is_not_readable(attacked, name, expected):
    blocked(attacked, name, expected)


# ---- /proc/sys and other kernel knobs

@pytest.mark.parametrize("name", ["write_core_pattern", "disable_aslr",
                                  "write_proc_sys_hostname", "drop_caches",
                                  "write_proc_sys_ip_forward", "write_oom_score_adj_down",
                                  "write_proc_self_attr", "write_proc_self_setgroups",
                                  "write_proc_self_uid_map", "write_proc_self_mem"])
def test_proc_is_read_only(attacked, name):
    blocked(attacked, name, "EACCES")  # Landlock: /proc is read-only (and most is root's)


def test_host_kernel_knobs_unchanged(attacked, svc):
    assert open("/proc/sys/kernel/core_pattern").read() == svc.before_kernel["core_pattern"]
    assert open("/proc/sys/kernel/randomize_va_space").read() == svc.before_kernel["aslr"]


def test_sysrq_trigger(attacked):
    # ENOENT where the kernel has no magic SysRq (this test machine's), EACCES elsewhere
    blocked(attacked, "write_sysrq_trigger", "ENOENT", "EACCES")


def test_no_cgroup_filesystem_inside(attacked):
    blocked(attacked, "sys_fs_cgroup", "ENOENT")


# ---- other processes

def test_only_its_own_pid_namespace_is_visible(attacked, svc, victim):
    seen = returned(attacked, "visible_processes")
    assert seen["ppid"] == 0  # its parent is outside its PID namespace
    assert str(victim.pid) not in seen["pids"] and str(os.getpid()) not in seen["pids"]
    assert seen["pids"]["1"] == "/usr/bin/python3.11"  # the service's own program
    assert set(seen["pids"]) <= {"1", str(seen["self"])}


@pytest.mark.parametrize("name, expected", [
    ("proc_of_host_process", "ENOENT"),
    ("kill_host_process", "ESRCH"),
    ("pidfd_open_host_process", "ESRCH"),
    ("host_process_mem", "ENOENT"),
])
def test_host_process_cannot_be_reached(attacked, victim, name, expected):
    blocked(attacked, name, expected)
    assert alive(victim.pid)


@pytest.mark.parametrize("name, expected", [
    ("kill_pid_1", "EPERM"),  # Landlock scopes signals to its own domain
    ("pidfd_send_signal_pid_1", "EPERM"),
    ("kill_everything", "ESRCH"),  # kill(-1): nobody it may signal
    ("ptrace_pid_1_through_proc_environ", "EACCES"),
])
def test_the_service_program_cannot_be_signalled_or_read(attacked, svc, victim, name,
                                                         expected):
    blocked(attacked, name, expected)
    assert svc.app()["pid"] == svc.before_kernel["app"]
    assert svc.http("/health") == b"ok\n"
    assert alive(victim.pid)


# ---- the terminal

@pytest.mark.parametrize("name", ["tiocsti_stdin", "tiocsti_stdout", "tiocsti_stderr",
                                  "tiocsti_high_bits"])
def test_tiocsti_is_refused(attacked, name):
    blocked(attacked, name, "EPERM")  # seccomp refuses TIOCSTI whatever the fd is


def test_no_dev_tty(attacked):
    blocked(attacked, "open_dev_tty", "ENOENT")


def test_tiocsti_into_the_terminal_exec_was_run_from(svc):
    """An operator runs `corral exec` from a terminal: the attacker gets it as fd 0 and tries
    to push keystrokes into it (also after making it its controlling terminal)."""
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)  # every pushed byte would be readable at once, no echo
        results = svc.attack(r'''
import fcntl
TIOCSTI, TIOCSCTTY, TIOCLINUX = 0x5412, 0x540E, 0x541C

@attempt("isatty")
def _():
    return os.isatty(0)

@attempt("tiocsti")
def _():
    return fcntl.ioctl(0, TIOCSTI, b"X")

@attempt("take_as_controlling_terminal")
def _():
    return fcntl.ioctl(0, TIOCSCTTY, 0)

@attempt("tiocsti_as_controlling_terminal")
def _():
    for char in b"id\n":
        fcntl.ioctl(0, TIOCSTI, bytes([char]))

@attempt("tioclinux_paste")
def _():
    return fcntl.ioctl(0, TIOCLINUX, b"\x03")
''', stdin=slave)
        assert returned(results, "isatty") is True
        blocked(results, "tiocsti", "EPERM")
        blocked(results, "tiocsti_as_controlling_terminal", "EPERM")
        blocked(results, "tioclinux_paste", "EPERM")
        os.set_blocking(slave, False)
        with pytest.raises(BlockingIOError):  # nothing was injected into the terminal's input
            os.read(slave, 64)
    finally:
        os.close(master)
        os.close(slave)


# ---- other system call ABIs

@pytest.mark.parametrize("name", ["i386_int80_syscall", "x32_syscall"])
def test_other_syscall_abis_kill_the_process(attacked, name):
    assert returned(attacked, name) == {"returncode": -31, "stdout": ""}  # SIGSYS

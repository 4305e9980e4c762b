"""The sandbox each process gets, as plain data: computed from the manifest, applied by `launch`.

The default seccomp policy is a deny-list of system calls a contained server has no business
making: each group below says why. The filter returns EPERM (so a probing process gets a clean
error, and the watcher's log records it) and kills the process for calls of another architecture.
"""

from __future__ import annotations

from corral.core.record import field, record
from corral.plan.etc import dns_endpoints

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:  # the launch path imports this module: no pydantic at run time
    from corral.manifest.model import Manifest, Process

# Grouped so the documentation (docs/sandbox.md) and the plan can say why each call is denied.
DEFAULT_DENY: dict[str, tuple[str, ...]] = {
    "mounts and namespaces (escape the minimal root)": (
        "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
        "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    ),
    "debugging other processes": (
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    ),
    "kernel attack surface rarely needed by servers": (
        "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "keyctl", "add_key", "request_key", "lookup_dcookie",
        "fanotify_init", "name_to_handle_at", "open_by_handle_at",
    ),
    "whole-host operations": (
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "quotactl_fd",
        "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
        "setdomainname", "iopl", "ioperm", "personality", "uselib", "vhangup", "nfsservctl",
    ),
}
# clone3 takes its flags in memory, which seccomp cannot inspect, so it gets ENOSYS (glibc then
# falls back to clone, whose flags seccomp can see); clone itself is allowed unless it asks for
# CLONE_NEWUSER
# or another namespace flag, which `launch` filters by argument.
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
# (CLONE_NEWTIME only exists for clone3 and unshare, both denied.)
# openat2 takes its flags and mode in memory too (struct open_how), so the `setuid` rule could
# not see a setuid mode through it: it gets ENOSYS as well, and programs that use it (for
# RESOLVE_* flags) fall back to openat, as they must on kernels older than 5.6.


def default_deny() -> list[str]:
    return sorted({name for names in DEFAULT_DENY.values() for name in names})


@record(frozen=True)
class SeccompPlan:
    mode: str  # "deny-list" (the default policy) or "allow-list" (the manifest's own list)
    syscalls: tuple[str, ...]
    deny_action: str = "errno:EPERM"
    enosys: tuple[str, ...] = ("clone3", "openat2")
    other_arch: str = "kill-process"
    # False: setsockopt's multicast joins are refused (the kernel's IGMP/MLD reports for a
    # joined group carry its address, owned by no socket: no per-user rule can stop them).
    multicast: bool = False


@record(frozen=True)
class LandlockPlan:
    """Paths are inside the service's root. Ports are what the ABI >= 4 network rules allow."""

    read_exec: tuple[str, ...]
    read_only: tuple[str, ...]
    read_write: tuple[str, ...]
    tcp_bind: tuple[int, ...]
    tcp_connect: tuple[int, ...]
    scoped: tuple[str, ...] = ("abstract-unix-socket", "signal")


@record(frozen=True)
class SandboxPlan:
    process: str
    user: str
    command: tuple[str, ...]
    executables: tuple[str, ...]
    capabilities: tuple[str, ...]
    no_new_privs: bool
    namespaces: tuple[str, ...]
    volumes: tuple[tuple[str, str], ...]  # (path, "rw" | "ro")
    writable: tuple[str, ...]
    seccomp: SeccompPlan
    landlock: LandlockPlan
    limits: dict[str, float | int]
    cgroup: str
    environment: dict[str, str] = field(default_factory=dict)
    # The life cycle: how it is stopped and reloaded, and its one-shot setup (docs/manifest.md).
    stop_signal: str = "SIGTERM"
    stop_timeout: int = 10
    reload: str | tuple[str, ...] = "SIGHUP"
    setup: dict[str, object] | None = None


# Namespaces every process gets. The network namespace is the host's: per-user nftables rules
# (meta skuid) filter it, which is what the seeds ask for and keeps declared ports reachable.
NAMESPACES = ("mount", "pid", "ipc", "uts", "cgroup")
# Read-only for every process: what the dynamic loader and libc read at start-up, its own /proc
# and the device nodes. Besides these, a process reads what the manifest put in the image
# (`include`, `add`) and the volumes; nothing else of the root.
LIBRARY_DIRS = ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/etc", "/proc", "/dev")


def _port_numbers(specs) -> tuple[int, ...]:
    return tuple(sorted({n for s in specs if s.proto == "tcp" for n in range(s.first, s.last + 1)}))


def sandbox_for(m: Manifest, name: str, proc: Process, interpreters: tuple[str, ...] = (),
                setup_interpreters: tuple[str, ...] = ()) -> SandboxPlan:
    """`interpreters`: the ELF or #! interpreters of the process's executables, which the kernel
    opens for execution too (found by `plan`, which reads the image); `setup_interpreters`: those
    of its setup's own `exec`."""
    volumes = tuple((v.path, "rw" if v.owner == name else "ro") for v in m.all_volumes())
    # /dev: writes to null, full and the shm tmpfs; the /dev mount itself is read-only.
    run = {path for pname, path, _ in m.runtime_directories() if pname == name}
    rw = tuple(sorted({p for p, access in volumes if access == "rw"} | set(proc.writable)
                      | run | {"/tmp", "/dev"}))
    ro = tuple(sorted({p for p, access in volumes if access == "ro"} | set(LIBRARY_DIRS)
                      | set(m.image.include) | set(m.image.add)
                      | ({"/"} if m.image.source != "closure" and not m.image.include else set())))
    if proc.syscalls == "default":
        seccomp = SeccompPlan("deny-list", tuple(default_deny()), multicast=proc.multicast)
    else:
        seccomp = SeccompPlan("allow-list", tuple(sorted(set(proc.syscalls))),
                              multicast=proc.multicast)
    return SandboxPlan(
        process=name,
        user=m.user_of(name),
        command=tuple(proc.command),
        executables=tuple(proc.executables),
        capabilities=tuple(sorted(set(proc.capabilities))),
        no_new_privs=True,
        namespaces=NAMESPACES,
        volumes=volumes,
        writable=tuple(proc.writable),
        seccomp=seccomp,
        landlock=LandlockPlan(
            read_exec=tuple(sorted(set(proc.executables) | set(interpreters))),
            read_only=ro,
            read_write=rw,
            tcp_bind=_port_numbers(proc.listen),
            tcp_connect=_port_numbers([*proc.connect, *dns_endpoints(list(m.resolvers))]),
        ),
        limits=proc.limits.model_dump(),
        cgroup=f"corral/{m.name}/{name}",
        environment=dict(proc.environment),
        stop_signal=proc.stop_signal,
        stop_timeout=proc.stop_timeout,
        reload=proc.reload if isinstance(proc.reload, str) else tuple(proc.reload),
        setup=_setup(proc, interpreters, setup_interpreters),
    )


def _setup(proc: Process, interpreters: tuple[str, ...],
           setup_interpreters: tuple[str, ...]) -> dict[str, object] | None:
    """The setup's command and condition, and what it alone may execute: `exec` (the exec
    guard's list) and `read_exec` (its Landlock execute rights). The setup is a launch of its
    own, so a shell initdb needs is never in the long-running process's domain."""
    if not proc.setup:
        return None
    own = proc.setup.exec_ is not None
    executables = proc.setup.executables(proc.executables)
    return {"command": list(proc.setup.command), "creates": proc.setup.creates,
            "timeout": proc.setup.timeout, "exec": executables,
            "read_exec": sorted(set(executables)
                                | set(setup_interpreters if own else interpreters))}

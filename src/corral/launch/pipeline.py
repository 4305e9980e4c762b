"""Start one contained process, or run a command inside a running one's containment.

    supervisor ──fork──> holder: joins the cgroup (and the service's own network namespace,
                          network = "own"), unshares mount, PID, IPC, UTS and cgroup
                          namespaces, forks, waits and passes the exit status on
                          └──fork──> init (PID 1 of its namespace): /proc, pivot_root,
                                     hostname, rlimits, new session, user and capabilities,
                                     no_new_privs, Landlock, seccomp (last), execve

Everything that can fail before execve is reported through a close-on-exec pipe, so the
supervisor knows whether the program really started. Both children die with their parent
(PR_SET_PDEATHSIG), and when the init dies the kernel kills its whole PID namespace: no orphan
outlives the supervisor.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import socket
import struct
from collections.abc import Callable

from corral.core.record import record
from corral.host.runtime import ProcessSpec, ServiceSpec
from corral.kernel import notify
from corral.kernel import syscalls as kernel
from corral.launch import benchskip, bpf, cgprime, creds, landlock, mnt
from corral.plan.sandbox import LandlockPlan, SeccompPlan

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:  # a type only: the caller creates the cgroup and hands it in
    from typing import Any

    from corral.launch.cgroup import Cgroup

NAMESPACES = (kernel.CLONE_NEWNS | kernel.CLONE_NEWPID | kernel.CLONE_NEWIPC
              | kernel.CLONE_NEWUTS | kernel.CLONE_NEWCGROUP)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@record
class Spawned:
    """A process forked and setting itself up; its program's execve waits for `finish`."""
    name: str
    holder: int
    sock: socket.socket  # brings the seccomp listener once the filter is loaded
    err_r: int  # the error pipe: EOF when execve succeeded, else the failed stage's message
    pid_r: int  # the init's host pid, from the holder


@record
class Started:
    holder: int  # the holder's pid: its exit status is the process's
    init: int  # host pid of the contained program (PID 1 inside)
    notify_fd: int = -1  # seccomp listener for its execve calls (the `exec` tripwire)


EXEC_CALLS = ("execve", "execveat")


class LaunchError(OSError):
    """What failed in a child before the program ran; `stage` is where ("namespaces",
    "sandbox", "exec"), so `corral exec` can tell "not found" from its own failure."""

    stage = ""


def landlock_plan(proc: ProcessSpec) -> LandlockPlan:
    return LandlockPlan(**{k: tuple(v) for k, v in proc.landlock.items()})


def seccomp_plan(proc: ProcessSpec) -> SeccompPlan:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v  # as ProcessSpec has it
                              for k, v in proc.seccomp.items()}
    return SeccompPlan(**fields)


def seccomp_cache(spec: ServiceSpec, proc: ProcessSpec) -> str:
    """Where the process's compiled filters are kept (launch.bpf): the service's state
    directory, root's, removed with the service by `uninstall --purge`."""
    return os.path.join(spec.state, "seccomp", f"{proc.name}.bpf")


def volumes_of(spec: ServiceSpec) -> list[mnt.VolumeMount]:
    """A sized volume's overlay takes its data and work directories through the loop mount:
    an overlay's upper and work directories must be on one mount (host.loopfs)."""
    out = []
    for v in spec.volumes:
        if v.size:
            from corral.host import loopfs

            fs = loopfs.sized(spec.state, v.store)
            out.append(mnt.VolumeMount(v.path, str(fs.data), v.owner, str(fs.work)))
        else:
            out.append(mnt.VolumeMount(v.path, os.path.join(spec.state, "volumes", v.store),
                                       v.owner, os.path.join(spec.state, "volume-work", v.store)))
    return out


# ---------------------------------------------------------------- the start sequence, as data
#
# What a process goes through between fork and execve, in order, as tables run by one loop
# (nsjail's containProc, minijail_enter): the security-critical order is reviewable in one
# place, a failure is labelled with its step, and `corral exec` says "the same, minus the root"
# instead of repeating it. Each step acts on a `Jail`, the one value both paths build.


@record
class Jail:
    """What the steps of one contained process act on (minijail's struct minijail)."""
    proc: ProcessSpec
    filt: bpf.Programs  # compiled in the supervisor (or its cache), loaded by the child
    cgroup: Cgroup
    keep_fds: tuple[int, ...]  # descriptors that survive the close of all others
    notify_sock: socket.socket | None  # where the seccomp listener is handed up
    out_fd: int = -1  # the output pipe (stdout, stderr); -1: keep the caller's
    service: ServiceSpec | None = None  # start only: the service's root and name
    volumes: tuple[mnt.VolumeMount, ...] = ()  # start only
    ns_fds: tuple[tuple[int, int], ...] = ()  # exec only: the running process's namespaces
    listener: int = -1  # set by the seccomp step: the exec notifications' descriptor


Step = tuple[str, Callable[[Jail], None]]


def _die_with_parent(jail: Jail) -> None:
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)


def _join_cgroup(jail: Jail) -> None:
    jail.cgroup.add(os.getpid())  # before unsharing, so the cgroup namespace is rooted here


def _join_network(jail: Jail) -> None:
    """network = "own": into the service's namespace (host.netns made it) while still root,
    before the other unshares; the supervisor stays in the host's."""
    if jail.service is not None and jail.service.own_network:
        fd = os.open(jail.service.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            kernel.setns(fd, kernel.CLONE_NEWNET)
        finally:
            os.close(fd)


def _unshare(jail: Jail) -> None:
    kernel.unshare(namespaces(benchskip.skipped()))


SKIPPABLE_NAMESPACES = {"pidns": kernel.CLONE_NEWPID, "ipcns": kernel.CLONE_NEWIPC,
                        "utsns": kernel.CLONE_NEWUTS, "cgroupns": kernel.CLONE_NEWCGROUP}


def namespaces(skipped: frozenset[str]) -> int:
    """NAMESPACES, less those a benchmark's attribution run skips (benchskip; never the
    mount namespace)."""
    flags = NAMESPACES
    for name, flag in SKIPPABLE_NAMESPACES.items():
        if name in skipped:
            flags &= ~flag
    return flags


def _join_namespaces(jail: Jail) -> None:
    for fd, flag in jail.ns_fds:
        kernel.setns(fd, flag)  # mnt last: it also moves our root and cwd into it
        os.close(fd)


def _enter_root(jail: Jail) -> None:
    assert jail.service is not None  # a start's jail always names its service
    mnt.enter_root(str(jail.service.root), jail.proc.name, list(jail.volumes))


def _hostname(jail: Jail) -> None:
    assert jail.service is not None
    if benchskip.skips("utsns"):  # bench-only: it would be the host's name
        return
    socket.sethostname(jail.service.service)


def _memfd_noexec(jail: Jail) -> None:
    """vm.memfd_noexec=2 (per PID namespace, kernel 6.3+): memfds can never be executed, so
    nothing the process writes into memory can be run as a program."""
    if benchskip.skips("pidns"):  # bench-only: it would be the host's setting
        return
    try:
        with open("/proc/sys/vm/memfd_noexec", "w") as handle:
            handle.write("2")
    except OSError:
        pass  # older kernels: Landlock still refuses to execute a memfd


def _cwd_root(jail: Jail) -> None:
    os.chdir("/")


def _rlimits(jail: Jail) -> None:
    nofile = int(jail.proc.limits.get("open_files", 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files with the service's secrets


def _fds(jail: Jail) -> None:
    """stdin from /dev/null, stdout and stderr to the output pipe; every other descriptor but
    the kept ones closed, so nothing of the supervisor leaks in."""
    if jail.out_fd >= 0:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(jail.out_fd, 1)
        os.dup2(jail.out_fd, 2)
    top = os.sysconf("SC_OPEN_MAX")
    keep = sorted(set(jail.keep_fds) | {0, 1, 2})
    start = 0
    for fd in keep + [top]:
        if start < fd:
            os.closerange(start, fd)
        start = fd + 1


def _session(jail: Jail) -> None:
    if os.getsid(0) != os.getpid():
        os.setsid()  # a new session: no controlling terminal to inject keystrokes into


def _keyring(jail: Jail) -> None:
    kernel.join_new_session_keyring()  # not root's: its keys would be the service's to read


def _creds(jail: Jail) -> None:
    creds.drop_privileges(jail.proc.uid, jail.proc.gid, jail.proc.capabilities)


def _landlock(jail: Jail) -> None:
    if not benchskip.skips("landlock"):  # bench-only attribution switch (benchskip.py)
        landlock.restrict(landlock_plan(jail.proc))


def _seccomp(jail: Jail) -> None:
    if benchskip.skips("seccomp"):  # bench-only: neither filter, so no listener either
        return
    jail.listener = bpf.load_all(jail.filt, main=not benchskip.skips("seccomp-main"))


def _hand_up_listener(jail: Jail) -> None:
    """Hand the exec listener up before the first execve blocks on it."""
    if jail.notify_sock is not None and benchskip.skips("seccomp"):
        jail.notify_sock.close()  # the supervisor reads "no listener" and lets it run
    elif jail.notify_sock is not None:
        if jail.listener < 0:
            raise OSError(errno.ENOENT, "seccomp: no listener for the exec notifications")
        notify.send_fd(jail.notify_sock, jail.listener)
        os.close(jail.listener)
        jail.notify_sock.close()


# The holder: in the service's cgroup, then in new namespaces (it forks the init there).
HOLDER: tuple[Step, ...] = (("pdeathsig", _die_with_parent), ("cgroup", _join_cgroup),
                            ("network", _join_network), ("namespaces", _unshare))
# The init, PID 1 of the new namespaces: its own root.
INIT: tuple[Step, ...] = (("pdeathsig", _die_with_parent), ("root", _enter_root),
                          ("hostname", _hostname), ("memfd", _memfd_noexec))
# Both the init and a `corral exec` command, as root inside the namespaces and the root. The
# sandbox comes last and in this order: creds drop root; the kernel clears the parent-death
# signal when the uid changes, so it is set again; Landlock, then seccomp (its filter would
# refuse the Landlock calls), then the listener goes up.
CONFINE: tuple[Step, ...] = (("rlimits", _rlimits), ("fds", _fds), ("session", _session),
                             ("keyring", _keyring), ("creds", _creds),
                             ("pdeathsig", _die_with_parent),
                             ("landlock", _landlock), ("seccomp", _seccomp),
                             ("notify", _hand_up_listener))
# `corral exec`: the holder joins the running process's cgroup and namespaces instead.
EXEC_HOLDER: tuple[Step, ...] = (("pdeathsig", _die_with_parent), ("cgroup", _join_cgroup),
                                 ("namespaces", _join_namespaces))
EXEC_CHILD: tuple[Step, ...] = (("pdeathsig", _die_with_parent), ("cwd", _cwd_root), *CONFINE)


def run_steps(steps: tuple[Step, ...], jail: Jail, at: list[str]) -> None:
    """Run the steps in order; `at[0]` names the one running, for the error report."""
    for name, step in steps:
        at[0] = name
        step(jail)


def _report(err_w: int, stage: str, exc: BaseException) -> None:
    try:
        # A step may name a better culprit than itself (landlock's grant failing on a file
        # mode is the image's problem, not Landlock's).
        stage = getattr(exc, "stage", stage)
        os.write(err_w, f"{stage}: {exc}".encode()[:4000])
    finally:
        os._exit(127)


def spawn(spec: ServiceSpec, proc: ProcessSpec, out_fd: int, cgroup: Cgroup) -> Spawned:
    """Fork the contained process and return at once; `finish` completes the start. It joins
    its cgroup (a first cgroup migration after a quiet while waits for an RCU grace period,
    ~10 ms, unless primed: launch.cgprime), namespaces, root and sandbox while
    the caller goes on (the supervisor starts its sensors meanwhile); nothing of the program
    runs before `finish` answers its execve."""
    # Compiled here (or read from the service's cache: launch.bpf), loaded there.
    filt = bpf.programs(seccomp_plan(proc), seccomp_cache(spec, proc), notify=EXEC_CALLS)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(proc.environment)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    jail = Jail(proc, filt, cgroup, (err_w, child_sock.fileno()), child_sock, out_fd,
                service=spec, volumes=tuple(volumes_of(spec)))
    cgprime.stop()  # the holder migrates next: priming has done its work (launch.cgprime)
    holder = os.fork()
    if holder == 0:
        at = ["fork"]
        try:
            os.close(err_r)
            os.close(pid_r)
            parent_sock.close()
            run_steps(HOLDER, jail, at)
            init = os.fork()
            if init == 0:
                run_steps(INIT + CONFINE, jail, at)
                at[0] = "exec"
                os.execve(proc.command[0], proc.command, env)
            child_sock.close()
            os.write(pid_w, struct.pack("i", init))
            os.close(pid_w)
            os.close(err_w)
            _wait_and_exit(init)
        except BaseException as exc:  # noqa: BLE001 - the child must never return
            _report(err_w, at[0], exc)
    os.close(err_w)
    os.close(pid_w)
    child_sock.close()
    return Spawned(proc.name, holder, parent_sock, err_r, pid_r)


def finish(spawned: Spawned, on_exec: Callable[[int], None]) -> Started:
    """Wait for a spawned process to reach its execve, let it run (on_exec answers the
    notification), and return once it has exec'd (or raise with the stage that failed)."""
    notify_fd: int | None = -1
    try:
        _, notify_fd = notify.recv_fd(spawned.sock)  # None: the child failed before the filter
        message = _await_exec(spawned.err_r, notify_fd, on_exec)
        raw = _read_all(spawned.pid_r)
    except BaseException:
        if notify_fd is not None and notify_fd >= 0:
            os.close(notify_fd)
        raise
    finally:
        abandon(spawned, kill=False)
    if message:
        os.waitpid(spawned.holder, 0)
        if notify_fd is not None:
            os.close(notify_fd)
        raise LaunchError(f"process {spawned.name}: {message.decode(errors='replace')}")
    return Started(spawned.holder, struct.unpack("i", raw)[0],
                   -1 if notify_fd is None else notify_fd)


def abandon(spawned: Spawned, kill: bool = True) -> None:
    """Close what `spawn` left open; with `kill`, also stop the process (its init dies with
    its holder) and reap it: for a start given up before `finish`."""
    for fd in (spawned.err_r, spawned.pid_r):
        try:
            os.close(fd)
        except OSError:
            pass
    spawned.sock.close()
    if kill:
        try:
            os.kill(spawned.holder, signal.SIGKILL)
            os.waitpid(spawned.holder, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _await_exec(err_r: int, notify_fd: int | None, on_exec: Callable[[int], None]) -> bytes:
    """Read the error pipe to its end (the exec succeeded, or a message), answering the exec
    notifications that arrive meanwhile: the program's own execve is one of them."""
    import selectors

    chunks: list[bytes] = []
    with selectors.DefaultSelector() as sel:
        sel.register(err_r, selectors.EVENT_READ, "err")
        if notify_fd is not None:
            sel.register(notify_fd, selectors.EVENT_READ, "notify")
        while True:
            for key, _ in sel.select():
                if key.data == "notify":
                    assert notify_fd is not None  # registered only when there is one
                    on_exec(notify_fd)
                    continue
                chunk = os.read(err_r, 4096)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_and_exit(pid: int) -> None:
    """The holder: pass the program's exit status on, as a shell would (128 + signal)."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
             else 128 + os.WTERMSIG(status))


NS_ORDER = (("cgroup", kernel.CLONE_NEWCGROUP), ("ipc", kernel.CLONE_NEWIPC),
            ("uts", kernel.CLONE_NEWUTS), ("pid", kernel.CLONE_NEWPID),
            ("net", kernel.CLONE_NEWNET),  # the host's, or the service's own (network = "own")
            ("mnt", kernel.CLONE_NEWNS))


def run_inside(proc: ProcessSpec, target: int, argv: list[str], cgroup: Cgroup,
               forward_notify: Callable[[int], None]) -> int:
    """`corral exec`: run argv in the namespaces, root, user, Landlock and seccomp of the
    running process `target` (host pid of its init), in its cgroup. Its exec notifications go
    to `forward_notify(fd)` (the service's supervisor, whose watcher answers them). Returns the
    exit code."""
    filt = bpf.compile_plan(seccomp_plan(proc), notify=EXEC_CALLS)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ns_fds = [(os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag)
              for name, flag in NS_ORDER]
    env = dict(proc.environment)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    jail = Jail(proc, filt, cgroup, (err_w, child_sock.fileno()), child_sock,
                ns_fds=tuple(ns_fds))
    holder = os.fork()
    if holder == 0:
        at = ["fork"]
        try:
            os.close(err_r)
            parent_sock.close()
            run_steps(EXEC_HOLDER, jail, at)
            child = os.fork()
            if child == 0:
                run_steps(EXEC_CHILD, jail, at)
                at[0] = "exec"
                os.execvpe(argv[0], argv, env | {"PATH": env.get("PATH", DEFAULT_PATH)})
            os.close(err_w)
            child_sock.close()
            _wait_and_exit(child)
        except BaseException as exc:  # noqa: BLE001 - the child must never return
            _report(err_w, at[0], exc)
    for fd, _ in ns_fds:
        os.close(fd)
    os.close(err_w)
    child_sock.close()
    try:
        _, notify_fd = notify.recv_fd(parent_sock)
        if notify_fd is not None:
            forward_notify(notify_fd)
            os.close(notify_fd)
        message = _read_all(err_r)
    finally:
        os.close(err_r)
        parent_sock.close()
    _, status = os.waitpid(holder, 0)
    if message:
        text = message.decode(errors="replace")
        error = LaunchError(text)
        error.stage = text.partition(":")[0]  # _report writes "STAGE: exception"
        found = re.search(r"\[Errno (\d+)\]", text)
        error.errno = int(found.group(1)) if found else None
        raise error
    code = os.waitstatus_to_exitcode(status)
    # The holder itself killed (a revert's cgroup kill): 128 + the signal, as a shell says it,
    # never a negative number that exit() would wrap (-9 became 247).
    return 128 - code if code < 0 else code

"""`corral learn`: run a program under observation and write the minimal manifest it needs.

The program runs as a user who is not root, in a throwaway view of the host where its writes
land in RAM (learn/view.py), while the administrator exercises it; corral watches it
with strace and turns what it saw into a manifest: the files it opened become `image.include`,
the directories it wrote become volumes, the ports it bound become `listen`, the addresses it
connected or sent to become `connect`, the programs it executed become `exec`, and every system
call it made becomes the `syscalls` allow-list.

Why strace (ptrace) and not one of the kernel's cheaper sensors: strace decodes every system call
with its arguments, so it reports the *path* of each open, stat and exec and the *socket address*
of each bind, connect and sendto, for every thread and child (-f). seccomp's log mode reports only
syscall numbers (no paths, no addresses); fanotify reports only successful accesses to files on
marked mounts (it misses failed opens, stat probes and everything about sockets); the audit
subsystem would need rules loaded host-wide. Learning is a one-off, so ptrace's overhead is fine.

What strace cannot show is recorded as a comment in the manifest for the administrator to review:
capabilities (only NET_BIND_SERVICE is inferred, from a bind below 1024) and code paths the
workload did not exercise.
"""

from __future__ import annotations

import datetime
import os
import posixpath
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.core.errors import RuntimeFailure, UsageError, escape_controls
from corral.core.text import show

# Mounted by corral in every service (its own instances) or never part of an image.
VIRTUAL = ("/proc", "/sys", "/dev")
# Scratch: the service has its own /tmp; writes there are not persistent state.
SCRATCH = ("/tmp", "/var/tmp")
# Runtime state that should not survive a restart: writable (lands in the delta), not a volume.
EPHEMERAL = ("/run", "/var/run")

# What the runtime needs whatever the trace shows: the way into the program (execve), out of it
# (exit, exit_group), back from signal handlers (rt_sigreturn), a restarted interrupted call
# (restart_syscall), and what the dynamic loader and libc's start-up always do. seccomp.py allows
# ALWAYS_ALLOWED anyway; listing them keeps the manifest honest on its own. sendmsg: after
# loading the filter, launch hands the seccomp listener to the supervisor over a socket (sendmsg
# with SCM_RIGHTS) before its execve: without it `up` fails with "sandbox: EPERM".
RUNTIME_SYSCALLS = (
    "sendmsg",
    "execve", "exit", "exit_group", "rt_sigreturn", "restart_syscall", "write", "read", "close",
    "brk", "mmap", "munmap", "mprotect", "arch_prctl", "set_tid_address", "set_robust_list",
    "rseq", "prlimit64", "openat", "newfstatat", "fstat", "pread64", "access", "getrandom",
    "futex", "rt_sigaction", "rt_sigprocmask",
    # What libc's allocator, clock and thread code call depending on conditions a workload does
    # not reliably reproduce (realloc of a large block is mremap, a trim is madvise, ...): a
    # contained run that differs in memory layout or timing must not trip the allow-list.
    "mremap", "madvise", "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep",
    "gettimeofday", "sched_yield", "sched_getaffinity", "getpid", "gettid", "getppid", "getuid",
    "geteuid", "getgid", "getegid", "uname", "sigaltstack", "lseek",
)

# Collapse a directory into one include when at least this many files under it were used and
# they are at least this share of the regular files below it: then the directory is the clearer
# statement and costs little. (A Python stdlib where 100 of 1,800 files were used stays a list.)
COLLAPSE_MIN_FILES = 4
COLLAPSE_MIN_SHARE = 0.5
# Never collapse these: they hold every package's files.
NEVER_COLLAPSE = ("/", "/usr", "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local",
                  "/usr/local/lib", "/usr/share", "/usr/bin", "/usr/sbin", "/bin", "/sbin",
                  "/etc", "/var", "/var/lib", "/opt", "/srv", "/home", "/root",
                  "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")

# corral writes the image's own user database (root and the service's users): never the host's.
HOST_ONLY = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>[a-z_0-9]+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?|0x[0-9a-f]+)"
                   r"(?P<after>.*)$", re.S)
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^<\.\.\. (?P<name>[a-z_0-9]+) resumed>(?P<rest>.*)$", re.S)
_STR = r'"((?:[^"\\]|\\.)*)"'
_FD = r"(-?\d+)(?:<(?P<fdpath>[^>]*)>)?"
_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
_ADDR4 = re.compile(r'sin_addr=inet_addr\("([^"]+)"\)')
_ADDR6 = re.compile(r'inet_pton\(AF_INET6,\s*"([^"]+)"')
_SOCK_KIND = re.compile(r"^\d+<(TCP|UDP|TCPv6|UDPv6|UDPLITE|UDPLITEv6)?[:>]?")
_LOCAL_PORT = re.compile(r"^\d+<(?:TCP|UDP)(?:v6)?:\[[^>\-]*:(\d+)\]")


@dataclass
class Observed:
    """What the trace showed, before it is turned into a manifest."""

    executed: list[str] = field(default_factory=list)  # successful execve paths, in order
    opened: set[str] = field(default_factory=set)  # files (and dirs) opened successfully
    statted: set[str] = field(default_factory=set)  # paths stat'd or access'd successfully
    written: set[str] = field(default_factory=set)  # paths created, written, removed, renamed
    listen: set[tuple[str, int]] = field(default_factory=set)  # (proto, port)
    connect: set[tuple[str, int, str]] = field(default_factory=set)  # (proto, port, address)
    # Datagrams sent from a socket bound to a port: replies if that port is a listen port.
    sent_from: dict[tuple[str, int, str], set[int]] = field(default_factory=dict)
    unix_connect: set[str] = field(default_factory=set)
    syscalls: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


def _unescape(text: str) -> str:
    return bytes(text, "utf-8").decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "replace")


def _absolute(path: str, base: str | None) -> str | None:
    if path.startswith("/"):
        return posixpath.normpath(path)
    if base and base.startswith("/"):
        return posixpath.normpath(posixpath.join(base, path))
    return None


def _first_fd_base(args: str) -> str | None:
    """The directory an *at() call's first argument names (-yy prints `-100</cwd>`)."""
    m = re.match(r"\s*(?:-?\d+|AT_FDCWD)<([^>]*)>", args)
    return m.group(1) if m else None


_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
_PATH_WRITERS = {"mkdir": 0, "rmdir": 0, "unlink": 0, "truncate": 0, "creat": 0,
                 "mknod": 0, "chmod": 0, "chown": 0, "lchown": 0, "utime": 0, "utimes": 0}
_AT_WRITERS = {"mkdirat", "unlinkat", "mknodat", "fchmodat", "fchownat", "utimensat"}
_STATS = {"stat", "lstat", "access", "readlink", "statfs"}
_AT_STATS = {"newfstatat", "statx", "faccessat", "faccessat2", "readlinkat"}


def parse_trace(lines: Iterable[str]) -> Observed:
    """Parse `strace -f -qq -yy -s 0` output (no -X raw: flags are symbolic)."""
    obs = Observed()
    pending: dict[str, str] = {}
    for raw in lines:
        raw = raw.rstrip("\n")
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = m.group("pid"), m.group("rest")
        if rest.endswith(_UNFINISHED):
            pending[pid] = rest[: -len(_UNFINISHED)]
            continue
        resumed = _RESUMED.match(rest)
        if resumed:
            head = pending.pop(pid, None)
            if head is None:
                obs.syscalls.add(resumed.group("name"))
                continue
            rest = head + resumed.group("rest")
        if rest.startswith(("---", "+++")):
            continue
        call = _CALL.match(rest)
        if not call:
            name = re.match(r"^([a-z_0-9]+)\(", rest)
            if name:
                obs.syscalls.add(name.group(1))
            continue
        _record(obs, call.group("name"), call.group("args"), call.group("ret"),
                call.group("after"))
    # A datagram sent from a listening UDP port is the server's reply to a client, not egress
    # (the firewall lets replies out as part of the established flow).
    for key, ports in obs.sent_from.items():
        if any(("udp", port) not in obs.listen for port in ports):
            obs.connect.add(key)
    return obs


def _record(obs: Observed, name: str, args: str, ret: str, after: str) -> None:
    obs.syscalls.add(name)
    ok = ret != "?" and not ret.startswith("-")
    if name in ("execve", "execveat"):
        paths = re.findall(_STR, args)
        if ok and paths:
            base = _first_fd_base(args) if name == "execveat" else None
            path = _absolute(_unescape(paths[0]), base)
            if path and path not in obs.executed:
                obs.executed.append(path)
        return
    if name in ("open", "openat", "openat2", "creat"):
        paths = re.findall(_STR, args)
        if not paths:
            return
        base = _first_fd_base(args) if name != "open" and name != "creat" else None
        path = _absolute(_unescape(paths[0]), base)
        if not ok or path is None:
            return
        obs.opened.add(path)
        if name == "creat" or any(flag in args for flag in _WRITE_FLAGS):
            obs.written.add(path)
        return
    if name in _STATS or name in _AT_STATS:
        paths = re.findall(_STR, args)
        if ok and paths and paths[0]:
            base = _first_fd_base(args) if name in _AT_STATS else None
            path = _absolute(_unescape(paths[0]), base)
            if path:
                obs.statted.add(path)
        return
    if ok and (name in _PATH_WRITERS or name in _AT_WRITERS or
               name in ("rename", "renameat", "renameat2", "link", "linkat", "symlink",
                        "symlinkat")):
        paths = [_unescape(p) for p in re.findall(_STR, args)]
        if name in ("symlink",):
            paths = paths[1:]
        base = _first_fd_base(args) if name.endswith("at") or name == "renameat2" else None
        # renameat/linkat: the second path is relative to the third argument's directory.
        dirs = re.findall(r"(?:^|,\s*)(?:-?\d+|AT_FDCWD)<([^>]*)>", args)
        for i, path in enumerate(paths):
            b = dirs[i] if name in ("renameat", "renameat2", "linkat") and i < len(dirs) else base
            absolute = _absolute(path, b)
            if absolute:
                obs.written.add(absolute)
        return
    if name in ("bind", "connect", "sendto", "sendmsg") and (ok or "EINPROGRESS" in after):
        kind = _SOCK_KIND.match(args)
        sock = kind.group(1) if kind else None
        if "AF_UNIX" in args:
            unix = re.search(r'sun_path=@?"([^"]*)"', args)
            if unix and name != "bind":
                obs.unix_connect.add(unix.group(1))
            return
        port = _PORT.search(args)
        if not port or not sock:
            return
        proto = "udp" if sock.startswith("UDP") else "tcp"
        number = int(port.group(1))
        addr = _ADDR4.search(args) or _ADDR6.search(args)
        if name == "bind":
            if number:
                obs.listen.add((proto, number))
        elif addr and number:
            key = (proto, number, addr.group(1))
            local = _LOCAL_PORT.match(args)
            if name in ("sendto", "sendmsg") and proto == "udp" and local:
                obs.sent_from.setdefault(key, set()).add(int(local.group(1)))
            else:
                obs.connect.add(key)


# -- from observations to a manifest ------------------------------------------------------------

def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _regular_files_below(directory: str, limit: int = 20000) -> int:
    count = 0
    for _top, _dirs, files in os.walk(directory):
        count += len(files)
        if count > limit:
            break
    return count


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def minimal_includes(obs: Observed, volumes: list[str], skip: Iterable[str] = ()) -> tuple[
        list[str], list[str]]:
    """Files the program used (opened, or stat'd regular files: Python checks a module's .py
    before it reads its .pyc), minus virtual file systems, scratch and volumes; then directories
    most of whose files were used, collapsed. Returns (include, collapsed directories)."""
    skip = set(skip)
    used = set()
    for path in obs.opened | obs.statted | set(obs.executed):
        # Files it only read count wherever they are, /tmp included (a program may run from a
        # checkout there); what it wrote is scratch or state, never image content.
        if _under(path, VIRTUAL + EPHEMERAL) or _under(path, volumes) or path in skip:
            continue
        if path in obs.written or path in HOST_ONLY:
            continue
        if _is_file(path):
            used.add(path)
    collapsed: list[str] = []
    by_dir: dict[str, set[str]] = {}
    for path in used:
        d = posixpath.dirname(path)
        while d not in ("/", ""):
            by_dir.setdefault(d, set()).add(path)
            d = posixpath.dirname(d)
    # Largest directories first: once one is taken, its subdirectories are moot.
    for d in sorted(by_dir, key=lambda p: (p.count("/"), p)):
        if d in NEVER_COLLAPSE or _under(d, collapsed) or _under(d, volumes):
            continue
        files = by_dir[d]
        if len(files) < COLLAPSE_MIN_FILES:
            continue
        total = _regular_files_below(d)
        if total and len(files) / total >= COLLAPSE_MIN_SHARE:
            collapsed.append(d)
    include = sorted(collapsed + [p for p in used if not _under(p, collapsed)])
    return include, sorted(collapsed)


def _volume_dirs(obs: Observed) -> tuple[list[str], list[str]]:
    """Directories written (a written file's directory): volumes, and ephemeral ones that only
    need to be writable (they land in the delta)."""
    dirs = set()
    for path in obs.written:
        if _under(path, VIRTUAL + SCRATCH):
            continue
        dirs.add(posixpath.dirname(path))
    dirs.discard("/")
    top = sorted(d for d in dirs if not any(_under(d, [o]) and d != o for o in dirs))
    volumes = [d for d in top if not _under(d, EPHEMERAL)]
    writable = [d for d in top if _under(d, EPHEMERAL)]
    return volumes, writable


def service_name_for(program: str) -> str:
    base = posixpath.basename(program).lower()
    name = re.sub(r"[^a-z0-9-]+", "-", base).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:16].rstrip("-")
    return name or "service"


def _unicode(value: str) -> str:
    """TOML holds Unicode text only: bytes of an argument or path that are not UTF-8 (which
    Python hands over surrogate-escaped) become U+FFFD; render() says so in a comment."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return value.encode("utf-8", "replace").decode("utf-8")


def _shown(value: str) -> str:
    """The exact bytes of a name that is not UTF-8, as \\xNN escapes, for a comment."""
    try:
        return show(os.fsencode(value))
    except UnicodeEncodeError:
        return escape_controls(_unicode(value))


def _comment(text: str) -> Any:
    """A comment line; control characters escaped, so a newline in an argument cannot end the
    comment and turn the rest of the line into TOML."""
    import tomlkit

    return tomlkit.comment(escape_controls(_unicode(text)))


def _array(values: Iterable[str]) -> Any:
    """A string array, on one line when short, else one item a line (as people write it)."""
    import tomlkit

    values = [_unicode(v) for v in values]
    array = tomlkit.array()
    array.extend(values)
    if values and sum(len(v) + 4 for v in values) >= 70:
        array.multiline(True)
    return array


def _endpoint(proto: str, port: int, addr: str) -> str:
    if addr in ("0.0.0.0", "::"):
        return f"{proto}/{port}"
    prefix = "/128" if ":" in addr else "/32"
    return f"{proto}/{port}@{addr}{prefix}"


@dataclass
class Learned:
    text: str  # the manifest
    violations: list[str]  # what containment would refuse: reason for exit code 3
    observed: Observed
    include: list[str]
    exit_status: int | None


def dangerous_calls() -> set[str]:
    from corral.plan.sandbox import default_deny

    return set(default_deny())


def render(name: str, process: str, command: list[str], obs: Observed,
           environment: dict[str, str], exit_status: int | None,
           started: datetime.datetime, duration: float, user: Any = None) -> Learned:
    volumes, writable = _volume_dirs(obs)
    include, collapsed = minimal_includes(obs, volumes)
    program = command[0]
    if program not in include and not _under(program, include):
        include.insert(0, program)
        include.sort()
    listen = sorted(obs.listen, key=lambda x: (x[0], x[1]))
    connect = sorted(obs.connect)
    capabilities = ["NET_BIND_SERVICE"] if any(p < 1024 for _, p in listen) else []
    dangerous = dangerous_calls()
    violations = [f"system call {c}: in corral's dangerous set, not allowed"
                  for c in sorted(obs.syscalls & dangerous)]
    seen = set(obs.syscalls)
    if "clone3" in seen:
        # corral answers clone3 with ENOSYS (its flags cannot be filtered): libc falls back to
        # clone, which the contained program will then call instead.
        seen.add("clone")
    syscalls = sorted((seen | set(RUNTIME_SYSCALLS)) - dangerous)
    executed = [p for p in obs.executed] or [program]
    if program not in executed:
        executed.insert(0, program)
    for path in executed:
        if path not in include and not _under(path, include):
            include.append(path)
    include = sorted(set(include))
    from corral.core.text import iso  # the one timestamp format

    now = iso(started.timestamp())
    # tomlkit writes the strings (every escape TOML needs) and keeps the comments, which are
    # half of what this file says to the person who reviews it.
    import tomlkit

    doc = tomlkit.document()
    header = [
        f"Learned by `corral learn` on {now} from {duration:.0f} s of observation of:",
        f"  {' '.join(command)}",
        f"The program exited with status {exit_status}." if exit_status is not None
        else "The program was stopped by corral at the end of the observation.",
        "It is the minimum that run needed: REVIEW it before you install it.",
        " - Code paths the workload did not exercise (error handling, rare requests, upgrades)",
        "   may need more files, system calls, ports or addresses than are listed here.",
        (f" - The program ran as {user.name} (uid {user.uid}) in a throwaway view of the host;"
         if user else " - The program ran unconfined while learning;")
        + " contained it runs as its own system user.",
        " - Capabilities cannot be learned from strace (it does not trace capability checks):",
        "   only NET_BIND_SERVICE is inferred, from a bind below port 1024. Add what else it "
        "needs.",
        " - Volumes start empty: copy the data the service needs into them after install.",
        " - connect lists the exact addresses seen; widen them to prefixes only on purpose.",
    ]
    if obs.unix_connect:
        header.append(" - It connected to Unix sockets (not governed by the network rules; they")
        header.append("   must exist in the image or a volume): "
                      + ", ".join(sorted(obs.unix_connect)))
    for v in violations:
        header.append(f" - VIOLATION: {v}")
    lossy = [v for v in [*command, *include, *volumes, *writable, *environment.values()]
             if _unicode(v) != v]
    if lossy:
        header.append(" - NOT valid UTF-8, which TOML cannot hold, so written with U+FFFD: "
                      "fix by hand: " + ", ".join(_shown(v) for v in lossy))
    for line in header:
        doc.add(_comment(line))
    doc.add(tomlkit.nl())
    doc.add("name", _unicode(name))
    doc.add(tomlkit.nl())

    image = tomlkit.table()
    image.add("from", "closure")
    if collapsed:
        image.add(_comment("Directories most of whose files were used are included whole: "
                           + ", ".join(collapsed)))
    image.add(_comment("The files it opened or looked up, and the programs it ran; corral adds "
                       "their shared libraries."))
    image.add("include", _array(include))
    image.add(tomlkit.nl())
    doc.add("image", image)

    if volumes:
        volume_tables = tomlkit.aot()
        for vol in volumes:
            table = tomlkit.table()
            table.add(_comment("A directory it wrote to: its persistent state."))
            table.add("path", _unicode(vol))
            table.add("owner", _unicode(process))
            table.add("mode", "0750")
            table.add(tomlkit.nl())
            volume_tables.append(table)
        doc.add("volume", volume_tables)

    proc = tomlkit.table()
    proc.add("command", _array(command))
    proc.add(_comment("Only NET_BIND_SERVICE can be learned; review (see above)."))
    proc.add("capabilities", _array(capabilities))
    proc.add("listen", _array(f"{p}/{n}" for p, n in listen))
    proc.add("connect", _array(_endpoint(*c) for c in connect))
    proc.add("exec", _array(executed))
    if writable:
        proc.add(_comment("Runtime state it wrote (pid files, sockets): writable, gone at revert."))
        proc.add("writable", _array(writable))
    proc.add(_comment("Every system call seen, plus what the runtime itself needs."))
    proc.add("syscalls", _array(syscalls))
    if environment:
        env = tomlkit.inline_table()
        for key, value in sorted(environment.items()):
            env.append(_unicode(key), _unicode(value))
        proc.add("environment", env)
    proc.add(tomlkit.nl())
    processes = tomlkit.table(is_super_table=True)
    processes.add(process, proc)
    doc.add("process", processes)

    watch = tomlkit.table()
    watch.add("react", "revert")
    doc.add("watch", watch)
    return Learned(tomlkit.dumps(doc), violations, obs, include, exit_status)


# -- running the program ------------------------------------------------------------------------

class _Stop(Exception):
    pass


# A program that fails on its own within this long did not start: nothing was learned.
AT_ONCE = 10.0


def learn(command: list[str], *, name: str | None = None, process: str = "app",
          duration: float | None = None, environment: dict[str, str] | None = None,
          on_start=None, user: str | None = None, writable: list[str] | None = None) -> Learned:
    """Run `command` under strace until it exits, `duration` passes, or corral gets SIGINT or
    SIGTERM (then the program is stopped); return the learned manifest. The program runs as
    `user` (default: a throwaway uid), never root, in a throwaway view of the host
    (learn/view.py); `writable`: directories that user gets in the view."""
    from corral.learn import view as viewing

    who = viewing.user_for(user)
    for k, path in enumerate(writable or []):
        if not path.startswith("/"):
            raise UsageError(f"--writable[{k}]: {path!r}: must be an absolute path")
    strace = shutil.which("strace")
    if not strace:
        raise RuntimeFailure("strace is not installed (apt-get install strace)")
    program = command[0]
    if not program.startswith("/"):
        found = shutil.which(program)
        if not found:
            raise UsageError(f"{program}: no such program")
        program = found
    program = posixpath.normpath(program)
    if not os.access(program, os.X_OK):
        raise UsageError(f"{program}: not an executable file")
    command = [program] + list(command[1:])
    env = {"LANG": "C.UTF-8"} | dict(environment or {})
    name = name or service_name_for(program)
    started = datetime.datetime.now(datetime.UTC)
    begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corral-learn-") as work:
        trace = os.path.join(work, "trace")
        out_fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        view = viewing.View(os.path.join(work, "view"), who, tuple(writable or ()))
        # strace writes the trace through the inherited descriptor: the file is outside the
        # view.
        os.fchown(out_fd, who.uid, who.gid)  # strace reopens it as the user
        argv = [strace, "-f", "-qq", "-yy", "-s", "0",
                "-o", f"/proc/self/fd/{out_fd}", "--"] + command
        # strace runs with the environment the service will have (its `environment`), in "/",
        # the contained process's working directory.
        try:
            proc = subprocess.Popen(argv, env=env, cwd="/", start_new_session=True,
                                    pass_fds=(out_fd,), preexec_fn=lambda: viewing.enter(view))
        except subprocess.SubprocessError as exc:
            raise RuntimeFailure(f"could not build the throwaway view of the host: {exc}") \
                from None
        finally:
            os.close(out_fd)
        previous = {}

        def stop(_signum, _frame):
            raise _Stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
        status: int | None = None
        try:
            if on_start:
                on_start(proc)
            deadline = begin + duration if duration else None
            while True:
                try:
                    status = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if deadline and time.monotonic() >= deadline:
                        raise _Stop() from None
        except _Stop:
            status = None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if proc.poll() is None:
                _terminate(proc)
        with open(trace, errors="replace") as handle:
            obs = parse_trace(handle)
    took = time.monotonic() - begin
    if status and took < AT_ONCE:
        # strace returns the program's status (a signal as 128+N).
        raise RuntimeFailure(
            f"{program} exited with status {status} after {took:.1f} s, running as "
            f"{who.name} (uid {who.uid}): it did not start, so nothing was learned and no "
            "manifest written; its own messages above say why (--user NAME runs it as another "
            "user, --writable DIR gives it a directory to write)")
    return render(name, process, command, obs, {k: v for k, v in env.items()},
                  status, started, took, who)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the traced program (strace passes it on), then its whole session if need be."""
    try:
        # The program is strace's child: signal the process group so it gets the signal itself.
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

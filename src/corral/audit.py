"""`corral audit`: sharp objects on the host and inside a service's base image.

Every result is a `Finding` with a stable id ("host.setuid./usr/bin/passwd"), a severity (info,
low, medium, high), what was found, where, why it matters and how to fix it. The file walks
(`audit_walk`) read trees others may control (/tmp, a base image) without following symlinks,
and every name is printed through `delta.show` (one printable line whatever bytes it holds).
Sockets, processes and the firewall are in `audit_net`, the exposure score in `audit_checks`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .delta import show

SEVERITIES = ("info", "low", "medium", "high")

BIN_DIRS = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
            "/usr/libexec", "/opt/bin")

# Names of the tools an intruder reaches for. Whole-name regular expressions, by category.
TOOLS: dict[str, re.Pattern[str]] = {k: re.compile(v) for k, v in {
    "shell": r"(ba|da|z|k|mk|pdk|c|tc|a|y|r|rba)?sh|fish|busybox|toybox",
    "compiler": r"(\w+-linux-gnu\w*-)?(gcc|g\+\+|cc|c\+\+|cpp|as|ld|ld\.bfd|ld\.gold|ld\.lld"
                r"|clang|clang\+\+|tcc)(-[\d.]+)?|make|gmake|rustc|cargo|go|gccgo|javac|nasm|yasm",
    "interpreter": r"perl[\d.]*|python[\d.]*|pypy[\d.]*|ruby[\d.]*|irb|php[\d.]*|lua[\d.]*"
                   r"|luajit|node|nodejs|deno|tclsh[\d.]*|wish[\d.]*|guile[\d.]*|java|jshell"
                   r"|Rscript|pwsh|expect",
    "network-tool": r"nc|ncat|netcat|nc\.openbsd|nc\.traditional|socat|curl|wget|telnet|ssh"
                    r"|scp|sftp|ftp|tftp|nmap|tcpdump|tshark|dumpcap|rsync",
}.items()}


def tool_kind(name: str) -> str | None:
    for kind, pattern in TOOLS.items():
        if pattern.fullmatch(name):
            return kind
    return None


# Why each kind of finding matters and how to fix it: printed once per kind in the text report.
WHY_FIX: dict[str, tuple[str, str]] = {
    "setuid": ("a setuid or setgid program runs with its owner's rights for any caller: one bug "
               "in it is a privilege escalation", "remove the bit (chmod u-s,g-s FILE) or the "
               "package if nothing needs it; keep only what you can name a use for"),
    "world-writable-dir": ("anyone can delete or replace anyone's files in it (no sticky bit), "
                           "e.g. swap a file a root job reads", "chmod o-w DIR, or chmod +t DIR "
                           "if it really is a shared scratch directory"),
    "world-writable-file": ("anyone can change it; if a program or a root job reads or runs it, "
                            "that is code execution", "chmod o-w FILE"),
    "tool": ("compilers, interpreters and network tools turn a foothold into a toolbox: build an "
             "exploit, fetch a payload, open a reverse shell", "remove the packages a server does "
             "not need (apt-get purge ...), or restrict them to administrators (chmod 0750, "
             "group adm)"),
    "sysctl": ("a kernel setting that hands an attacker information or reach", "set it in "
               "/etc/sysctl.d/90-hardening.conf and run sysctl --system"),
    "listen": ("a network daemon outside corral runs with all its user's rights on the host; "
               "a root one is the whole host if it is compromised", "contain it with a corral "
               "manifest, run it as its own unprivileged user, or bind it to loopback"),
    "daemon": ("a long-running program outside corral: nothing contains it if it is "
               "compromised", "contain it with a corral manifest, or stop it if unused"),
    "firewall": ("without a default-deny policy every port a program opens is reachable, and "
                 "every destination a compromised program wants is allowed",
                 "write a host file and `corral host apply` it (table inet corral-host), or set "
                 "the input hook chain's policy to drop"),
    "walk": ("part of the tree was not examined", "run as root; raise --time-limit"),
    "shell": ("a shell in the image is the first thing an intruder wants: a command line "
              "inside the containment", "drop it from image.include (and from anything that "
              "pulls it in)"),
    "compiler": ("a compiler in the image lets an intruder build tools inside the containment",
                 "drop it from image.include"),
    "interpreter": ("an interpreter the process does not run is a ready-made scripting engine "
                    "for an intruder", "drop it from image.include"),
    "network-tool": ("a network tool in the image helps exfiltrate data or pivot",
                     "drop it from image.include"),
    "device": ("a device node gives direct access to hardware or kernel memory",
               "remove it; corral mounts its own /dev with null, zero, full, random, urandom"),
    "unused": ("files the processes never open are attack surface for no gain",
               "narrow image.include to what `corral learn` saw used"),
    "learn": ("without learn data, unused files cannot be told apart",
              "run `corral learn` and keep its learn.json in the service's state directory"),
}


@dataclass
class Finding:
    id: str
    severity: str  # info | low | medium | high
    kind: str  # key of WHY_FIX
    what: str
    where: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def why(self) -> str:
        return WHY_FIX.get(self.kind, ("", ""))[0]

    @property
    def fix(self) -> str:
        return WHY_FIX.get(self.kind, ("", ""))[1]

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "severity": self.severity, "kind": self.kind, "what": self.what,
               "where": self.where, "why": self.why, "fix": self.fix}
        if self.detail:
            out["detail"] = self.detail
        return out


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity), f.kind, f.id))


# -- host: tools on PATH ------------------------------------------------------------------------

TOOL_SEVERITY = {"compiler": "low", "network-tool": "low", "interpreter": "info"}


SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def tool_findings(path_dirs: Iterable[str] = SYSTEM_PATH) -> list[Finding]:
    """Compilers, interpreters and network tools in the PATH directories every user has; one
    finding per program, however many names (symlinks) it has."""
    programs: dict[tuple[int, int], tuple[str, str, list[str]]] = {}  # -> kind, path, names
    for directory in path_dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            kind = tool_kind(name)
            if kind is None or kind == "shell":
                continue
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)  # a tool reached through a symlink is still a tool
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                entry = programs.setdefault((st.st_dev, st.st_ino),
                                            (kind, os.path.realpath(path), []))
                if name not in entry[2]:  # hard links and symlinks: one program, many names
                    entry[2].append(name)
    out = []
    for kind, real, names in sorted(programs.values(), key=lambda e: e[1]):
        names.sort(key=lambda n: (len(n), n))
        shown = [show(os.fsencode(n)) for n in names]
        out.append(Finding(f"host.tool.{shown[0]}", TOOL_SEVERITY[kind], "tool",
                           f"{kind.replace('-', ' ')} {', '.join(shown)}", show(os.fsencode(real)),
                           {"category": kind, "names": shown}))
    return out


# -- host: sysctls ------------------------------------------------------------------------------

# (name, is it good?, severity when not, what it means when not good, value to set)
SYSCTLS: tuple[tuple[str, Callable[[int], bool], str, str, str], ...] = (
    ("net.ipv4.conf.all.rp_filter", lambda v: v == 1, "low",
     "no strict reverse-path filter: spoofed sources are accepted", "1"),
    ("kernel.kptr_restrict", lambda v: v >= 1, "medium",
     "kernel pointers are shown to unprivileged users", "1 (or 2)"),
    ("kernel.dmesg_restrict", lambda v: v == 1, "low",
     "unprivileged users can read the kernel log", "1"),
    ("kernel.unprivileged_bpf_disabled", lambda v: v >= 1, "medium",
     "unprivileged users can load BPF programs", "1 (or 2)"),
    ("kernel.yama.ptrace_scope", lambda v: v >= 1, "medium",
     "any process can ptrace every other process of the same user", "1 (or 2)"),
    ("fs.protected_symlinks", lambda v: v == 1, "medium",
     "symlinks in sticky directories are followed for anyone (/tmp races)", "1"),
    ("fs.protected_hardlinks", lambda v: v == 1, "medium",
     "anyone can hard-link files they do not own", "1"),
    ("fs.protected_fifos", lambda v: v >= 1, "low",
     "FIFOs in sticky directories can be opened across owners", "1 (or 2)"),
    ("fs.protected_regular", lambda v: v >= 1, "low",
     "regular files in sticky directories can be opened with O_CREAT across owners", "1 (or 2)"),
    ("kernel.randomize_va_space", lambda v: v == 2, "medium", "ASLR is not fully on", "2"),
    ("fs.suid_dumpable", lambda v: v == 0, "low", "setuid programs may dump core", "0"),
    ("kernel.perf_event_paranoid", lambda v: v >= 2, "low",
     "unprivileged users can profile the kernel", "2 (or 3)"),
    ("net.ipv4.conf.all.accept_redirects", lambda v: v == 0, "low",
     "ICMP redirects can rewrite the routing table", "0"),
    ("net.ipv4.conf.all.accept_source_route", lambda v: v == 0, "low",
     "source-routed packets are accepted", "0"),
    ("net.ipv4.conf.all.send_redirects", lambda v: v == 0, "low",
     "the host sends ICMP redirects (only a router should)", "0"),
    ("net.core.bpf_jit_harden", lambda v: v == 2, "low",
     "BPF JIT output is not hardened against JIT spraying", "2"),
    ("dev.tty.ldisc_autoload", lambda v: v == 0, "low",
     "any user can make the kernel load TTY line-discipline modules", "0"),
)


def read_sysctl(name: str, proc_sys: str = "/proc/sys") -> int | None:
    try:
        with open(os.path.join(proc_sys, name.replace(".", "/"))) as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def sysctl_findings(proc_sys: str = "/proc/sys") -> list[Finding]:
    out: list[Finding] = []
    for name, good, severity, meaning, wanted in SYSCTLS:
        value = read_sysctl(name, proc_sys)
        if value is None:
            missing_severity = "medium" if name.startswith("kernel.yama") else "info"
            out.append(Finding(f"host.sysctl.{name}", missing_severity, "sysctl",
                               f"{name} is not present on this kernel"
                               + (" (Yama is not enabled)" if missing_severity == "medium" else ""),
                               f"/proc/sys/{name.replace('.', '/')}", {"value": None}))
        elif not good(value):
            out.append(Finding(f"host.sysctl.{name}", severity, "sysctl",
                               f"{name} = {value}: {meaning}; set {wanted}",
                               f"/proc/sys/{name.replace('.', '/')}", {"value": value,
                                                                        "wanted": wanted}))
    clone = read_sysctl("kernel.unprivileged_userns_clone", proc_sys)
    most = read_sysctl("user.max_user_namespaces", proc_sys)
    if clone != 0 and most not in (None, 0):
        out.append(Finding("host.sysctl.user-namespaces", "medium", "sysctl",
                           "unprivileged users can create user namespaces (kernel attack "
                           "surface; corral's own processes cannot: seccomp refuses it); set "
                           "user.max_user_namespaces = 0 if nothing on the host needs them",
                           "/proc/sys/user/max_user_namespaces",
                           {"kernel.unprivileged_userns_clone": clone,
                            "user.max_user_namespaces": most}))
    return out


# -- the whole host -----------------------------------------------------------------------------

def host_audit(roots: Iterable[str] = ("/",), *, path_dirs: Iterable[str] | None = None,
               skip_paths: Iterable[str] = (), time_limit: float | None = 600,
               show_progress: bool = False, net_pid: int | str = "self",
               proc_sys: str = "/proc/sys") -> dict[str, Any]:
    """Every host check. `roots` are walked for files (tests pass a throwaway tree);
    `net_pid` names the process whose network namespace's sockets are listed."""
    from . import audit_net

    from .audit_walk import file_findings

    roots = list(roots)
    files, stats = file_findings(roots, skip_paths=skip_paths, time_limit=time_limit,
                                 show_progress=show_progress)
    findings = files + tool_findings(SYSTEM_PATH if path_dirs is None else path_dirs)
    findings += sysctl_findings(proc_sys)
    findings += audit_net.net_findings(net_pid)
    if os.geteuid() != 0:
        findings.append(Finding("host.walk.not-root", "low", "walk", "not run as root: "
                                "unreadable directories and other users' sockets were missed",
                                "-"))
    return {"findings": sort_findings(findings), "walk": stats.to_json(),
            "roots": [show(os.fsencode(r)) for r in roots]}


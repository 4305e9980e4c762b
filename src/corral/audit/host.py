"""`corral audit`: sharp objects on the host and inside a service's base image.

Every result is a `Finding` with a stable id ("host.setuid./usr/bin/passwd"), a severity (info,
low, medium, high), what was found, where, why it matters and how to fix it. The file walks
(`audit_walk`) read trees others may control (/tmp, a base image) without following symlinks,
and every name is printed through `text.show` (one printable line whatever bytes it holds).
Sockets, processes and the firewall are in `audit_net`, the exposure score in `audit_checks`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

from corral.audit.findings import Finding, sort_findings, tool_kind
from corral.core.text import show

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
    from corral.audit import net as audit_net
    from corral.audit.walk import file_findings

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


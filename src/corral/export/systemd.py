"""`corral export systemd`: one hardened .service unit per process, as close to corral's
containment as systemd's own directives get, and the list of what they cannot say.

The unit is a different thing from the one `corral enable` writes (issue 9), which runs the
service *under corral*: this one lets systemd alone contain the program, for users who run the
vendor's software without corral. It runs on the base image `corral install` built and on the
users it created (both named in the unit); nothing here changes the host.
"""

from __future__ import annotations

import posixpath

from corral.core.paths import escape_path
from corral.export.source import Source
from corral.manifest.model import Manifest, Process
from corral.plan.sandbox import LIBRARY_DIRS, default_deny

# Programs that write and then execute code (JIT compilers): MemoryDenyWriteExecute= would kill
# them. corral itself does not restrict W^X, so the unit only adds it where it is known to hold.
JIT_PROGRAMS = ("java", "node", "nodejs", "dotnet", "mono", "luajit", "pypy", "pypy3", "php-fpm")

# What corral enforces and no systemd directive can (also printed by the command).
LOST_ALWAYS = (
    "egress by port: IPAddressAllow= filters addresses in both directions, never ports, and "
    "applies to the whole unit; corral's nftables table filters per user by address, protocol "
    "and port (`corral plan` prints it; load it beside this unit to keep that control)",
    "Landlock: which paths each process may read, write and execute, and TCP bind/connect "
    "ports, enforced by the kernel per process (ExecPaths= and SocketBindAllow= are the nearest)",
    "the watcher: tripwires (egress, listen, exec, base-write, setuid, ptrace, spoof), reactions "
    "(log, isolate, kill, revert) and incident records",
    "revert: corral throws the delta away and restarts from the clean base on an incident; here "
    "writes outside /tmp and the volumes are refused instead, and /tmp is emptied at each start",
    "the redo log of journaled volumes (epochs, excise of an attacker's writes)",
    "the ioctl TIOCSTI/TIOCLINUX argument filter (the unit has no terminal: StandardInput=null)",
    "a PID namespace per process (ProtectProc=invisible hides other users' processes instead)",
)


def unit_name(m: Manifest, process: str) -> str:
    """corral-NAME-PROCESS.service: not corral-NAME.service, the `enable` unit's name."""
    return f"corral-{m.name}-{process}.service"


def _quote(word: str) -> str:
    """One ExecStart=/Environment= word, quoted as systemd.syntax(7) reads it; `%` and `$` are
    doubled so systemd neither expands specifiers nor variables in the manifest's text."""
    text = word.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in " \t\"'\\;"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ports(specs) -> list[str]:
    return [f"{s.proto}:{s.first}" + (f"-{s.last}" if s.last != s.first else "") for s in specs]


def _jit(proc: Process) -> bool:
    return any(posixpath.basename(p) in JIT_PROGRAMS for p in proc.executables)


def lost(m: Manifest, process: str) -> list[str]:
    """What this process's unit cannot express, beyond LOST_ALWAYS."""
    proc = m.process[process]
    out = list(LOST_ALWAYS)
    if proc.listen and proc.connect:
        out.insert(0, "egress by address: the process listens, so every address must reach it "
                      "and IPAddressAllow=any lets it connect anywhere too")
    elif proc.listen:
        out.insert(0, "no egress filter: the process listens, so every address must reach it, "
                      "and IPAddressAllow=any also lets it connect anywhere (corral: nowhere)")
    out.append(f"the delta's size ({m.image.delta_size} bytes): PrivateTmp= has no size")
    sized = [v.path for v in m.volume if v.size]
    if sized:
        out.append("the volumes' sizes (" + ", ".join(sized) + "): a unit's directories have "
                   "no quota; corral gives each a file system of its own")
    if proc.writable:
        out.append("writable paths start empty (TemporaryFileSystem=), where corral's delta "
                   "shows the base underneath")
    if m.volume:
        out.append("volume modes and owners: `corral install` creates the volume directories")
    if proc.syscalls == "default":
        out.append("clone's namespace flags are refused by RestrictNamespaces=yes (EPERM), "
                   "not by corral's argument filter")
    return out


def unit(src: Source, process: str) -> str:
    m = src.manifest
    proc = m.process[process]
    user = m.user_of(process)
    lines = [f"# {unit_name(m, process)}: exported by `corral export systemd` from the manifest "
             f'of service "{m.name}", process "{process}".',
             "# It runs on the base image and the user that `corral install` makes; systemd "
             "alone contains it.",
             "# What systemd cannot express here (corral enforces it, this unit does not):"]
    lines += [f"#   - {why}" for why in lost(m, process)]
    lines += ["", "[Unit]", f"Description={m.name} ({process}), contained as its corral manifest "
              "says",
              "# corral restarts a failed process with back-off and gives up after 5 crashes "
              "in 60 s", "StartLimitIntervalSec=60", "StartLimitBurst=5",
              "", "[Service]", "Type=exec",
              "ExecStart=" + " ".join(_quote(w) for w in proc.command)]
    if proc.environment:
        lines.append("Environment=" + " ".join(_quote(f"{k}={v}")
                                               for k, v in sorted(proc.environment.items())))
    lines += [
        "Restart=on-failure", "RestartSec=1s", "StandardInput=null",
        "# not corral's (it leaves the umask as it is): files the service makes are its own",
        "UMask=0027", "",
        "# The user of the process, with no supplementary groups",
        f"User={user}", f"Group={user}", "",
        "# The base image is the root, read-only; /tmp stands for the throwaway delta",
        f"RootDirectory={src.base_root}", "MountAPIVFS=yes", "ProtectSystem=strict",
        "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes", "DevicePolicy=closed",
        "PrivateMounts=yes", "PrivateIPC=yes", "ProtectHostname=yes", "ProtectProc=invisible",
        "ProcSubset=pid"]
    lines += [f"TemporaryFileSystem={path}:mode=0755" for path in proc.writable]
    for vol in m.volume:
        host = src.volume_dir(escape_path(vol.path))
        if vol.owner == process:
            lines += [f"BindPaths={host}:{vol.path}", f"ReadWritePaths={vol.path}"]
        else:
            lines.append(f"BindReadOnlyPaths={host}:{vol.path}")
    # Only the declared programs and their libraries may be executed (corral: Landlock's
    # execute right); "-": a library directory the image lacks is skipped, not an error.
    lines += ["NoExecPaths=/",
              "ExecPaths=" + " ".join(sorted(proc.executables)
                                      + [f"-{d}" for d in LIBRARY_DIRS if d.startswith("/usr")
                                         or d.startswith("/lib")]), ""]
    caps = " ".join(f"CAP_{c}" for c in proc.capabilities)
    lines += ["# Privileges: only the declared capabilities, never more",
              "NoNewPrivileges=yes", f"CapabilityBoundingSet={caps}", f"AmbientCapabilities={caps}"]
    if not proc.capabilities:  # a user namespace would make declared capabilities useless
        lines.append("PrivateUsers=yes")
    lines += ["RestrictSUIDSGID=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes",
              "LockPersonality=yes", "RemoveIPC=yes", "KeyringMode=private",
              "ProtectClock=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
              "ProtectKernelLogs=yes", "ProtectControlGroups=yes"]
    if not _jit(proc):
        lines.append("MemoryDenyWriteExecute=yes")
    lines += ["", "# System calls: corral's own policy (docs/sandbox.md)",
              "SystemCallArchitectures=native", "SystemCallErrorNumber=EPERM"]
    if proc.syscalls == "default":
        lines += ["SystemCallFilter=~" + " ".join(default_deny()),
                  "# glibc falls back to clone, whose flags a filter can see",
                  "SystemCallFilter=~clone3:ENOSYS"]
    else:
        lines.append("SystemCallFilter=" + " ".join(sorted(set(proc.syscalls))))
    families = ["AF_UNIX"] + (["AF_INET", "AF_INET6"] if proc.listen or proc.connect else [])
    lines += ["", "# Network: the declared listens and connects", "RestrictAddressFamilies="
              + " ".join(families), "IPAddressDeny=any"]
    if proc.listen:
        lines.append("IPAddressAllow=any")
    elif proc.connect:
        nets = sorted({e.network or "any" for e in proc.connect})
        lines.append("IPAddressAllow=" + ("any" if "any" in nets else " ".join(nets)))
    lines += [f"SocketBindAllow={p}" for p in _ports(proc.listen)] + ["SocketBindDeny=any"]
    limits = proc.limits
    lines += ["", "# Limits", f"MemoryMax={limits.memory}", "MemorySwapMax=0",
              f"TasksMax={limits.pids}",
              *([f"CPUQuota={round(limits.cpu * 100)}%"] if limits.cpu is not None else []),
              f"LimitNOFILE={limits.open_files}", "LimitCORE=0",
              "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def export(src: Source) -> dict[str, str]:
    """{file name: text}: one unit per process, and a target that starts them all when there
    is more than one."""
    m = src.manifest
    files = {unit_name(m, p): unit(src, p) for p in m.process}
    if len(m.process) > 1:
        files[f"corral-{m.name}.target"] = "\n".join([
            f"# exported by `corral export systemd`: every process of service \"{m.name}\"",
            "[Unit]", f"Description={m.name}, every process",
            "Wants=" + " ".join(unit_name(m, p) for p in m.process), "",
            "[Install]", "WantedBy=multi-user.target", ""])
    return files

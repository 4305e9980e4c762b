"""The exposure score of a service, 0-100 (100 = fully contained), in the manner of
`systemd-analyze security`: a table of weighted checks, each a small function of the service's
containment (a `ServiceView`, from the installed state or a manifest) and the host's facts,
returning an exposure from 0 (pass) to 1 (fail), or None when it does not apply, and a reason.

    score = 100 * (1 - sum(weight * exposure) / sum(weight))   over the checks that apply

A service is as exposed as its weakest process: per-process checks take the worst one. A policy
file (TOML) overrides weights, skips checks, and ignores or re-rates findings (docs/audit.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.audit.findings import Finding


@dataclass(frozen=True)
class ProcView:
    name: str
    user: str
    uid: int | None
    capabilities: tuple[str, ...]
    syscalls: str  # "deny-list" (corral's default) or "allow-list"
    allowed: tuple[str, ...]  # the allow-list's calls
    listen: tuple[str, ...]  # "tcp/8080", "udp/5000-5010"
    connect: tuple[str, ...] | None  # "tcp/443@10.0.0.5/32"; None: not known
    exec: tuple[str, ...]
    program: str  # command[0]
    writable: tuple[str, ...]
    limits: dict[str, Any]


@dataclass(frozen=True)
class VolView:
    path: str
    mode: int | None
    journal: bool | None  # None: not known
    size: int | None = None  # bytes of its own file system; None: unbounded


@dataclass
class ServiceView:
    service: str
    source: str  # "installed" or the manifest's path
    processes: list[ProcView]
    volumes: list[VolView]
    delta: str
    react: str
    tripwires: tuple[str, ...]
    image: list[Finding] | None  # the image audit's findings; None: not known
    notes: list[str] = field(default_factory=list)


@dataclass
class HostFacts:
    landlock_abi: int
    seccomp: bool
    firewall: dict[str, Any]
    memory: int  # bytes of RAM


Result = tuple[float | None, str]


@dataclass(frozen=True)
class Check:
    id: str
    weight: float
    title: str
    fn: Callable[[ServiceView, HostFacts], Result]


CHECKS: list[Check] = []


def check(id: str, weight: float, title: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable[[ServiceView, HostFacts], Result]) -> Callable:
        CHECKS.append(Check(id, weight, title, fn))
        return fn
    return register


def _worst(view: ServiceView, fn: Callable[[ProcView], tuple[float, str]]) -> Result:
    results = [(fn(p), p.name) for p in view.processes]
    if not results:
        return None, "no processes"
    (exposure, reason), name = max(results, key=lambda r: r[0][0])
    return exposure, (f"{name}: {reason}" if len(results) > 1 else reason)


# -- the table -----------------------------------------------------------------------------------

@check("user.own", 10, "each process runs as its own non-root user")
def _user(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        if p.uid == 0 or p.user == "root":
            return 1.0, "runs as root"
        if not p.user.startswith(f"corral-{view.service}-"):
            return 0.5, f"runs as {p.user}, which other services may share"
        return 0.0, f"runs as {p.user}"
    return _worst(view, one)


# What keeping each capability costs, 0-1 (roughly systemd-analyze's weights, doubled up for
# the ones that are root in all but name). Capabilities not listed cost 0.3.
CAP_COST = {
    "SYS_ADMIN": 1.0, "SYS_MODULE": 1.0, "SYS_RAWIO": 1.0, "BPF": 0.8, "SYS_PTRACE": 0.8,
    "MAC_ADMIN": 0.8, "MAC_OVERRIDE": 0.8, "DAC_OVERRIDE": 0.6, "SETUID": 0.6, "SETFCAP": 0.6,
    "NET_ADMIN": 0.6, "DAC_READ_SEARCH": 0.5, "SETGID": 0.5, "SETPCAP": 0.5, "SYS_BOOT": 0.5,
    "PERFMON": 0.5, "AUDIT_CONTROL": 0.5, "CHECKPOINT_RESTORE": 0.5, "NET_RAW": 0.4,
    "CHOWN": 0.4, "FOWNER": 0.4, "MKNOD": 0.4, "SYS_TIME": 0.4, "FSETID": 0.3, "KILL": 0.3,
    "SYS_CHROOT": 0.3, "LINUX_IMMUTABLE": 0.3, "IPC_OWNER": 0.3, "SYSLOG": 0.3,
    "SYS_RESOURCE": 0.3, "SYS_PACCT": 0.2, "AUDIT_READ": 0.2, "SYS_NICE": 0.1, "IPC_LOCK": 0.1,
    "LEASE": 0.1, "WAKE_ALARM": 0.1, "BLOCK_SUSPEND": 0.1, "AUDIT_WRITE": 0.1,
    "NET_BROADCAST": 0.1, "SYS_TTY_CONFIG": 0.1, "NET_BIND_SERVICE": 0.05,
}


@check("caps.none", 6, "no capabilities kept")
def _caps_none(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        if not p.capabilities:
            return 0.0, "no capabilities"
        if set(p.capabilities) == {"NET_BIND_SERVICE"}:
            return 0.2, "keeps NET_BIND_SERVICE only"
        return 1.0, f"keeps {len(p.capabilities)}: {', '.join(sorted(p.capabilities))}"
    return _worst(view, one)


@check("caps.dangerous", 12, "no dangerous capability (each one costs)")
def _caps_dangerous(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        costly = sorted(p.capabilities, key=lambda c: -CAP_COST.get(c, 0.3))
        exposure = min(1.0, sum(CAP_COST.get(c, 0.3) for c in costly))
        if not costly:
            return 0.0, "none"
        return exposure, ", ".join(f"{c} ({CAP_COST.get(c, 0.3):g})" for c in costly)
    return _worst(view, one)


@check("syscalls.allowlist", 8, "system calls: an explicit allow-list")
def _syscalls(view: ServiceView, host: HostFacts) -> Result:
    from corral.plan.sandbox import default_deny

    dangerous = set(default_deny())

    def one(p: ProcView) -> tuple[float, str]:
        if p.syscalls != "allow-list":
            return 0.4, (f"default deny-list ({len(dangerous)} dangerous calls refused, "
                         "the rest allowed)")
        risky = sorted(set(p.allowed) & dangerous)
        if risky:
            return min(1.0, 0.1 + 0.1 * len(risky)), f"allow-list includes {', '.join(risky)}"
        return 0.0, f"allow-list of {len(p.allowed)} calls"
    return _worst(view, one)


def _endpoint_exposure(text: str) -> float:
    ports, _, network = text.partition("@")
    first, _, last = ports.split("/", 1)[1].partition("-")
    width = int(last or first) - int(first) + 1
    extra = 0.3 if width > 1024 else 0.1 if width > 16 else 0.0
    if not network:
        return 1.0
    net = ipaddress.ip_network(network)
    if net.is_loopback:
        return extra
    steps = (8, 16, 24, 32) if net.version == 4 else (32, 48, 64, 128)
    exposure = zip(steps, (0.9, 0.7, 0.4, 0.15), strict=True)
    base = next((e for bound, e in exposure if net.prefixlen < bound), 0.0)
    return min(1.0, base + extra)


@check("egress.allowlist", 10, "egress: a short allow-list of exact addresses")
def _egress(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        if p.connect is None:
            return 0.5, "connect list not known (the manifest changed since install)"
        if not p.connect:
            return 0.0, "no egress at all"
        worst = max(p.connect, key=_endpoint_exposure)
        exposure = _endpoint_exposure(worst)
        if "@" not in worst:
            return exposure, f'"{worst}": any address'
        return exposure, f"{len(p.connect)} entries, widest \"{worst}\""
    return _worst(view, one)


@check("listen.ports", 4, "listens on few unprivileged ports")
def _listen(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        low, count = [], 0
        for spec in p.listen:
            first, _, last = spec.split("/", 1)[1].partition("-")
            count += int(last or first) - int(first) + 1
            if int(first) < 1024:
                low.append(spec)
        if low:
            return 0.5, f"below 1024: {', '.join(low)} (needs NET_BIND_SERVICE)"
        if count > 16:
            return 0.5, f"{count} ports"
        return 0.0, ", ".join(p.listen) or "listens on nothing"
    return _worst(view, one)


@check("exec.narrow", 4, "executes only its own program")
def _exec(view: ServiceView, host: HostFacts) -> Result:
    from corral.audit.findings import tool_kind

    def one(p: ProcView) -> tuple[float, str]:
        kinds = {path: tool_kind(path.rsplit("/", 1)[-1]) for path in p.exec}
        shells = [path for path, kind in kinds.items() if kind == "shell"]
        if shells:
            return 1.0, f"may execute a shell: {', '.join(shells)}"
        tools = [path for path, kind in kinds.items() if kind and path != p.program]
        if tools:
            return 0.5, f"may execute {', '.join(tools)}"
        if len(p.exec) > 1:
            return min(0.8, 0.2 * (len(p.exec) - 1)), f"{len(p.exec)} programs"
        return 0.0, p.exec[0] if p.exec else "nothing"
    return _worst(view, one)


SYSTEM_PREFIXES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/opt", "/boot", "/root")


@check("writable.narrow", 3, "no writable paths besides volumes and /tmp")
def _writable(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        system = [w for w in p.writable
                  if w == "/" or any(w == s or w.startswith(s + "/") for s in SYSTEM_PREFIXES)]
        if system:
            return 1.0, f"system paths writable: {', '.join(system)}"
        if p.writable:
            return 0.3, ", ".join(p.writable)
        return 0.0, "volumes and /tmp only"
    return _worst(view, one)


@check("volumes.mode", 4, "volumes closed to other users")
def _volume_mode(view: ServiceView, host: HostFacts) -> Result:
    if not view.volumes:
        return None, "no volumes"
    worst, reason = 0.0, "owner only"
    for vol in view.volumes:
        if vol.mode is None:
            exposure, why = 0.3, f"{vol.path}: mode not known"
        elif vol.mode & 0o007:
            exposure, why = 0.6, f"{vol.path}: {vol.mode:04o}, open to others"
        elif vol.mode & 0o070:
            exposure, why = 0.1, f"{vol.path}: {vol.mode:04o} (group: the owner's own)"
        else:
            exposure, why = 0.0, f"{vol.path}: {vol.mode:04o}"
        if exposure >= worst:
            worst, reason = exposure, why
    return worst, reason


@check("volumes.journal", 3, "volumes keep a redo journal")
def _journal(view: ServiceView, host: HostFacts) -> Result:
    known = [v for v in view.volumes if v.journal is not None]
    if not known:
        return None, "no volumes" if not view.volumes else "not known"
    without = [v.path for v in known if not v.journal]
    return len(without) / len(known), (f"no journal: {', '.join(without)}" if without
                                        else "every volume journaled")


@check("volumes.size", 3, "volumes have a size the kernel enforces")
def _volume_size(view: ServiceView, host: HostFacts) -> Result:
    if not view.volumes:
        return None, "no volumes"
    without = [v.path for v in view.volumes if not v.size]
    return len(without) / len(view.volumes), (
        f"unbounded (a flood fills the state file system): {', '.join(without)}" if without
        else "every volume sized")


REACT_EXPOSURE = {"revert": 0.0, "kill": 0.3, "isolate": 0.3, "log": 1.0}


@check("watch.react", 6, "a violation is contained (revert), not just logged")
def _react(view: ServiceView, host: HostFacts) -> Result:
    return REACT_EXPOSURE.get(view.react, 1.0), f'react = "{view.react}"'


@check("watch.tripwires", 6, "every tripwire armed")
def _tripwires(view: ServiceView, host: HostFacts) -> Result:
    from corral.manifest.model import TRIPWIRES

    missing = [t for t in TRIPWIRES if t not in view.tripwires]
    return len(missing) / len(TRIPWIRES), (f"off: {', '.join(missing)}" if missing else "all on")


@check("limits.memory", 3, "memory limit set and not huge")
def _memory(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        memory = int(p.limits.get("memory", 512 << 20))
        text = f"{memory >> 20} MiB"
        if host.memory and memory >= host.memory:
            return 1.0, f"{text}: all of the host's memory"
        return (0.6 if memory > 4 << 30 else 0.3 if memory > 1 << 30 else 0.0), text
    return _worst(view, one)


@check("limits.pids", 3, "pids limit set and not huge")
def _pids(view: ServiceView, host: HostFacts) -> Result:
    def one(p: ProcView) -> tuple[float, str]:
        pids = int(p.limits.get("pids", 256))
        return (1.0 if pids > 4096 else 0.5 if pids > 512 else 0.0), f"{pids} tasks"
    return _worst(view, one)


@check("delta.tmpfs", 2, "writes to the root vanish (tmpfs delta)")
def _delta(view: ServiceView, host: HostFacts) -> Result:
    return (0.0, "tmpfs") if view.delta == "tmpfs" else \
        (0.5, "disk: an intruder's files survive a supervisor restart (not a revert)")


IMAGE_COST = {"shell": 0.3, "compiler": 0.5, "interpreter": 0.25, "network-tool": 0.3,
              "setuid": 1.0, "device": 1.0, "world-writable-dir": 0.5,
              "world-writable-file": 0.3}


@check("image.minimal", 10, "image minimal: no shells, compilers or tools it does not run")
def _image(view: ServiceView, host: HostFacts) -> Result:
    if view.image is None:
        return None, "image not known"
    counts: dict[str, int] = {}
    for finding in view.image:
        if finding.kind in IMAGE_COST:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
    if not counts:
        return 0.0, "nothing sharp"
    exposure = min(1.0, sum(IMAGE_COST[k] * n for k, n in counts.items()))
    return exposure, ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


@check("kernel.landlock", 8, "Landlock enforces exec, file and port rules")
def _landlock(view: ServiceView, host: HostFacts) -> Result:
    abi = host.landlock_abi
    if abi <= 0:
        return 1.0, "no Landlock on this kernel: exec, file and port rules not enforced"
    if abi < 4:
        return 0.5, f"ABI {abi}: no TCP port rules"
    if abi < 6:
        return 0.2, f"ABI {abi}: no signal/abstract-socket scoping"
    return 0.0, f"ABI {abi}"


@check("kernel.seccomp", 8, "seccomp filters available")
def _seccomp(view: ServiceView, host: HostFacts) -> Result:
    return (0.0, "available") if host.seccomp else (1.0, "not available on this kernel")


@check("host.firewall", 6, "host firewall denies by default")
def _firewall(view: ServiceView, host: HostFacts) -> Result:
    fw = host.firewall
    if not fw.get("readable"):
        return 0.5, "nftables ruleset not readable"
    if fw.get("input_default_deny") and fw.get("output_default_deny"):
        return 0.0, "table inet corral-host" if fw.get("corral_host") else "input and output deny"
    if fw.get("input_default_deny"):
        return 0.2, "input only"
    return 1.0, "no default-deny input chain"

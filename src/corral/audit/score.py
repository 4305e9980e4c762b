"""Score services with the `audit_checks` table: what each check sees (a `ServiceView` built
from the installed state or from a manifest, and the host's facts), the policy file, and the
arithmetic."""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from corral.audit.checks import CHECKS, HostFacts, ProcView, ServiceView, VolView
from corral.audit.findings import SEVERITIES, Finding
from corral.core.errors import InputError, Problem

CHECK_IDS = {c.id for c in CHECKS}


# -- the host's facts ------------------------------------------------------------------------------

def _seccomp_available() -> bool:
    try:
        with open("/proc/self/status") as handle:
            if not any(line.startswith("Seccomp:") for line in handle):
                return False
        with open("/proc/sys/kernel/seccomp/actions_avail") as handle:
            actions = handle.read().split()
        return "errno" in actions and "kill_process" in actions
    except OSError:
        return False


def _memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def host_facts(net_pid: int | str = "self") -> HostFacts:
    from corral.audit.net import firewall_state
    from corral.launch.landlock import abi_version

    return HostFacts(landlock_abi=abi_version(), seccomp=_seccomp_available(),
                     firewall=firewall_state(net_pid=net_pid), memory=_memory())


# -- what the checks look at ---------------------------------------------------------------------

def view_from_manifest(file: str) -> ServiceView:
    """A manifest not (necessarily) installed: everything from the file, the image from its
    plan (what install would copy)."""
    from corral.audit.image import plan_image_findings
    from corral.manifest.model import load_manifest
    from corral.plan.service import plan_service

    m = load_manifest(file)
    plan = plan_service(file, m)
    processes = [ProcView(
        name=name, user=m.user_of(name), uid=None, capabilities=tuple(p.capabilities),
        syscalls="deny-list" if p.syscalls == "default" else "allow-list",
        allowed=() if p.syscalls == "default" else tuple(p.syscalls),
        listen=tuple(str(s) for s in p.listen), connect=tuple(str(e) for e in p.connect),
        exec=tuple(p.executables), program=p.command[0], writable=tuple(p.writable),
        limits=p.limits.model_dump())
        for name, p in m.process.items()]
    return ServiceView(
        service=m.name, source=file, processes=processes,
        volumes=[VolView(v.path, v.mode, v.journal, v.size) for v in m.all_volumes()],
        delta=m.image.delta, react=m.watch.react, tripwires=tuple(m.watch.tripwires),
        image=plan_image_findings(plan))


def _installed_manifest(name: str, record: dict[str, Any]) -> Any:
    """The manifest install used, if its file still says what was installed (same firewall
    table digest): the only place the connect addresses and journal flags are kept."""
    from corral.core.errors import CorralError
    from corral.host.install import digest
    from corral.manifest.model import load_manifest
    from corral.plan import nft_rules as nftables

    try:
        m = load_manifest(record["manifest"])
        flows = [nftables.ProcessFlows(p, m.user_of(p), tuple(proc.listen), tuple(proc.connect))
                 for p, proc in m.process.items()]
        same = digest(nftables.service_ruleset(m.name, flows)) == record["table"]["digest"]
    except (CorralError, KeyError, TypeError, ValueError, OSError):
        return None
    return m if same and m.name == name else None


def view_from_installed(name: str) -> ServiceView:
    """An installed service: runtime.json and install.json say what runs; the volumes' modes
    are read from disk; the image is audited as it is now."""
    from corral.audit.image import image_audit
    from corral.core.paths import RECORD
    from corral.supervise.control import spec_of

    spec = spec_of(name)
    try:
        record = json.loads(Path(spec.state, RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    m = _installed_manifest(name, record)
    notes = [] if m else ["the manifest file changed or is gone since install: connect "
                          "addresses and journal flags not known"]
    volume_paths = {v.path for v in spec.volumes}
    processes = []
    for p in spec.processes:
        manifest_proc = m.process.get(p.name) if m else None
        rw = p.landlock.get("read_write", [])
        processes.append(ProcView(
            name=p.name, user=p.user, uid=p.uid, capabilities=tuple(p.capabilities),
            syscalls=p.seccomp.get("mode", "deny-list"),
            allowed=(tuple(p.seccomp.get("syscalls", ())) if p.seccomp.get("mode") == "allow-list"
                     else ()),
            listen=tuple(p.listen),
            connect=tuple(str(e) for e in manifest_proc.connect) if manifest_proc else None,
            exec=tuple(spec.exec_paths.get(p.name) or [p.command[0]]), program=p.command[0],
            writable=tuple(w for w in rw if w not in volume_paths and w not in ("/tmp", "/dev")),
            limits=dict(p.limits)))
    journals = {v.path: v.journal for v in m.all_volumes()} if m else {}
    volumes = []
    for v in spec.volumes:
        try:
            mode: int | None = stat.S_IMODE(
                os.lstat(os.path.join(spec.state, "volumes", v.store)).st_mode)
        except OSError:
            mode = None
        volumes.append(VolView(v.path, mode, journals.get(v.path), v.size))
    watch = spec.watch or {}
    from corral.manifest.model import TRIPWIRES

    return ServiceView(
        service=name, source="installed", processes=processes, volumes=volumes,
        delta=spec.delta, react=watch.get("react", "revert"),
        tripwires=tuple(watch.get("tripwires", TRIPWIRES)),
        image=image_audit(name)["findings"], notes=notes)


def installed_services() -> list[str]:
    from corral.core.paths import RUNTIME, lib_root

    try:
        return sorted(d.name for d in Path(lib_root()).iterdir() if (d / RUNTIME).is_file())
    except OSError:
        return []


# -- the policy file -------------------------------------------------------------------------------

@dataclass
class Policy:
    weights: dict[str, float] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)
    ignore: list[str] = field(default_factory=list)  # finding id globs
    severity: dict[str, str] = field(default_factory=dict)  # finding id glob -> severity

    def findings(self, found: list[Finding]) -> list[Finding]:
        """Drop the ignored findings and re-rate the others as the policy says."""
        out = []
        for finding in found:
            if any(fnmatch.fnmatchcase(finding.id, g) for g in self.ignore):
                continue
            for glob, severity in self.severity.items():
                if fnmatch.fnmatchcase(finding.id, glob):
                    finding.severity = severity
            out.append(finding)
        return out


def load_policy(file: str | None) -> Policy:
    from corral.manifest import tomlfile

    if file is None:
        return Policy()
    data = tomlfile.load(file)
    problems: list[Problem] = []
    policy = Policy()

    def bad(loc: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(file, loc, message))

    for key, value in data.items():
        if key == "weights" and isinstance(value, dict):
            for check_id, weight in value.items():
                if check_id not in CHECK_IDS:
                    bad(("weights", check_id),
                        f'unknown check (known: {", ".join(sorted(CHECK_IDS))})')
                elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                    bad(("weights", check_id), "expected a number, 0 or more")
                else:
                    policy.weights[check_id] = float(weight)
        elif key == "skip" and isinstance(value, list):
            for i, check_id in enumerate(value):
                if check_id not in CHECK_IDS:
                    bad(("skip", i), f'"{check_id}": unknown check')
                else:
                    policy.skip.add(check_id)
        elif key == "ignore" and isinstance(value, list):
            for i, glob in enumerate(value):
                if not isinstance(glob, str) or not glob:
                    bad(("ignore", i), "expected a finding id or glob")
                else:
                    policy.ignore.append(glob)
        elif key == "severity" and isinstance(value, dict):
            for glob, severity in value.items():
                if severity not in SEVERITIES:
                    bad(("severity", glob), f"expected one of {', '.join(SEVERITIES)}")
                else:
                    policy.severity[glob] = severity
        elif key in ("weights", "severity"):
            bad((key,), "expected a table")
        elif key in ("skip", "ignore"):
            bad((key,), "expected a list")
        else:
            bad((key,), "unknown key (weights, skip, ignore, severity)")
    if problems:
        raise InputError(problems)
    return policy


# -- the arithmetic --------------------------------------------------------------------------------

class CheckRow(TypedDict):
    """One check in score()'s "checks": `status` and `lost` are added once the total is known."""
    id: str
    title: str
    weight: float
    exposure: float | None  # 0 (none) .. 1 (full); None: not applicable, or skipped
    reason: str
    status: NotRequired[Literal["pass", "partial", "fail", "n/a", "skipped"]]
    lost: NotRequired[float]  # points of the 100 this check costs


def score(view: ServiceView, host: HostFacts, policy: Policy | None = None) -> dict[str, Any]:
    policy = policy or Policy()
    rows: list[CheckRow] = []
    exposure: float | None
    for c in CHECKS:
        weight = policy.weights.get(c.id, c.weight)
        if c.id in policy.skip:
            exposure, reason = None, "skipped by policy"
        else:
            exposure, reason = c.fn(view, host)
        rows.append({"id": c.id, "title": c.title, "weight": weight, "exposure": exposure,
                     "reason": reason})
    total = sum(r["weight"] for r in rows if r["exposure"] is not None)
    lost = sum(r["weight"] * r["exposure"] for r in rows if r["exposure"] is not None)
    for r in rows:
        e = r["exposure"]
        r["status"] = ("skipped" if r["reason"] == "skipped by policy" else "n/a") if e is None \
            else "pass" if e == 0 else "fail" if e >= 1 else "partial"
        r["lost"] = round(100 * r["weight"] * e / total, 1) if e is not None and total else 0.0
        if e is not None:
            r["exposure"] = round(e, 3)
    value = round(100 * (1 - lost / total)) if total else 100
    return {"service": view.service, "source": view.source, "score": value, "checks": rows,
            "notes": view.notes}

"""Plain text for people: aligned, short, the full detail is in --json."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from corral.cli.common import table

if TYPE_CHECKING:  # status, delta and incidents must not load the manifest model and ELF parser
    from corral.plan.service import ServicePlan


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _image_lines(plan: ServicePlan) -> list[str]:
    entries = plan.image.entries
    files = [e for e in entries if e.kind == "file"]
    total = 0
    for entry in files:
        try:
            total += os.lstat(os.path.join(plan.image.host_root, entry.path.lstrip("/"))).st_size
        except OSError:
            pass
    included = tuple(p.rstrip("/") + "/" for p in plan.image.include)
    libraries = sorted(e.path for e in files if ".so" in e.path and not e.path.startswith(included))
    lines = [f"base image  from {plan.image.source}: {len(entries)} entries, {len(files)} files, "
             f"{_size(total)}"]
    lines += [f"  include         {path}" for path in plan.image.include]
    lines += [f"  add             {a.path}" for a in plan.image.added]
    lines += [f"  needed library  {lib}" for lib in libraries[:30]]
    if len(libraries) > 30:
        lines.append(f"  ... and {len(libraries) - 30} more (corral plan --json lists all)")
    lines.append("  /etc/passwd, /etc/group: root and " + ", ".join(u.name for u in plan.users))
    return lines


def plan_text(plan: ServicePlan) -> str:
    out = [f"service {plan.service}  ({plan.file})", "", "users"]
    out.append(table([[u.name, f"process {u.process}, system uid, no login shell, no home"]
                      for u in plan.users], indent=2))
    out += ["", *_image_lines(plan), "", "volumes"]
    for vol in plan.volumes or ():
        journal = f", journal, epoch {vol.epoch}s" if vol.journal else ""
        size = f", {vol.size >> 20} MiB file system of its own" if vol.size else ""
        out.append(f"  {vol.path:<20} owner {vol.owner}, mode {vol.mode:04o}{size}{journal}")
    if not plan.volumes:
        out.append("  none: nothing survives a revert")
    rules = sum(1 for item in plan.ruleset["nftables"] if "rule" in item.get("add", {}))
    out += ["", f"firewall  table {plan.table}: {rules} rules, one atomic transaction"]
    for sandbox in plan.sandbox:
        listen = ", ".join(str(p) for p in _flows(plan, sandbox.process, "listen")) or "none"
        connect = ", ".join(str(c) for c in _flows(plan, sandbox.process, "connect")) or "none"
        out.append(f"  {sandbox.process:<8} in: {listen}; out: {connect}; all else dropped, logged")
    own = plan.network.get("mode") == "own"
    if own:
        out.append(f"  network own: its namespace, a /30 of {plan.network['pool']} on a veth; "
                   "listen ports DNAT'ed from the host's addresses, connects masqueraded; "
                   "the table applies inside it")
    network = "own, behind a veth" if own else "host, filtered per user"
    out += ["", "sandbox"]
    for s in plan.sandbox:
        limits = s.limits
        out += [
            f"  {s.process}  as {s.user}: {' '.join(s.command)}",
            f"    capabilities  {', '.join(s.capabilities) or 'none'}; no_new_privs",
            f"    namespaces    {' '.join(s.namespaces)} (network: {network})",
            f"    executables   {', '.join(s.executables)}",
            f"    seccomp       {s.seccomp.mode}, {len(s.seccomp.syscalls)} system calls",
            f"    writable      {', '.join(s.landlock.read_write)}",
            f"    limits        memory {_size(limits['memory'])}, pids {limits['pids']}, "
            f"open files {limits['open_files']}, "
            f"cpu {'no quota' if limits['cpu'] is None else limits['cpu']}",
        ]
    return "\n".join(out + _watch_lines(plan.watch))


def _watch_lines(watch: dict[str, object]) -> list[str]:
    """The watcher, and above all `on_incident`: a command the manifest (perhaps a vendor's)
    has run AS ROOT, outside every containment, at each incident. Shown, and warned about."""
    from corral.core.errors import escape_controls

    tripwires = watch.get("tripwires")
    out = ["", "watch", f"  react         {watch.get('react') or 'revert'}",
           "  tripwires     " + (", ".join(str(t) for t in tripwires)
                                 if isinstance(tripwires, list) else "all")]
    command = watch.get("on_incident")
    if isinstance(command, list) and command:
        shown = " ".join(escape_controls(str(a)) for a in command)
        out += [f"  on_incident   {shown}",
                "  warning: on_incident runs as root, uncontained, at every incident: "
                "review it as you would a root cron job"]
    return out


def _flows(plan: ServicePlan, process: str, kind: str) -> list[object]:
    for flow in plan.flows:
        if flow.process == process:
            return list(getattr(flow, kind))
    return []


def status_text(services: list[dict]) -> str:
    if not services:
        return "no service installed"
    out = []
    for svc in services:
        out.append(f"{svc['service']}: {svc['state']}  (base {svc['base_version']}, delta "
                   f"{svc['delta']['kind']} {_size(svc['delta']['bytes'])}, incidents "
                   f"{svc['incidents']} ({svc['open_incidents']} open), journal epochs "
                   f"{svc['journal_epochs']})")
        if svc.get("error"):
            out.append(f"  {svc['error']}")
        if svc.get("isolated"):
            out.append("  ISOLATED: network cut and processes frozen (corral revert to recover)")
        if svc.get("landlock"):
            out.append(f"  {svc['landlock']}")
        network = svc.get("network") or {}
        if network.get("addr"):
            out.append(f"  network: its own namespace, {network['addr']} behind veth "
                       f"{network['host_if']} ({network['host_addr']})")
        for warning in svc.get("warnings") or ():
            out.append(f"  warning: {warning}")
        sensors = svc.get("sensors") or {}
        if sensors:  # the watcher's eyes: one that is not on is a blind spot, said first
            blind = {k: v for k, v in sensors.items() if not v.startswith("on")}
            out.append("  sensors: " + ", ".join(
                f"{k} {'OFF' if k in blind else 'on'}" for k in sorted(sensors)))
            out += [f"  warning: sensor {k}: {v}" for k, v in sorted(blind.items())]
        for volume, health in sorted((svc.get("journals") or {}).items()):
            if health != "ok":
                out.append(f"  warning: journal {volume}: {health}")
        if svc.get("archives"):
            last = svc["archives"][-1]
            out.append(f"  archives {len(svc['archives'])}, last {last['created_at']} "
                       f"({last['reason']}, {last['changes']} changes)")
        rows = []
        for p in svc["processes"]:
            extra = f"restarts {p['restarts']}" if p["restarts"] else ""
            if p.get("error"):
                extra += f"  ({p['error']})"
            rows.append([p["name"], p["state"], f"pid {p['pid']}" if p["pid"] else "-",
                         p["user"], extra.strip()])
        if rows:
            out.append(table(rows, indent=2))
    return "\n".join(out)


def delta_text(result: dict) -> str:
    changes = result["changes"]
    if not changes:
        return f"{result['service']}: no change against base {result['base_version']}"
    sign = {"added": "+", "modified": "~", "deleted": "-"}
    out = [f"{result['service']}: {len(changes)} changes against base {result['base_version']}"]
    rows = []
    for c in changes:
        extra = []
        if c.get("mode"):
            extra.append(c["mode"])
        if c.get("bytes") is not None:
            extra.append(_size(c["bytes"]))
        if c.get("target"):
            extra.append(f"-> {c['target']}")
        if c.get("details"):
            extra.append(",".join(c["details"]))
        if c.get("setid"):
            extra.append("SETID")
        elif c.get("executable"):
            extra.append("executable")
        rows.append([sign[c["change"]], c["kind"], c["path"], " ".join(extra)])
    out.append(table(rows, indent=2))
    if result["base_writes"]:
        out.append(f"  base-write: {', '.join(result['base_writes'])}")
    return "\n".join(out)


def incidents_text(records: list[dict]) -> str:
    if not records:
        return "no incidents"
    rows = []
    for r in records:
        detail = " ".join(f"{k}={v}" for k, v in (r.get("detail") or {}).items() if v is not None)
        count = f" x{r['count']}" if r.get("count", 1) > 1 else ""
        rows.append([r.get("detected_at", "?"), f"{r.get('service')}/{r.get('process')}",
                     f"{r.get('tripwire')}{count}", detail,
                     f"-> {r.get('reaction')} in {r.get('latency_ms')} ms",
                     "closed" if r.get("closed_at") else "OPEN", r.get("id")])
    return table(rows)

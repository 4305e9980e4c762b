"""`corral host plan|apply|confirm|rollback`: the host's own table, applied so that a mistake
cannot lock the administrator out.

The ruleset is built by `hostfw_rules` (pure); this module gathers its inputs (the host file,
the installed services' manifests, the LANs' manifests) and drives the dead man's switch that
`hostfw_guard` implements:

    apply     save the table as it is now in previous.json (`nft -j list table`, or "absent"),
              start the detached rollback guard, write pending.json, then apply the new table
              in one transaction
    confirm   remove pending.json (which alone disarms the guard), then stop the guard
    rollback  restore previous.json now (whether the last apply is pending or confirmed)

The guard starts *before* the new table goes in and pending.json is written before too, so
killing corral at any instant leaves either nothing applied or an armed guard that does not need
the corral process that started it. Every step runs under one lock (flock on STATE/lock), so a
guard firing while `confirm` runs sees either a pending apply or none.

A second `apply` while one is pending chains: the saved state stays the one from before the
first unconfirmed apply (the last state somebody could confirm, or that held before corral),
the new table replaces the pending one, and the timer starts again. A pending.json whose guard
is gone (a reboot emptied the kernel's tables anyway, or somebody killed it) is stale and ignored.

State: /var/lib/corral/host/ (moved by CORRAL_ROOT): lock, previous.json, pending.json,
confirmed.json (the last confirmation), rolled_back.json (the last rollback), guard.log.
Heavy imports (pydantic, through the host file and manifest models) happen only when planning.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.core.errors import InputError, Problem, RuntimeFailure, UsageError
from corral.core.paths import lib_root
from corral.core.text import iso
from corral.host import firewall_guard as guard
from corral.host import nft
from corral.host.firewall_guard import STATE, TABLE, state_dir
from corral.plan.host_rules import HostSpec, LanSpec, ServiceFlows, host_ruleset, management_first


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- plan (reads, never writes)

@dataclass(frozen=True)
class HostPlan:
    host_file: str      # absolute path
    host_digest: str    # sha256 of the file's bytes: confirm accepts the same file elsewhere
    spec: HostSpec
    ruleset: dict

    def to_json(self) -> dict[str, Any]:
        def svc(s: ServiceFlows) -> dict[str, Any]:
            return {"name": s.name, "manifest": s.manifest, "listen": [str(p) for p in s.listen],
                    "connect": [str(e) for e in s.connect]}

        return {
            "host_file": self.host_file, "role": self.spec.role, "table": f"inet {TABLE}",
            "management": [str(e) for e in self.spec.management],
            "allow_out": [str(e) for e in self.spec.allow_out],
            "anti_spoofing": self.spec.anti_spoofing,
            "installed": [svc(s) for s in self.spec.installed],
            "lan": [{"interface": lan.interface, "prefixes": list(lan.prefixes),
                     "services": [svc(s) for s in lan.services]} for lan in self.spec.lans],
            "ruleset": self.ruleset,
        }


def _flows(manifest_file: str, manifest: Any) -> ServiceFlows:
    listen = sorted({p for proc in manifest.process.values() for p in proc.listen})
    connect = sorted({e for proc in manifest.process.values() for e in proc.connect},
                     key=lambda e: (e.network or "", e.proto, e.first, e.last))
    if manifest.network != "own":
        return ServiceFlows(manifest.name, os.path.abspath(manifest_file), tuple(listen),
                            tuple(connect))
    from corral.core.names import veth_name
    from corral.plan.etc import dns_endpoints

    # its resolvers too: behind a veth they cross this table (on the host network, via lo)
    connect = sorted(set(connect) | set(dns_endpoints(list(manifest.resolvers))),
                     key=lambda e: (e.network or "", e.proto, e.first, e.last))
    return ServiceFlows(manifest.name, os.path.abspath(manifest_file), tuple(listen),
                        tuple(connect), veth_name(manifest.name))


def installed_services() -> list[ServiceFlows]:
    """The services installed under CORRAL_ROOT, from the manifest each install record names.

    The manifest is read as it is now: a manifest edited without a new `install` opens here what
    its service table does not allow yet (or the reverse); `install` again to line both up."""
    from corral.manifest.model import load_manifest

    out = []
    for record_file in sorted(Path(lib_root()).glob("*/install.json")):
        name = record_file.parent.name
        if name == STATE:
            raise UsageError(f'an installed service is named "{STATE}": its table inet '
                             f"corral-{STATE} is the host's own table; uninstall it and install "
                             "it under another name")
        try:
            manifest_file = json.loads(record_file.read_text())["manifest"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeFailure(f"{record_file}: install record unreadable ({exc}); "
                                 "reinstall or uninstall that service") from None
        try:
            manifest = load_manifest(manifest_file)
        except InputError as exc:
            raise InputError([Problem(manifest_file, (), f"manifest of installed service {name}: "
                                      "not valid any more (fix it, or uninstall the service)"),
                              *exc.problems]) from None
        out.append(_flows(manifest_file, manifest))
    return out


def plan_host(file: str) -> HostPlan:
    """Everything `apply` would do, computed from the host file and the manifests it involves."""
    from corral.manifest.hostfile import load_host_file
    from corral.manifest.model import load_manifest

    host = load_host_file(file)  # InputError (exit 2) with FILE: key.path: message
    lans = []
    for lan in host.lan:
        paths = [os.path.join(os.path.dirname(file), s) for s in lan.services]
        lans.append(LanSpec(lan.interface, tuple(lan.prefixes),
                            tuple(_flows(p, load_manifest(p)) for p in paths)))
    spec = HostSpec(role=host.role, management=tuple(host.management),
                    allow_out=tuple(host.allow_out), anti_spoofing=host.anti_spoofing,
                    installed=tuple(installed_services()), lans=tuple(lans))
    with open(file, "rb") as handle:
        host_digest = hashlib.sha256(handle.read()).hexdigest()
    return HostPlan(os.path.abspath(file), host_digest, spec, host_ruleset(spec))


def warnings(plan: HostPlan) -> list[str]:
    if not plan.spec.management:
        return ["no management entries: after apply only the console (or a service's own port) "
                "reaches this host"]
    return []


def _pause(step: str) -> None:
    """Test hook: CORRAL_TEST_HOSTFW_PAUSE=<step> stops here, so a test can SIGKILL corral at
    exactly that point and watch the guard do its job anyway."""
    if os.environ.get("CORRAL_TEST_HOSTFW_PAUSE") == step:
        print(f"paused after {step}", file=sys.stderr, flush=True)
        time.sleep(3600)


# ---------------------------------------------------------------- apply, confirm, rollback

def apply(plan: HostPlan, timeout: float) -> dict[str, Any]:
    if not management_first(plan.ruleset, plan.spec):  # cannot happen; never risk it
        raise RuntimeFailure("internal error: ruleset would not accept management first; "
                             "nothing applied")
    try:
        nft.check(plan.ruleset)
    except nft.NftError as exc:
        raise RuntimeFailure(f"nft refused the ruleset: {exc}; nothing changed") from None
    directory = state_dir()
    with guard.locked(directory):
        pending = guard.read(directory / "pending.json")
        if pending is not None and not guard.is_running(pending):
            pending = None  # stale (reboot, or the guard was killed): nothing is really pending
        chained = pending is not None
        old_previous = guard.read(directory / "previous.json")
        fresh = None if chained else guard.snapshot()  # chained: keep the chain's first state
        previous = old_previous if fresh is None else fresh
        token = secrets.token_hex(16)
        guard_pid = None
        started = time.time()
        try:
            if fresh is not None:  # not chained
                guard.write(directory / "previous.json", fresh)
            guard_pid = guard.start_guard(directory, token, timeout)
            record = {"token": token, "guard_pid": guard_pid, "host_file": plan.host_file,
                      "host_digest": plan.host_digest, "role": plan.spec.role,
                      "ruleset_digest": _digest(plan.ruleset), "applied_at": guard.now(),
                      "confirm_timeout": timeout,
                      "rollback_at": iso(started + timeout),
                      "previous": "table" if previous and previous["present"] else "absent"}
            guard.write(directory / "pending.json", record)
            _pause("pending")
            nft.apply(plan.ruleset)
        except BaseException as exc:
            # Back to exactly the state files and table before this apply.
            guard.put(directory / "pending.json", pending)
            if guard_pid is not None:
                guard.stop_guard({"guard_pid": guard_pid, "token": token})
            if not chained:
                guard.put(directory / "previous.json", old_previous)
            if isinstance(exc, nft.NftError):
                raise RuntimeFailure(f"applying table inet {TABLE} failed: {exc}; "
                                     "the table was left as it was") from None
            raise
        if pending is not None:  # chained: that guard is superseded (its token is gone anyway)
            guard.stop_guard(pending)
        (directory / "rolled_back.json").unlink(missing_ok=True)
        _pause("applied")
    return {"table": f"inet {TABLE}", "host_file": plan.host_file, "role": plan.spec.role,
            "applied_at": record["applied_at"], "confirm_timeout": timeout,
            "rollback_at": record["rollback_at"], "guard_pid": guard_pid,
            "previous": record["previous"], "chained": chained}


def _same_file(pending: dict[str, Any], file: str) -> bool:
    if os.path.realpath(file) == os.path.realpath(pending.get("host_file") or ""):
        return True
    try:
        with open(file, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest() == pending.get("host_digest")
    except OSError:
        return False


def confirm(file: str) -> dict[str, Any]:
    directory = state_dir()
    with guard.locked(directory):
        pending = guard.read(directory / "pending.json")
        if pending is None:
            last = guard.read(directory / "rolled_back.json")
            if last:
                raise RuntimeFailure("nothing to confirm: the apply of "
                                     f"{last.get('host_file')} was rolled back at {last['at']} "
                                     f"({last['by']}); "
                                     f"{last.get('message', '')}. Apply it again")
            raise RuntimeFailure("nothing to confirm: no apply is pending")
        if not _same_file(pending, file):
            raise UsageError(f"{file}: the pending apply is of {pending['host_file']}, not this "
                             "file; nothing confirmed")
        running = guard.is_running(pending)
        (directory / "pending.json").unlink()   # this alone disarms the guard
        confirmed = {key: pending[key] for key in ("host_file", "host_digest", "role",
                                                   "ruleset_digest", "applied_at")}
        confirmed["confirmed_at"] = guard.now()
        guard.write(directory / "confirmed.json", confirmed)
    guard.stop_guard(pending)
    return {**confirmed, "table": f"inet {TABLE}", "rollback_at_cancelled": pending["rollback_at"],
            "guard_was_running": running}


def rollback(file: str) -> dict[str, Any]:
    """Restore the table saved by the last apply (pending or confirmed), now. `file` is only
    reported: an emergency rollback must not depend on a host file that may be broken."""
    directory = state_dir()
    with guard.locked(directory):
        previous = guard.read(directory / "previous.json")
        if previous is None:
            raise RuntimeFailure("nothing to roll back: no apply saved a previous state "
                                 "(or it was already rolled back)")
        pending = guard.read(directory / "pending.json")
        record = guard.roll_back(directory, previous, pending, by="corral host rollback")
    if pending:
        guard.stop_guard(pending)
    return {"table": f"inet {TABLE}", "host_file": os.path.abspath(file),
            "was_pending": pending is not None, "saved_at": previous["saved_at"], **record}


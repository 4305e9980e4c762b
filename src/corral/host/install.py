"""Apply a plan to the host and undo it: users, base image, volumes, the service's nft table.

Every step that changes the host registers its undo before the next step starts; a failure
runs the undos in reverse, so a failed install leaves the host as it found it. The install
record (state/install.json) is rewritten atomically after each step, so even a SIGKILLed install
leaves a record of what exists, which the next install or uninstall picks up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.core.errors import InputError, RuntimeFailure, UsageError
from corral.core.fsio import write_json
from corral.core.paths import (
    RECORD,
    RUNTIME,
    lib_dir,
    lib_root,
    log_dir,
    log_root,
    run_dir,
    run_root,
)
from corral.core.record import asdict
from corral.core.text import iso
from corral.host import image, loopfs, nft, runtime, users
from corral.host.base import next_version, record_version, versions
from corral.manifest import tomlfile
from corral.plan import nft_rules as nftables
from corral.plan.service import ServicePlan, UserSpec


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def read_record(service: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(lib_dir(service), RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{service}: install record unreadable: {exc}") from None


@dataclass
class Report:
    """What an install or uninstall changed, for people and for --json."""

    service: str
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_json(self) -> dict[str, Any]:
        # `changed` is a bool in every --json (up, down, install, uninstall); the list of what
        # changed is `changes` (docs/cli.md).
        return {"service": self.service, "changed": self.changed, "changes": self.changes}


class _Undo:
    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, action: Callable[[], Any]) -> None:
        self.steps.append((what, action))

    def run(self) -> list[str]:
        failed = []
        for what, action in reversed(self.steps):
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest; report what stayed
                failed.append(f"{what}: {exc}")
        return failed


def _fault(step: str) -> None:
    """Test hook: CORRAL_TEST_FAIL_AFTER=<step> makes install fail right after that step, so the
    tests can prove the undo path against real users, files and tables."""
    if os.environ.get("CORRAL_TEST_FAIL_AFTER") == step:
        raise RuntimeFailure(f"injected failure after step {step!r}")


def install(plan: ServicePlan, manifest_file: str, show_progress: bool = False) -> Report:
    state = Path(lib_dir(plan.service))
    record = read_record(plan.service) or {}
    original = json.loads(json.dumps(record))
    report = Report(plan.service)
    undo = _Undo()
    try:
        missing = [d for d in (state, *state.parents) if not d.exists()]
        for d in reversed(missing):
            if not d.exists():
                d.mkdir(mode=0o700)
                # Everything inside a directory this run created is this run's own work.
                undo.push(f"remove {d}", functools.partial(shutil.rmtree, d))
        undo.push("restore install record",
                  lambda: _save(state, original) if original
                  else (state / RECORD).unlink(missing_ok=True))
        record.update(service=plan.service, manifest=os.path.abspath(manifest_file))
        accounts = _install_users(plan, record, report, undo)
        _save(state, record)
        _fault("users")
        _install_base(plan, state, record, accounts, report, undo, show_progress)
        _save(state, record)
        _fault("base")
        _install_volumes(plan, state, record, report, undo)
        _save(state, record)
        _fault("volumes")
        _install_table(plan, record, report, undo)
        _save(state, record)
        _fault("table")
        spec = runtime_spec(plan, record)
        settings = _runtime_changes(state, spec)
        runtime.write(spec)
        if settings:
            report.changes.append("updated the run-time settings: " + ", ".join(settings))
        _remove_dropped_users(plan, record, report)
        record["installed_at"] = record.get("installed_at") or iso(time.time())
        _record_digest(record, manifest_file, plan.service)
        _save(state, record)
    except BaseException as exc:
        left = undo.run()
        message = f"install of {plan.service} failed: {exc}; undone"
        if left:
            message += "; could not undo: " + "; ".join(left)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise RuntimeFailure(message) from exc
    return report


def _record_digest(record: dict[str, Any], manifest_file: str, service: str) -> None:
    """The SHA-256 of the manifest's bytes, if they name this service: `corral run` of the same
    bytes then knows the service without parsing them (cli.base.installed_as). Read and parsed
    again here, so the digest and the name always come from the same bytes, whatever happened
    to the file since the plan read it."""
    record.pop("manifest_sha256", None)
    try:
        raw = tomlfile.read(manifest_file)
        if tomlfile.parse(manifest_file, raw).get("name") == service:
            record["manifest_sha256"] = tomlfile.digest(raw)
    except InputError:
        pass  # changed into something else meanwhile: run parses it


def runtime_spec(plan: ServicePlan, record: dict[str, Any]) -> runtime.ServiceSpec:
    """What `run` needs, with the uids install just made or found."""
    ids = {u["name"]: (u["uid"], u["gid"]) for u in record["users"]}
    processes = []
    for sandbox, flow in zip(plan.sandbox, plan.flows, strict=True):  # one each per process
        uid, gid = ids[sandbox.user]
        processes.append(runtime.ProcessSpec(
            name=sandbox.process, user=sandbox.user, uid=uid, gid=gid,
            command=list(sandbox.command), environment=dict(sandbox.environment),
            capabilities=list(sandbox.capabilities), limits=dict(sandbox.limits),
            seccomp=asdict(sandbox.seccomp),
            landlock=asdict(sandbox.landlock),
            listen=[str(p) for p in flow.listen],
            stop_signal=sandbox.stop_signal, stop_timeout=sandbox.stop_timeout,
            reload=sandbox.reload if isinstance(sandbox.reload, str) else list(sandbox.reload),
            setup=sandbox.setup, connect=[str(c) for c in flow.connect]))
    owners = {u.name: u.process for u in plan.users}
    return runtime.ServiceSpec(
        service=plan.service, base_version=record["base"]["version"], delta=plan.delta,
        delta_size=plan.delta_size, processes=processes,
        volumes=[runtime.VolumeSpec(v.path, v.store, owners[v.owner], v.journal, v.epoch, v.size)
                 for v in plan.volumes],
        watch=dict(plan.watch),
        exec_paths={s.process: list(s.executables) for s in plan.sandbox},
        log=dict(plan.log),
        network=dict(plan.network) if plan.network.get("mode") == "own" else {})


def _runtime_changes(state: Path, spec: runtime.ServiceSpec) -> list[str]:
    """What differs from the runtime.json in place (none on a first install): "process web:
    command", "watch", ... The base version is the base step's to report."""
    try:
        old = json.loads((state / RUNTIME).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return ["runtime.json (unreadable before)"]
    new = json.loads(json.dumps(spec.to_json()))  # tuples as the file has them: lists
    out = []
    olds = {p.get("name"): p for p in old.get("processes", []) if isinstance(p, dict)}
    for proc in new["processes"]:
        was = olds.pop(proc["name"], None)
        if was is None:
            out.append(f"process {proc['name']}: added")
            continue
        fields = sorted(k for k in set(proc) | set(was) if proc.get(k) != was.get(k))
        if fields:
            out.append(f"process {proc['name']}: " + " ".join(fields))
    out += [f"process {name}: removed" for name in olds]
    out += [key for key in sorted(set(new) - {"processes", "base_version"})
            if new.get(key) != old.get(key) and (new.get(key) or old.get(key))]
    return out


def _save(state: Path, record: dict[str, Any]) -> None:
    write_json(state / RECORD, record)


def _install_users(plan: ServicePlan, record: dict[str, Any], report: Report,
                   undo: _Undo) -> list[tuple[str, users.SystemUser]]:
    known = {u["name"] for u in record.get("users", [])}
    entries = {u["name"]: u for u in record.get("users", [])}
    accounts = []
    for spec in plan.users:
        existing = users.lookup(spec.name)
        if existing is not None:
            if spec.name not in known and not users.is_ours(spec):
                raise RuntimeFailure(f"user {spec.name} exists and was not created by corral; "
                                     "refusing to adopt it (remove or rename it first)")
            account = existing
        else:
            account = users.create(spec)
            undo.push(f"remove user {spec.name}", functools.partial(users.remove, spec))
            report.changes.append(f"created user {spec.name} (uid {account.uid})")
        entries[spec.name] = {"name": spec.name, "process": spec.process,
                              "uid": account.uid, "gid": account.gid}
        accounts.append((spec.comment, account))
    record["users"] = sorted(entries.values(), key=lambda u: u["name"])
    return accounts


def _remove_dropped_users(plan: ServicePlan, record: dict[str, Any], report: Report) -> None:
    wanted = {u.name for u in plan.users}
    for entry in list(record["users"]):
        if entry["name"] not in wanted:
            users.remove(UserSpec(entry["name"], plan.service, entry["process"]))
            record["users"].remove(entry)
            report.changes.append(f"removed user {entry['name']}")


def _install_base(plan: ServicePlan, state: Path, record: dict[str, Any],
                  accounts: list[tuple[str, users.SystemUser]], report: Report, undo: _Undo,
                  show_progress: bool) -> None:
    parts = {"image": digest({"image": plan.to_json()["image"]}),
             "accounts": digest([(c, a.name, a.uid, a.gid) for c, a in accounts])}
    wanted = digest(parts)
    base = record.get("base") or {}
    current = base.get("version")
    # What install last built (a `commit` or `base use` may have made another version current;
    # that choice stands as long as the inputs are those install built from).
    reasons = []
    if not current or not image.base_dir(state, current).is_dir():
        reasons.append("no base yet")
    else:
        if base.get("digest") != wanted:
            old = base.get("parts") or {}
            reasons += [{"image": "the manifest's image (include, add, volumes, owners)",
                         "accounts": "the service's users"}[k]
                        for k in parts if old.get(k) != parts[k]] or ["the image plan"]
        built = int(base.get("built") or current)
        reasons += [f"{path} changed" + (f" ({source})" if source else "")
                    for path, source in _changed_inputs(plan, state, built)]
        if not reasons:
            return
    version = next_version(state)
    path = image.build_base(plan, state, version, accounts, show_progress)
    undo.push(f"remove base {version}", lambda: shutil.rmtree(path, ignore_errors=True))
    undo.push("restore base record", functools.partial(record.__setitem__, "base", dict(base)))
    # The disk lists what exists, versions made by `base build` and `commit` included.
    record["base"] = {"version": version, "built": version, "digest": wanted, "parts": parts,
                      "versions": versions(state)}
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    report.changes.append(f"built base version {version} ({len(plan.image.entries)} entries)"
                          + ("" if reasons == ["no base yet"] else f": {shown}"))


def _changed_inputs(plan: ServicePlan, state: Path, version: int) -> list[tuple[str, str]]:
    """(image path, host source if added) of each file whose source's content is not what base
    `version` was built from (its integrity manifest's blake3)."""
    try:
        sealed = json.loads((image.base_dir(state, version) / "integrity.json").read_text())
        entries = sealed["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return [("the base's integrity manifest", "unreadable")]
    sources = {a.path: a.source for a in plan.image.added}
    return [(path, sources.get(path, "")) for path, blake in image.source_hashes(plan).items()
            if (entries.get(path) or {}).get("blake3") != blake]


def _install_volumes(plan: ServicePlan, state: Path, record: dict[str, Any], report: Report,
                     undo: _Undo) -> None:
    volumes_dir = state / "volumes"
    if not volumes_dir.exists():
        volumes_dir.mkdir(mode=0o711)
        undo.push("remove volumes dir", volumes_dir.rmdir)
    for vol in plan.volumes:
        owner = users.lookup(vol.owner)
        assert owner is not None  # created in the users step
        path = volumes_dir / vol.store
        if vol.size:
            loopfs.install_volume(state, vol.path, vol.store, vol.size, report.changes,
                                  undo.push)
        elif loopfs.has_image(state, vol.store):
            raise RuntimeFailure(f"volume {vol.path} has a file system of its own "
                                 f"({loopfs.sized(state, vol.store).image}); dropping its "
                                 "`size` is not supported: keep a size (it may grow)")
        if not path.exists():
            path.mkdir(mode=0o700)
            undo.push(f"remove volume {vol.path}", path.rmdir)
            report.changes.append(f"created volume {vol.path}")
        st = path.lstat()
        if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (owner.uid, owner.gid, vol.mode):
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
            os.chmod(path, vol.mode, follow_symlinks=False)
    record["volumes"] = [{"path": v.path, "store": v.store, "owner": v.owner,
                          "mode": f"{v.mode:04o}", "size": v.size} for v in plan.volumes]


def _install_table(plan: ServicePlan, record: dict[str, Any], report: Report,
                   undo: _Undo) -> None:
    group = nftables.nflog_group(plan.service)
    for other in Path(lib_root()).iterdir():
        if other.name != plan.service and (other / RECORD).exists() \
                and nftables.nflog_group(other.name) == group:
            raise RuntimeFailure(f"services {plan.service} and {other.name} would share NFLOG "
                                 f"group {group} (their watchers need one each); rename one")
    wanted = digest(plan.ruleset)
    exists = nft.table_exists(plan.service)
    if exists and record.get("table", {}).get("digest") == wanted:
        return
    if exists and "table" not in record:
        raise RuntimeFailure(f"nftables table {plan.table} exists and was not made by corral; "
                             "refusing to replace it")
    nft.apply_service_table(plan.service, plan.ruleset, exists)  # an isolation in force stays
    if not exists:
        undo.push(f"delete table {plan.table}", lambda: nft.delete_table(plan.service))
    record["table"] = {"name": plan.table, "digest": wanted}
    report.changes.append(f"applied nftables table {plan.table}")


def uninstall(service: str, purge: bool = False) -> Report:
    record = read_record(service)
    if record is None:
        raise UsageError(f"{service}: not installed")
    report = Report(service)
    state = Path(lib_dir(service))
    if nft.delete_table(service):
        report.changes.append(f"deleted nftables table inet {nftables.table_name(service)}")
    from corral.host import netns

    # network = "own": what a supervisor killed before its teardown left (a stopped one left
    # nothing)
    report.changes += [f"removed {what}" for what in netns.remove(service)]
    for entry in record.get("users", []):
        if users.remove(UserSpec(entry["name"], service, entry["process"])):
            report.changes.append(f"removed user {entry['name']}")
    from corral.host import unit

    if unit.disable(service):
        report.changes.append(f"removed the systemd unit {unit.unit_name(service)}")
    shutil.rmtree(run_dir(service), ignore_errors=True)
    report.changes += loopfs.unmount_all(state)
    if purge:
        shutil.rmtree(state)
        report.changes.append(f"removed {state} (volumes included)")
        if os.path.exists(log_dir(service)):
            shutil.rmtree(log_dir(service))
            report.changes.append(f"removed the logs in {log_dir(service)}")
    else:
        for child in state.iterdir():
            if child.name not in ("volumes", loopfs.IMAGES):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        report.changes.append(f"removed base images; volumes kept in {state / 'volumes'}")
    for parent in (run_root(), lib_root(), log_root()):
        try:
            os.rmdir(parent)  # only if no other service is left
        except OSError:
            pass
    return report


def build_next_base(service: str, show_progress: bool = False) -> int:
    """A new base version from the installed manifest as the host has it now (after a package
    upgrade, say). It is not used until `corral base use`."""
    from corral.manifest.model import load_manifest
    from corral.plan.service import plan_service

    record = read_record(service)
    if record is None:
        raise UsageError(f"{service}: not installed")
    plan = plan_service(record["manifest"], load_manifest(record["manifest"]))
    found = [(spec.comment, users.lookup(spec.name)) for spec in plan.users]
    accounts = [(comment, account) for comment, account in found if account is not None]
    if len(accounts) < len(found):
        raise RuntimeFailure(f"{service}: a user is missing; run corral install again")
    state = Path(lib_dir(service))
    version = next_version(state)
    image.build_base(plan, state, version, accounts, show_progress)
    record_version(state, version)
    return version

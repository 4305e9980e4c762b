"""Base versions: integrity manifests, verification, switching versions, and `commit`, which
folds a checked delta into a new version.

A base is corral's own tree, but `verify` exists because someone outside the service may have
changed it (a trojaned binary planted from the host side), so it is read like a hostile tree:
directory descriptors and O_NOFOLLOW all the way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from . import delta, runtime
from .atomic import write_json
from .errors import EXIT_CHECK, CorralError, RuntimeFailure, UsageError

INTEGRITY = "integrity.json"


class CheckFailed(CorralError):
    exit_code = EXIT_CHECK


def _walk(dir_fd: int, prefix: bytes, out: dict[str, dict[str, Any]]) -> None:
    for item in sorted(os.scandir(dir_fd), key=lambda e: e.name):
        name = os.fsencode(item.name)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        path = prefix + name
        entry: dict[str, Any] = {"kind": delta.KINDS.get(stat.S_IFMT(st.st_mode), "?"),
                                 "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                                 "uid": st.st_uid, "gid": st.st_gid}
        if stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
            entry["blake3"] = delta._hash_and_magic(dir_fd, name)[0]
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = delta.show(os.readlink(name, dir_fd=dir_fd))
        out[delta.show(path)] = entry
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dir_fd)
            try:
                _walk(sub, path + b"/", out)
            finally:
                os.close(sub)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Every entry of a tree: type, mode, owner, size, blake3 or symlink text."""
    out: dict[str, dict[str, Any]] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _walk(fd, b"/", out)
    finally:
        os.close(fd)
    return out


def seal(version_dir: Path) -> None:
    """Record the integrity manifest of a freshly built base.

    The base stays read-only by construction rather than by mode bits (which would leak into
    the service's view through the overlay, e.g. a /tmp without write permission): it lives in
    a root-only directory, overlayfs never writes to a lower layer, and `verify` reports any
    change made to it from outside."""
    entries = snapshot(version_dir / "root")
    data = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hash": "blake3", "entries": entries}
    write_json(version_dir / INTEGRITY, data)


def verify(state: Path, version: int) -> dict[str, Any]:
    version_dir = state / "base" / str(version)
    try:
        recorded = json.loads((version_dir / INTEGRITY).read_text())["entries"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeFailure(f"base {version}: integrity manifest unreadable: {exc}") from None
    current = snapshot(version_dir / "root")
    problems = []
    for path in sorted(set(recorded) | set(current)):
        was, now = recorded.get(path), current.get(path)
        if was == now:
            continue
        if was is None:
            problems.append({"path": path, "change": "added", "now": now})
        elif now is None:
            problems.append({"path": path, "change": "deleted", "was": was})
        else:
            fields = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            problems.append({"path": path, "change": "modified", "fields": fields,
                             "was": was, "now": now})
    return {"version": version, "entries": len(recorded), "problems": problems}


def versions(state: Path) -> list[int]:
    base = state / "base"
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())


def list_versions(spec: runtime.ServiceSpec) -> list[dict[str, Any]]:
    out = []
    for version in versions(spec.state):
        try:
            meta = json.loads((spec.state / "base" / str(version) / "image.json").read_text())
        except (OSError, ValueError):
            meta = {}
        out.append({"version": version, "current": version == spec.base_version,
                    "entries": meta.get("entries"), "bytes": meta.get("bytes"),
                    "from": meta.get("from"), "note": meta.get("note")})
    return out


def use(spec: runtime.ServiceSpec, version: int) -> runtime.ServiceSpec:
    if version not in versions(spec.state):
        raise UsageError(f"{spec.service}: no base version {version} "
                         f"(have {', '.join(map(str, versions(spec.state))) or 'none'})")
    updated = dataclasses.replace(spec, base_version=version)
    runtime.write(updated)
    record_path = spec.state / "install.json"
    record = json.loads(record_path.read_text())
    record.setdefault("base", {})["version"] = version
    write_json(record_path, record)
    return updated


# -- commit -----------------------------------------------------------------------------------

def refusals(changes: list[delta.Change], allow: list[str]) -> list[str]:
    """Why each change may not be folded into the base without being named in --allow."""
    allowed = tuple(a.rstrip("/") for a in allow)

    def is_allowed(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in allowed)

    out = []
    for change in changes:
        path = delta.show(change.path)
        if is_allowed(path):
            continue
        why = []
        if change.setid:
            why.append("setuid/setgid")
        if change.executable:
            why.append("executable or library")
        if change.path.startswith(delta.SENSITIVE_PREFIXES):
            why.append("protected path")
        if why:
            out.append(f"{path}: {change.change}, {' and '.join(why)}")
    return out


def _apply_upper(upper_fd: int, dest: Path, prefix: str = "") -> None:
    """Copy the upper layer over a copy of the base: whiteouts delete, opaque dirs replace."""
    for item in sorted(os.scandir(upper_fd), key=lambda e: e.name):
        name = item.name
        st = os.stat(name, dir_fd=upper_fd, follow_symlinks=False)
        target = dest / prefix / name
        if os.path.lexists(target) and (delta._is_whiteout(st) or not stat.S_ISDIR(st.st_mode)
                                        or not target.is_dir() or target.is_symlink()):
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() \
                else target.unlink()
        if delta._is_whiteout(st):
            continue
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=upper_fd)
            try:
                if target.is_dir() and delta._is_opaque(sub):
                    shutil.rmtree(target)
                target.mkdir(exist_ok=True)
                _apply_upper(sub, dest, f"{prefix}{name}/")
            finally:
                os.close(sub)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=upper_fd), target)
        elif stat.S_ISREG(st.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=upper_fd)
            try:
                with open(target, "xb") as out, os.fdopen(os.dup(src), "rb") as data:
                    shutil.copyfileobj(data, out)
            finally:
                os.close(src)
        else:
            continue  # devices, fifos and sockets never enter a base
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(st.st_mode) & 0o1777)  # never setuid in a base
            os.chown(target, st.st_uid, st.st_gid)


def commit(spec: runtime.ServiceSpec, upper_fd: int, base_fd: int,
           allow: list[str]) -> dict[str, Any]:
    """Fold the delta into base version max+1 and make it the current one."""
    found = delta.changes(upper_fd, base_fd)
    if not found:
        raise UsageError(f"{spec.service}: the delta is empty; nothing to commit")
    refused = refusals(found, allow)
    if refused:
        raise CheckFailed(f"{spec.service}: commit refused; these changes need --allow PATH:\n  "
                          + "\n  ".join(refused))
    version = max(versions(spec.state)) + 1
    final = spec.state / "base" / str(version)
    work = spec.state / "base" / f".building-{version}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        # cp -a keeps every link and owner and never follows a symlink; the base is ours.
        subprocess.run(["cp", "-a", "--reflink=auto", str(spec.base_root), str(work / "root")],
                       check=True, capture_output=True)
        _apply_upper(upper_fd, work / "root")
        previous = json.loads((spec.base_root.parent / "image.json").read_text())
        (work / "image.json").write_text(json.dumps(
            dict(previous, version=version, note=f"commit of the delta on base "
                 f"{spec.base_version}", changes=len(found)), indent=2) + "\n")
        seal(work)
        meta = json.loads((work / "image.json").read_text())
        meta["entries"] = len(json.loads((work / INTEGRITY).read_text())["entries"])
        (work / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    use(spec, version)
    return {"service": spec.service, "version": version, "from_version": spec.base_version,
            "changes": [c.to_json() for c in found]}

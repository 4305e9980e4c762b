"""Base versions: integrity manifests, verification, switching versions, and `commit`, which
folds a checked delta into a new version.

A base is corral's own tree, but `verify` exists because someone outside the service may have
changed it (a trojaned binary planted from the host side), so it is read like a hostile tree:
directory descriptors and O_NOFOLLOW all the way.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from corral.core import tree
from corral.core.errors import EXIT_CHECK, CorralError, RuntimeFailure, UsageError
from corral.core.fsio import write_json
from corral.core.paths import RECORD
from corral.core.record import replace
from corral.core.text import show
from corral.core.tree import KINDS, hash_and_magic
from corral.host import runtime

INTEGRITY = "integrity.json"


class CheckFailed(CorralError):
    exit_code = EXIT_CHECK


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Every entry of a tree: type, mode, owner, size, blake3 or symlink text. A tree the walk
    cannot see whole (tree.WalkError) raises: an integrity manifest must not have holes."""
    out: dict[str, dict[str, Any]] = {}
    with tree.directory(str(root)) as fd:
        for item in tree.walk(fd):
            st = item.st
            entry: dict[str, Any] = {"kind": KINDS.get(stat.S_IFMT(st.st_mode), "?"),
                                     "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                                     "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["blake3"] = hash_and_magic(item.dir_fd, item.name)[0]
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = show(os.readlink(item.name, dir_fd=item.dir_fd))
            out[show(item.path)] = entry
    return out


def seal(version_dir: Path) -> None:
    """Record the integrity manifest of a freshly built base.

    The base stays read-only by construction rather than by mode bits (which would leak into
    the service's view through the overlay, e.g. a /tmp without write permission): it lives in
    a root-only directory, overlayfs never writes to a lower layer, and `verify` reports any
    change made to it from outside."""
    entries = snapshot(version_dir / "root")
    data: dict[str, Any] = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "hash": "blake3", "entries": entries}
    from corral.host import baseimage

    # What the root is read from (host.baseimage); without it, a start says why. Its hash is
    # recorded beside the tree's: `verify` checks both.
    if baseimage.build(version_dir) is None:
        data["image"] = baseimage.fingerprint(version_dir)
    write_json(version_dir / INTEGRITY, data)


def verify(state: Path, version: int) -> dict[str, Any]:
    version_dir = state / "base" / str(version)
    try:
        sealed = json.loads((version_dir / INTEGRITY).read_text())
        recorded = sealed["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeFailure(f"base {version}: integrity manifest unreadable: {exc}") from None
    problems = compare(recorded, snapshot(version_dir / "root"))
    if sealed.get("image"):  # the read-only image the service's root is (host.baseimage)
        from corral.host import baseimage

        now = baseimage.fingerprint(version_dir)
        if now != sealed["image"]:
            problems.append({"path": baseimage.IMAGE, "change": "deleted" if now is None
                             else "modified", "was": sealed["image"], "now": now})
    return {"version": version, "entries": len(recorded), "problems": problems}


def compare(recorded: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Differences between an integrity manifest and a snapshot (bases and host images)."""
    problems: list[dict[str, Any]] = []
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
    return problems


def versions(state: Path) -> list[int]:
    base = state / "base"
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())


def next_version(state: Path) -> int:
    """The number of a new base version, for install, `base build` and `commit` alike. It
    comes from the disk, the one source of truth: a number taken from the install record,
    which the other two paths do not build through, could name a directory that exists."""
    return max(versions(state), default=0) + 1


def record_version(state: Path, version: int, current: bool = False) -> None:
    """Note a version that now exists on disk in the install record (and, if `current`, make
    it the one in use), so the record lists what the disk holds."""
    record_path = state / RECORD
    record = json.loads(record_path.read_text())
    base = record.setdefault("base", {})
    base["versions"] = sorted(set(base.get("versions", [])) | {version})
    if current:
        base["version"] = version
    write_json(record_path, record)


def list_versions(spec: runtime.ServiceSpec) -> list[dict[str, Any]]:
    out = []
    state = Path(spec.state)
    for version in versions(state):
        try:
            meta = json.loads((state / "base" / str(version) / "image.json").read_text())
        except (OSError, ValueError):
            meta = {}
        out.append({"version": version, "current": version == spec.base_version,
                    "entries": meta.get("entries"), "bytes": meta.get("bytes"),
                    "from": meta.get("from"), "note": meta.get("note")})
    return out


def use(spec: runtime.ServiceSpec, version: int) -> runtime.ServiceSpec:
    state = Path(spec.state)
    if version not in versions(state):
        raise UsageError(f"{spec.service}: no base version {version} "
                         f"(have {', '.join(map(str, versions(state))) or 'none'})")
    updated = replace(spec, base_version=version)
    runtime.write(updated)
    record_version(state, version, current=True)
    return updated

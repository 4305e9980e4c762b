"""What every export reads: a manifest (from a FILE, or the one an installed NAME was installed
from), and the host facts a target needs besides it (uids, the base image's path).

Exports are pure text built from these: they never change the host, so `corral export` is safe
to run anywhere, installed or not."""

from __future__ import annotations

import json
import pwd
from dataclasses import dataclass
from pathlib import Path

from corral.core.errors import UsageError
from corral.core.paths import RECORD, lib_dir
from corral.manifest.model import Manifest, load_manifest

# A service that is not installed here has no users yet; its exports get stable uids from this
# range (above Debian's dynamic system users, below 65534), one per process in manifest order.
FALLBACK_UID = 61000


@dataclass(frozen=True)
class Source:
    manifest: Manifest
    file: str  # the manifest file (for `image.add` sources and messages)
    installed: bool  # NAME was installed here (uids and base version are the host's)
    base_version: int
    uids: dict[str, int]  # process -> uid
    gids: dict[str, int]  # process -> gid of its own group

    @property
    def base_root(self) -> Path:
        return Path(lib_dir(self.manifest.name), "base", str(self.base_version), "root")

    def volume_dir(self, store: str) -> Path:
        return Path(lib_dir(self.manifest.name), "volumes", store)


def _record(name: str) -> dict | None:
    try:
        data = json.loads(Path(lib_dir(name), RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_source(target: str, is_file: bool) -> Source:
    """A FILE is read as it is; a NAME must be installed (its install record names the manifest
    file install used). Bad input raises UsageError/InputError: exit 2, nothing written."""
    if is_file:
        m = load_manifest(target)
        file = target
        record = _record(m.name)
    else:
        record = _record(target)
        if record is None or not isinstance(record.get("manifest"), str):
            raise UsageError(f"{target}: not installed here (export a manifest FILE instead)")
        file = record["manifest"]
        m = load_manifest(file)
    # Only an installed service's users are looked up: a user of that name on a host where it
    # is not installed is not its user, and the export of a FILE must not vary by host.
    uids, gids = {}, {}
    for i, process in enumerate(m.process):
        uids[process] = gids[process] = FALLBACK_UID + i
        if record is not None:
            try:
                entry = pwd.getpwnam(m.user_of(process))
            except KeyError:
                continue
            uids[process], gids[process] = entry.pw_uid, entry.pw_gid
    version = (record or {}).get("base", {}).get("version", 1)
    return Source(manifest=m, file=file, installed=record is not None,
                  base_version=int(version), uids=uids, gids=gids)

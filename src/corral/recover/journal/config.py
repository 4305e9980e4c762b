"""Which volumes of an installed service are journaled, and how the journal freezes the
service around an epoch's boundary. The supervisor and `corral state` both use these."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.core.errors import UsageError
from corral.core.paths import RECORD
from corral.recover.journal.store import HEAD

EXCISE_MARK = "excise-frozen.json"  # in the run directory: journal.online froze the service


@dataclass(frozen=True)
class JournaledVolume:
    store: str
    path: str  # inside the service's root
    epoch: int  # seconds between scheduled closes
    owner: str  # the process that may write it: the writer of every change


def journal_config(service: str) -> tuple[Any, list[JournaledVolume], int]:
    """(runtime spec, journaled volumes, quiet seconds) of an installed service. runtime.json
    does not carry journal/epoch/quiet (yet): they come from the manifest named in install.json;
    if that is gone, a volume that already has a journal counts as journaled."""
    from corral.host import runtime

    spec = runtime.read(service)
    if spec is None:
        raise UsageError(f"{service}: not installed (corral install FILE first)")
    manifest = None
    if spec.volumes and all(getattr(v, "journal", None) is not None for v in spec.volumes) \
            and "quiet" in (spec.watch or {}):
        found = [JournaledVolume(v.store, v.path, int(v.epoch or 600), v.owner)
                 for v in spec.volumes if v.journal]
        return spec, found, int(spec.watch["quiet"])
    try:
        record = json.loads(Path(spec.state, RECORD).read_text())
        from corral.manifest.model import load_manifest

        manifest = load_manifest(record["manifest"])
    except (OSError, ValueError, KeyError, UsageError):
        pass
    declared = {v.path: v for v in manifest.all_volumes()} if manifest else {}
    found = []
    for vol in spec.volumes:
        journaled, epoch = getattr(vol, "journal", None), getattr(vol, "epoch", None)
        if journaled is None and vol.path in declared:
            journaled, epoch = declared[vol.path].journal, declared[vol.path].epoch
        if journaled is None:
            journaled = Path(spec.state, "journal", vol.store, HEAD).exists()
        if journaled:
            found.append(JournaledVolume(vol.store, vol.path, int(epoch or 600), vol.owner))
    return spec, found, manifest.watch.quiet if manifest else 86400


def journaled_volumes(service: str) -> list[tuple[str, str, int]]:
    """(store, path inside the root, epoch seconds) of each journaled volume."""
    return [(v.store, v.path, v.epoch) for v in journal_config(service)[1]]


def freezer(spec: Any, hold: Callable[[], bool] = lambda: False
            ) -> Callable[[], AbstractContextManager[Any]]:
    """A `freeze` for close_epoch: every process cgroup of the service frozen around the scan,
    so no file changes while it is read, and thawed in `finally`. A cgroup already frozen (the
    "isolate" reaction) is left as it is, frozen. A closer killed while the service is frozen
    leaves it frozen: the supervisor should thaw a cgroup it did not freeze itself once it can
    take the journal's lock (nobody is closing). `hold()` true at the end: leave them frozen
    (the supervisor's worker closes epochs while its loop may isolate the service meanwhile)."""

    @contextmanager
    def frozen() -> Iterator[None]:
        from corral.launch import cgroup

        groups = []
        run = getattr(spec, "run", None)
        if run is not None and os.path.exists(os.path.join(run, EXCISE_MARK)):
            yield  # an excision holds the service frozen (journal.online): not ours to thaw
            return
        try:
            for proc in spec.processes:
                group = cgroup.Cgroup(spec.service, proc.name)
                if any(os.path.isdir(d) for d in group.paths.values()) \
                        and not group.stats()["frozen"]:
                    groups.append(group)
                    group.freeze()
            yield
        finally:
            for group in groups if not hold() else ():
                group.thaw()

    return frozen

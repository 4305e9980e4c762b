"""The supervisor's side of the redo log: each journaled volume's epochs end on the volume's
schedule, at every incident and revert, and at stop. A journal that fails (a full disk) never
stops the watcher: its error is logged and shown by `corral status` until an epoch closes again."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from corral.core import log
from corral.host.runtime import ServiceSpec

DEFAULT_EPOCH = 600.0  # seconds, when the volume sets none


class Journals:
    def __init__(self, spec: ServiceSpec):
        self.spec = spec
        self.open: list[list[Any]] = []  # [journal, volume, next close (monotonic)]
        self.health: dict[str, str] = {}  # volume path -> "ok" or the last error

    def start(self) -> None:
        """Finish what a crash interrupted, start each volume's log if new."""
        volumes = [v for v in self.spec.volumes if getattr(v, "journal", False)]
        if not volumes:
            return
        from corral.recover.journal.journal import Journal

        for vol in volumes:
            journal = Journal(self.spec, vol.store)
            mount = self.spec.root / vol.path.lstrip("/")  # the service's view of it
            if os.path.ismount(mount):  # an excision finished here writes through it
                journal.write_root = mount
            journal.recover()
            journal.ensure()
            self.open.append([journal, vol, time.monotonic() + (vol.epoch or DEFAULT_EPOCH)])
            self.health[vol.path] = "ok"

    def close_epochs(self, reason: str, incidents: tuple[str, ...], due_only: bool,
                     writer_pid: Callable[[str], int | None], running: bool) -> bool:
        """End the open epoch of every journaled volume (only those due when `due_only`).
        Returns whether a volume's health changed (the caller rewrites its state)."""
        if not self.open:
            return False
        from corral.recover.journal.config import freezer
        from corral.recover.journal.online import settle

        now = time.monotonic()
        changed = False
        for entry in self.open:
            journal, vol, due = entry
            if due_only and now < due:
                continue
            entry[2] = now + (vol.epoch or DEFAULT_EPOCH)
            hint = {"process": vol.owner, "pid": writer_pid(vol.owner)}
            try:
                if running and (done := settle(journal, self.spec)):
                    log.warning(f"journal {vol.path}: {done}")
                journal.close_epoch(reason, incidents=incidents, writer_hint=hint,
                                    freeze=freezer(self.spec) if running else None,
                                    wait=not due_only)
                health = "ok"
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the watcher
                health = f"error: {exc}"
                log.error(f"journal {vol.path}: {exc}")
            if self.health.get(vol.path) != health:
                self.health[vol.path] = health
                changed = True
        return changed

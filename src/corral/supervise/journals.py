"""The supervisor's side of the redo log: each journaled volume's epochs end on the volume's
schedule, at every incident and revert, and at stop. A journal that fails (a full disk) never
stops the watcher: its error is logged and shown by `corral status` until an epoch closes again.

Closes while the service runs (its schedule, an incident) go to one worker thread: a scan
reads what the service wrote, which the service chooses, so it must never hold up the loop that
answers exec notifications and reacts (red team finding 6). Its reads and hashes release the
GIL. The scan itself is bounded too (recover/journal/fs.py). A revert's and the stop's closes
run inline after the worker is done, since the processes are dead then and the next start must
not write into the epoch being closed."""

from __future__ import annotations

import _thread
import os
import time
from collections.abc import Callable

from corral.core import log
from corral.core.fsio import ReserveRefused
from corral.host.runtime import ServiceSpec

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    import threading
    from typing import Any

DEFAULT_EPOCH = 600.0  # seconds, when the volume sets none

Request = tuple[str, tuple[str, ...], bool, bool]  # reason, incidents, due_only, running


class Journals:
    def __init__(self, spec: ServiceSpec, hold: Callable[[], bool] = lambda: False):
        self.spec = spec
        self.hold = hold  # true while the service is isolated: a close must not thaw it
        self.open: list[list[Any]] = []  # [journal, volume, next close (monotonic)]
        self.health: dict[str, str] = {}  # volume path -> "ok" or the last error
        self.changed = False  # a health changed on the worker: the loop rewrites its state
        self._queue: list[Request] = []
        # _thread's lock, and threading imported for the first worker only: journaled volumes
        # are rare, and threading costs every `corral run` ~0.5 ms (bench/README.md).
        self._lock = _thread.allocate_lock()
        self._worker: threading.Thread | None = None
        self._writer_pid: Callable[[str], int | None] = lambda _: None
        # Told of each close refused to keep corral's reserve (from the worker thread too).
        self.on_refusal: Callable[[dict[str, Any]], None] = lambda _: None

    def start(self) -> None:
        """Finish what a crash interrupted, start each volume's log if new."""
        volumes = [v for v in self.spec.volumes if getattr(v, "journal", False)]
        if not volumes:
            return
        from pathlib import Path  # journaled volumes only: not on every launch (core.paths)

        from corral.recover.journal.journal import Journal

        for vol in volumes:
            journal = Journal(self.spec, vol.store)
            mount = os.path.join(self.spec.root, vol.path.lstrip("/"))  # the service's view
            if os.path.ismount(mount):  # an excision finished here writes through it
                journal.write_root = Path(mount)
            journal.recover()
            journal.ensure()
            self.open.append([journal, vol, time.monotonic() + (vol.epoch or DEFAULT_EPOCH)])
            self.health[vol.path] = "ok"

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def due(self) -> bool:
        now = time.monotonic()
        return any(now >= entry[2] for entry in self.open)

    def request(self, reason: str, incidents: tuple[str, ...], due_only: bool,
                writer_pid: Callable[[str], int | None], running: bool) -> None:
        """Close on the worker thread; returns at once. Requests made while it works are
        queued and closed in order."""
        if not self.open:
            return
        self._writer_pid = writer_pid
        with self._lock:
            if due_only and any(r[2] for r in self._queue):
                return  # a scheduled close is already waiting
            self._queue.append((reason, incidents, due_only, running))
            if self.busy:
                return
            import threading

            self._worker = threading.Thread(target=self._work, name="journal", daemon=True)
            self._worker.start()

    def wait(self) -> None:
        """Until the worker has closed everything asked of it."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                reason, incidents, due_only, running = self._queue.pop(0)
            try:
                if self.close_epochs(reason, incidents, due_only, self._writer_pid, running):
                    self.changed = True
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the journal
                log.error(f"journal worker: {exc!r}")

    def close_epochs(self, reason: str, incidents: tuple[str, ...], due_only: bool,
                     writer_pid: Callable[[str], int | None], running: bool) -> bool:
        """End the open epoch of every journaled volume (only those due when `due_only`), on
        the calling thread. Returns whether a volume's health changed (the caller rewrites its
        state)."""
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
                                    freeze=freezer(self.spec, self.hold) if running else None,
                                    wait=not due_only)
                health = "ok"
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the watcher
                health = f"error: {exc}"
                log.error(f"journal {vol.path}: {exc}")
                refused = refusal(exc)
                if refused is not None:
                    self.on_refusal(refused.detail | {"volume": vol.path})
            if self.health.get(vol.path) != health:
                self.health[vol.path] = health
                changed = True
        return changed


def refusal(exc: BaseException) -> ReserveRefused | None:
    """The reserve's refusal behind a failure (the journal wraps its OSErrors), if one is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ReserveRefused):
            return seen
        seen = seen.__cause__
    return None

"""The `flood` tripwire: a file system with a limit is full.

The limits themselves are the kernel's: a sized volume and a disk delta are file systems of their
own (host.loopfs), a tmpfs delta has its `size`; past it a write fails with ENOSPC and the
host's file system loses nothing. This sensor says so: each tick of the supervisor's loop it
calls statvfs (a microsecond) on each of them, and on the state file system, where corral keeps
its reserve (core.fsio.keep_reserve). A file system whose free space (or free inodes) falls
under its low mark makes ONE event, and the next only after it has had twice that free again
(an episode, not a tick: a full volume stays full until someone acts).

A write corral refused to keep its reserve (a journal close, an archive) comes in through
`refused` from whatever thread made it, and is an event too, unless the state file system's
episode is already reported.
"""

from __future__ import annotations

import collections
import os

from corral.core.fsio import reserve_of
from corral.core.record import record
from corral.host.runtime import ServiceSpec
from corral.watch.event import Event

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

INTERVAL = 0.25  # seconds: the supervisor loop's tick
# A limited file system is full under 1% free, within these: a writer meets ENOSPC with up to
# about its write's size still free (ext4 keeps blocks back for delayed allocation's metadata:
# 1 MiB writes stopped with 450-600 KiB "available" on 32-64 MiB volumes).
LOW_MIN, LOW_MAX = 2 << 20, 16 << 20


@record
class Watched:
    filesystem: str  # "volume", "delta" or "state"
    path: str  # what statvfs is called on
    label: dict[str, Any]  # what the incident names: the volume, the delta's kind, the path
    owner: str | None = None  # the process that writes it, when one does
    size: int = 0  # the declared size (0: the state file system, which has none)
    full: bool = False  # an episode is open (its event made)


def watched_of(spec: ServiceSpec) -> list[Watched]:
    out = []
    for v in spec.volumes:
        if v.size:
            from corral.host import loopfs  # only then: it imports pathlib (core.paths)

            out.append(Watched("volume", str(loopfs.sized(spec.state, v.store).top),
                               {"volume": v.path}, v.owner, v.size))
    out.append(Watched("delta", spec.delta_dir, {"delta": spec.delta}, None,
                       spec.delta_size))
    out.append(Watched("state", spec.state, {"path": spec.state}))
    return out


def low_mark(w: Watched, st: os.statvfs_result) -> int:
    if w.filesystem == "state":
        return reserve_of(st)
    return min(LOW_MAX, max(LOW_MIN, st.f_blocks * st.f_frsize // 100))


class FloodSensor:
    name = "flood"
    interval = INTERVAL

    def __init__(self, watched: list[Watched]):
        self.watched = watched
        self.refusals: collections.deque[dict[str, Any]] = collections.deque()
        self.state = self.ON = f"on (statvfs of {len(watched)} file systems every {INTERVAL:g}s)"

    def fileno(self) -> None:
        return None

    def close(self) -> None:
        pass

    def refused(self, detail: dict[str, Any]) -> None:
        """A write refused to keep the reserve (any thread: a deque's append is atomic)."""
        self.refusals.append(detail)

    def drain(self, now: float) -> list[Event]:
        events: list[Event] = []
        errors = []
        for w in self.watched:
            try:
                st = os.statvfs(w.path)
            except OSError as exc:
                errors.append(f"{w.path}: {exc.strerror}")
                continue
            free, low = st.f_bavail * st.f_frsize, low_mark(w, st)
            inodes_low = st.f_files // 1000 if st.f_files else -1  # -1: none to run out of
            if not w.full and (free < low or st.f_favail <= inodes_low):
                w.full = True
                events.append(self._event(w, st, low))
            elif w.full and free >= 2 * low and st.f_favail > 2 * inodes_low:
                w.full = False  # the episode is over: the next flood is a new one
        while self.refusals:
            detail = self.refusals.popleft()
            state = next((w for w in self.watched if w.filesystem == "state"), None)
            if state is not None and state.full:
                continue  # its episode is reported; the refusals are in the journal's health
            if state is not None:
                state.full = True
            events.append(Event("flood", None, None, 0.0, dict(detail), "detected"))
        self.state = f"error: {'; '.join(errors)}" if errors else self.ON
        return events

    def _event(self, w: Watched, st: os.statvfs_result, low: int) -> Event:
        total = st.f_blocks * st.f_frsize
        detail = dict(w.label, filesystem=w.filesystem, size=w.size or None, total=total,
                      used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                      free=st.f_bavail * st.f_frsize, low=low, inodes_free=st.f_favail)
        if w.filesystem == "state":
            detail["reserve"] = low
        if w.owner:
            detail["owner"] = w.owner
        # No time stamp of the act (the write that filled it): `act_clock` "detected".
        return Event("flood", None, None, 0.0, detail, "detected")

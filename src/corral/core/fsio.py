"""Files that are replaced whole: a killed corral (or a crash of the machine) leaves the old
version or the new one, never half of one. The one writer for the whole package: the install
record, runtime.json, state.json, integrity manifests, `corral learn`'s output and the
journal's files all go through `write_durable` (tmp + fsync + rename + fsync of the directory).
What lives only as long as the boot (state.json under /run) goes through `write_atomic`: the
same replacement without the fsyncs.

The journal's crash tests stop the process between two durable steps: every function here
takes `step`, called after each write, fsync, rename and unlink that crash consistency depends
on (recover.journal.store passes its `point`). Elsewhere it is a no-op.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

    StrPath = str | os.PathLike[str]  # paths are strings on the launch path (core.paths)


def _no_step() -> None:
    pass


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: StrPath, step: Callable[[], None] = _no_step) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    step()


def write_durable(path: StrPath, data: bytes, mode: int = 0o600,
                  step: Callable[[], None] = _no_step) -> None:
    """Replace `path` atomically: readers (and a crash) see the old file or the new one.
    `mode` is passed to open(2), so the umask applies. The temporary file sits next to `path`
    (same file system, so the rename is atomic) and is removed on any failure (ENOSPC and the
    like leave no half-written tmp)."""
    _replace(path, data, mode, step, sync=True)


def write_atomic(path: StrPath, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` atomically for readers and for a killed writer, without making it durable
    (no fsync): for files whose life ends with the boot, such as state.json under /run. Each of
    a launch's state writes cost two fsyncs, 1-3 ms together where /run is not a tmpfs."""
    _replace(path, data, mode, _no_step, sync=False)


def _replace(path: StrPath, data: bytes, mode: int, step: Callable[[], None],
             sync: bool) -> None:
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     mode)
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        step()
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    step()
    if sync:
        fsync_dir(folder or ".", step)


def unlink_durable(paths: Iterable[StrPath], step: Callable[[], None] = _no_step) -> None:
    """Remove files (missing ones are fine), then make each removal durable."""
    dirs = set()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        step()
        dirs.add(os.path.dirname(os.fspath(path)) or ".")
    for d in dirs:
        fsync_dir(d, step)


def write_text(path: StrPath, text: str) -> None:
    # 0o666 less the umask: the mode open(path, "w") gave these files before.
    write_durable(path, text.encode(), mode=0o666)


def write_json(path: StrPath, data: Any, sort_keys: bool = True, durable: bool = True) -> None:
    text = json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"
    if durable:
        write_text(path, text)
    else:
        write_atomic(path, text.encode(), mode=0o666)  # write_text's mode


# -- corral's reserve on the state file system ------------------------------------------------
# What corral writes there on its own (journal epochs, delta archives) never takes the last of
# it: the install record, incidents and state.json must still fit when a service (an unsized
# volume, another program of the host) has filled the rest.
RESERVE_MIN = 64 << 20
RESERVE_FRACTION = 100  # 1 %


RESERVE_VARIABLE = "CORRAL_STATE_RESERVE"  # bytes instead of the default; 0: no reserve


def reserve_of(st: os.statvfs_result) -> int:
    setting = os.environ.get(RESERVE_VARIABLE, "").strip()
    if setting.isdigit():
        return int(setting)
    return max(RESERVE_MIN, st.f_blocks * st.f_frsize // RESERVE_FRACTION)


class ReserveRefused(OSError):
    """A write refused to keep corral's reserve; `detail` says where and how much (for the
    `flood` incident). An OSError, so that the writers' existing handling of a full disk
    (nothing half-written, the journal unchanged) applies as it is."""

    def __init__(self, message: str, detail: dict[str, Any]):
        super().__init__(28, message)  # ENOSPC: what the write would have met
        self.detail = detail

    def __str__(self) -> str:
        return self.strerror or ""


def keep_reserve(path: StrPath, need: int, what: str) -> None:
    """Raise ReserveRefused unless writing `need` more bytes to the file system of `path`
    leaves corral's reserve free (max(64 MiB, 1%))."""
    st = os.statvfs(path)
    free, reserve = st.f_bavail * st.f_frsize, reserve_of(st)
    if reserve and free - need < reserve:
        mib = lambda n: f"{n / (1 << 20):.1f} MiB"  # noqa: E731
        raise ReserveRefused(
            f"{what}: refused to write {mib(need)} to the file system of {path}: "
            f"{mib(free)} free, and corral keeps {mib(reserve)} in reserve",
            {"filesystem": "state", "path": str(path), "need": need, "free": free,
             "reserve": reserve, "refused": what})

"""The `base-write` tripwire, event-driven: fanotify on the file system that holds the delta.

The overlay mount itself cannot be marked (overlayfs has no file handles without
`index=on,nfs_export=on`), but its upper layer is a plain directory of the delta's tmpfs,
and every change the service makes through the overlay is a change there: a copy-up is a
create in `work/` renamed into `upper/`, a deletion a whiteout (a 0/0 character device)
renamed in, a chmod an attribute change. `fanotify_init(FAN_REPORT_DFID_NAME)` with a
`FAN_MARK_FILESYSTEM` mark on that tmpfs reports each with its parent directory's file handle
and the entry's name; the handle opened with `open_by_handle_at` gives the directory's path,
and the entry is then judged exactly as the walk judges it (sensors.base_write).

The walk (sensors.DeltaPoller) stays, every `SAFETY_WALK` seconds, as the safety net: it
catches what events cannot say (a queue overflow also triggers it at once) and keeps its
`unwalkable` check. A delta on disk (`delta = "disk"`) is an ext4 of its own (host.loopfs),
marked the same way; a delta that is no file system of its own (the mark would report every
write of the host) is walked every 0.25 s instead (`corral status` says which is active).
"""

from __future__ import annotations

import errno
import os
import stat

from corral.core import tree
from corral.kernel import fanotify
from corral.watch.event import Event
from corral.watch.sensors import DeltaPoller, base_write

SAFETY_WALK = 5.0  # seconds between two walks while fanotify reports
TMPFS_MAGIC = 0x01021994
# Only the events that can bring a base file into the delta or change its mode: a copy-up is a
# link (FAN_CREATE, from an O_TMPFILE) or a rename (FAN_MOVED_TO) into the upper layer, a
# whiteout a rename or a mknod, a chmod FAN_ATTRIB. A write reaches a base file only after its
# copy-up, which was reported then (and a write makes nothing sensitive that was not), and a
# deletion in the upper layer leaves nothing to judge (removing a base file adds a whiteout).
# Every event costs the writer: the kernel builds and queues it in the system call, so
# FAN_MODIFY, FAN_CLOSE_WRITE and FAN_DELETE, judged to nothing, made each small file a
# service wrote cost 4 events instead of 1 (bench/README.md, part (b)).
EVENTS = (fanotify.FAN_CREATE | fanotify.FAN_MOVED_TO | fanotify.FAN_ATTRIB
          | fanotify.FAN_ONDIR)
READ_SIZE = 65536
# A directory the service made where the base has none cannot hold a base file, so what
# happens in it is never judged: an ignore mark on it keeps its entries' events from being
# built at all (each cost the service's create; a service that writes its scratch files in a
# directory of its own then pays for one event, the directory's). Nor can one where the base
# has an empty directory (the base is sealed): /tmp, /var/tmp, which the image root binds from
# the delta (launch.imageroot), get the same mark, from the start. The base's other
# directories (the upper layer's copies of them) keep reporting.
# Only the directory's own entry events (a create or rename in it is an event on the directory
# itself): with FAN_EVENT_ON_CHILD for its files' attribute changes too, every operation on a
# file in it would look its parent's marks up (fsnotify_parent), which costs more than the rare
# chmod it would spare.
IGNORE_CHILDREN = fanotify.FAN_CREATE | fanotify.FAN_MOVED_TO
MAX_IGNORED = 4096  # ignore marks held at once; beyond, they are all dropped and learnt anew


class DeltaEvents:
    """fanotify on the delta's tmpfs, with the walk as a slower safety net; a sensor with both
    a descriptor (events) and an interval (the walk)."""

    name = "base-write"

    def __init__(self, delta_dir: str, base: str, interval: float = SAFETY_WALK):
        self.interval = interval
        self.upper = os.path.realpath(os.path.join(delta_dir, "upper"))
        self.walk = DeltaPoller(self.upper, base, interval)
        self.reported = self.walk.reported  # one path, one incident, whoever saw it first
        self.fd = fanotify.init(fanotify.FAN_CLASS_NOTIF | fanotify.FAN_REPORT_DFID_NAME)
        try:
            fanotify.mark(self.fd, fanotify.FAN_MARK_FILESYSTEM, EVENTS, delta_dir)
            self.mount_fd = os.open(delta_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(self.fd)
            raise
        self.base = base
        self.ignoring: set[int] = set()  # inode numbers of directories with an ignore mark
        self.ON = f"on (fanotify; walk every {interval:g}s)"
        self.state = self.ON
        self.last_walk = 0.0
        self._learn()

    def _learn(self) -> None:
        """The directories the delta holds before the mark (the image root made upper/PATH for
        each writable path before the sensor starts), judged as those made later: those where
        the base has nothing get their ignore mark. Down the base's non-empty directories
        only, at most MAX_IGNORED of them: what it misses still reports, as before."""
        try:
            upper_fd = os.open(self.upper, tree.DIR_FLAGS)
        except OSError:
            return  # no upper layer yet: the walk says so
        todo, visited = [(upper_fd, b"")], 0
        try:
            while todo and visited < MAX_IGNORED:
                fd, where = todo.pop()
                visited += 1
                try:
                    with os.scandir(fd) as entries:
                        names = [os.fsencode(e.name) for e in entries
                                 if e.is_dir(follow_symlinks=False)]
                    for name in names:
                        try:
                            child = os.open(name, tree.DIR_FLAGS, dir_fd=fd)
                        except OSError:
                            continue  # gone, or no directory now
                        path = where + b"/" + name
                        if self._holds_no_base_file(path):
                            try:
                                fanotify.ignore(self.fd, child, IGNORE_CHILDREN)
                                self.ignoring.add(os.fstat(child).st_ino)
                            except OSError:
                                pass  # as in _directory: the events still come
                            os.close(child)
                        else:
                            todo.append((child, path))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in todo:
                os.close(fd)

    def fileno(self) -> int:
        return self.fd

    def stop(self) -> None:
        """No more events: the mark goes now, so that `close` a little later need not wait
        for the kernel to free it (fanotify.unmark_all)."""
        for kind in (fanotify.FAN_MARK_FILESYSTEM, 0):  # 0: the directories' ignore marks
            try:
                fanotify.unmark_all(self.fd, kind)
            except OSError:
                pass  # close removes them all the same, only later

    def close(self) -> None:
        for fd in (self.fd, self.mount_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def drain(self, now: float) -> list[Event]:
        events: list[Event] = []
        changed: dict[tuple[bytes, bytes], int] = {}  # entry -> the events' masks
        overflow = False
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # the walk still runs on its interval
                self.state = f"on (walk every {self.interval:g}s; fanotify: {exc.strerror})"
                break
            if not data:
                break
            for ev in fanotify.parse(data):
                if ev.mask & fanotify.FAN_Q_OVERFLOW:
                    overflow = True
                elif ev.handle is not None and ev.name is not None:
                    changed[ev.handle, ev.name] = changed.get((ev.handle, ev.name), 0) | ev.mask
        for (handle, name), mask in changed.items():
            self._judge(handle, name, now, events, mask)
        if overflow or now - self.last_walk >= self.interval:
            self.last_walk = now
            events += self.walk.poll(now)
            if self.walk.state != self.walk.ON:  # "off" would drop the events too: "error"
                self.state = "error: " + self.walk.state.removeprefix("off: ") \
                    .removeprefix("error: ")
            elif self.state.startswith(("error", "off")):
                self.state = self.ON
        return events

    def _judge(self, handle: bytes, name: bytes, now: float, events: list[Event],
               mask: int = 0) -> None:
        try:
            fd = fanotify.open_by_handle(self.mount_fd, handle)
        except OSError:  # ESTALE: the directory is gone since; nothing left to judge
            return
        try:
            where = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
            top = os.fsencode(self.upper)
            if where != top and not where.startswith(top + b"/"):
                return  # overlayfs' work directory, or the delta's root
            relative = where[len(top):]
            path = relative + b"/" + name if name != b"." else relative or b"/"
            if mask & fanotify.FAN_ONDIR and name != b".":
                self._directory(fd, name, path, mask)
            if path in self.reported:
                return
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False) if name != b"." \
                    else os.fstat(fd)
            except OSError:
                return  # removed since: a whiteout, if it was a base file, comes next
            base_st = self._base_stat(path)
            # The act's time is the event's receipt (fanotify stamps none, and it is read
            # within a millisecond): not the mtime, which a copy-up reported before the
            # write itself still holds from the base (an old act reads as a stale one).
            event = base_write(path, st, base_st, now, at=now)
            if event is not None:
                self.reported.add(path)
                events.append(event)
        finally:
            os.close(fd)

    def _directory(self, parent_fd: int, name: bytes, path: bytes, mask: int) -> None:
        """A directory made or moved in: its entries' events are ignored from now on if the
        base has no directory there. One that had such a mark and was moved (perhaps to where
        the base has one, whose files it would then shadow) drops every mark first: they are
        learnt again from the directories made next."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)
        except OSError:
            return  # gone since, or no directory now: nothing to ignore
        try:
            ino = os.fstat(fd).st_ino
            if ino in self.ignoring and mask & fanotify.FAN_MOVED_TO \
                    or len(self.ignoring) >= MAX_IGNORED:
                fanotify.unmark_all(self.fd, 0)
                self.ignoring.clear()
            if ino not in self.ignoring and self._holds_no_base_file(path):
                fanotify.ignore(self.fd, fd, IGNORE_CHILDREN)
                self.ignoring.add(ino)
        except OSError:
            pass  # no ignore mark (an older kernel, a full mark quota): the events still come
        finally:
            os.close(fd)

    def _holds_no_base_file(self, path: bytes) -> bool:
        """Whether the base has nothing below `path`: no entry, or an empty directory."""
        base_st = self._base_stat(path)
        if base_st is None:
            return True
        if not stat.S_ISDIR(base_st.st_mode):
            return False
        try:
            with tree.directory(self.base) as base_fd, \
                    tree.opened(base_fd, os.fsdecode(path), tree.DIR_FLAGS) as fd:
                with os.scandir(fd) as entries:
                    return next(entries, None) is None
        except OSError:
            return False

    def _base_stat(self, path: bytes) -> os.stat_result | None:
        """The base's entry at `path`, refusing symlinks on the way (a base symlink such as
        /lib64 -> /usr/lib64 must not lead out of the base), or None."""
        parent, _, leaf = path.rpartition(b"/")
        try:
            with tree.directory(self.base) as base_fd:
                with tree.opened(base_fd, os.fsdecode(parent) or ".",
                                 os.O_PATH | os.O_DIRECTORY) as dir_fd:
                    return os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                self.state = f"error: base {os.fsdecode(path)}: {exc.strerror}"
            return None

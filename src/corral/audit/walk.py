"""The file walks of `corral audit`: the host's setuid and world-writable files, and any tree
(a base image) read entry by entry.

The trees are read as hostile: through directory descriptors with O_NOFOLLOW, a symlink is
never followed, a swapped-in directory is judged by what was really opened (fstat), names are
printed through `text.show`, the depth and the time are bounded.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.audit.findings import Finding
from corral.core import mountinfo, tree
from corral.core.text import show

# Kernel and network file systems the host walk does not enter when it crosses into them (the
# roots themselves are always walked). tmpfs is walked: /tmp, /dev/shm and /run may hold planted
# files. devtmpfs holds device nodes only, whose modes are the kernel's business.
PSEUDO_FS = frozenset("""proc sysfs devtmpfs devpts cgroup cgroup2 securityfs debugfs tracefs bpf
    mqueue hugetlbfs configfs fusectl pstore autofs binfmt_misc efivarfs nsfs rpc_pipefs
    selinuxfs nfsd""".split())
NETWORK_FS = frozenset("""nfs nfs4 cifs smb3 smbfs ceph glusterfs afs 9p lustre gfs2 ocfs2
    fuse.sshfs fuse.rclone fuse.s3fs fuse.gcsfuse davfs""".split())
MAX_DEPTH = tree.MAX_DEPTH  # a deeper tree is reported (too_deep), not walked
SYSTEM_DIRS = (b"/usr/bin/", b"/usr/sbin/", b"/bin/", b"/sbin/", b"/usr/lib/", b"/usr/lib64/",
               b"/usr/libexec/", b"/lib/", b"/lib64/", b"/usr/local/bin/", b"/usr/local/sbin/")


# -- walking ----------------------------------------------------------------------------

def mount_types() -> dict[int, str]:
    """st_dev -> file system type, for every mount this process can see."""
    out: dict[int, str] = {}
    try:
        for mount in mountinfo.read():
            out.setdefault(mount.dev, mount.fstype)
    except OSError:
        pass
    return out


@dataclass
class WalkStats:
    entries: int = 0
    errors: int = 0
    skipped: list[str] = field(default_factory=list)  # "PATH (TYPE)" of mounts not entered
    too_deep: list[str] = field(default_factory=list)
    stopped_at: str | None = None  # the time limit ran out here

    def to_json(self) -> dict[str, Any]:
        return {"entries": self.entries, "errors": self.errors, "skipped_mounts": self.skipped,
                "too_deep": self.too_deep, "stopped_at": self.stopped_at}


class Walker:
    """Calls `visit(path, stat)` for every entry below each root, never following a symlink.

    `path` is the host path as bytes when `prefix` is None, else `prefix` + the path below the
    root (prefix b"" for an image: b"/usr/bin/sh"). Mounts of `skip_types` met on the way are
    not entered; `skip_paths` (host paths) neither."""

    def __init__(self, visit: Callable[[bytes, os.stat_result], None], *,
                 skip_types: frozenset[str] = frozenset(), skip_paths: Iterable[str] = (),
                 deadline: float | None = None, tick: Callable[[int], None] | None = None,
                 links: dict[bytes, bytes] | None = None):
        self.visit, self.skip_types, self.deadline, self.tick = visit, skip_types, deadline, tick
        self.links = links  # when given, filled with every symlink's text
        self.skip_paths = {os.fsencode(os.path.normpath(p)) for p in skip_paths}
        self.types = mount_types() if skip_types else {}
        self.stats = WalkStats()
        self._seen: set[tuple[int, int]] = set()
        self._pending = 0

    def walk(self, root: str | os.PathLike, prefix: bytes | None = None) -> WalkStats:
        start = os.fsencode(os.path.abspath(root)) if prefix is None else prefix.rstrip(b"/")
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            self.stats.errors += 1
            self.stats.skipped.append(f"{show(os.fsencode(root))} (cannot open: {exc.strerror})")
            return self.stats
        try:
            st = os.fstat(fd)
            self._seen.add((st.st_dev, st.st_ino))
            self.visit(start.rstrip(b"/") or b"/", st)  # the root's own mode counts too
            self._walk(fd, start.rstrip(b"/"), st.st_dev)
        finally:
            os.close(fd)
        if self.tick and self._pending:
            self.tick(self._pending)
            self._pending = 0
        return self.stats

    def _walk(self, fd: int, start: bytes, dev: int) -> None:
        """tree.walk, with what it cannot read counted (an audit reports, it does not stop at
        the first unreadable directory) and the mounts and bind mounts it must not enter."""
        stats = self.stats

        def error(_path: bytes, _exc: OSError) -> None:
            stats.errors += 1

        def too_deep(entry: tree.Entry) -> None:
            stats.too_deep.append(show(entry.path))

        for entry in tree.walk(fd, prefix=start, on_error=error, on_too_deep=too_deep):
            st, child = entry.st, entry.path
            stats.entries += 1
            self._pending += 1
            if self.tick and self._pending >= 2000:
                self.tick(self._pending)
                self._pending = 0
            if self.links is not None and stat.S_ISLNK(st.st_mode):
                try:
                    self.links[child] = os.readlink(entry.name, dir_fd=entry.dir_fd)
                except OSError:
                    stats.errors += 1
            self.visit(child, st)
            if not stat.S_ISDIR(st.st_mode):
                continue
            if self.deadline is not None and time.monotonic() > self.deadline:
                stats.stopped_at = show(child)
                return
            if child in self.skip_paths:
                entry.enter = False
            elif st.st_dev != dev and self.types.get(st.st_dev) in self.skip_types:
                stats.skipped.append(f"{show(child)} ({self.types[st.st_dev]})")
                entry.enter = False
            elif (st.st_dev, st.st_ino) in self._seen:  # a bind mount of something walked
                entry.enter = False
            else:
                self._seen.add((st.st_dev, st.st_ino))


def estimate_entries(roots: Iterable[str], skip_types: frozenset[str]) -> int:
    """Used inodes of the file systems below the roots: the progress bar's total."""
    total, seen = 0, set()
    mounts: list[str] = []
    try:
        mounts = [m.point for m in mountinfo.read() if m.fstype not in skip_types]
    except OSError:
        pass
    roots = [os.path.abspath(r) for r in roots]
    for point in list(roots) + [m for m in mounts
                                 if any(m == r or m.startswith(r.rstrip("/") + "/")
                                        for r in roots)]:
        try:
            st, vfs = os.stat(point), os.statvfs(point)
        except OSError:
            continue
        if st.st_dev not in seen:
            seen.add(st.st_dev)
            total += max(vfs.f_files - vfs.f_ffree, 0)
    return total


# -- host: files --------------------------------------------------------------------------------

def _owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _file_finding(path: bytes, st: os.stat_result) -> Finding | None:
    mode, shown = st.st_mode, show(path)
    perms = f"{stat.S_IMODE(mode):04o} uid {st.st_uid} gid {st.st_gid}"
    if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
        setuid = bool(mode & stat.S_ISUID)
        system = path.startswith(SYSTEM_DIRS)
        writable = bool(mode & (stat.S_IWGRP | stat.S_IWOTH))
        owner_root = st.st_uid == 0 if setuid else st.st_gid == 0
        if writable or not system:
            severity = "high"
        elif setuid and owner_root:
            severity = "medium"
        else:
            severity = "low"
        bit = "setuid" if setuid else "setgid"
        who = _owner_name(st.st_uid) if setuid else f"group {_group_name(st.st_gid)}"
        extra = "" if system else ", outside the system directories"
        extra += ", writable by group or others" if writable else ""
        return Finding(f"host.{bit}.{shown}", severity, "setuid",
                       f"{bit} file owned by {who}{extra}", shown,
                       {"mode": perms, "root_owned": owner_root})
    if stat.S_ISDIR(mode) and mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return Finding(f"host.world-writable-dir.{shown}", "high", "world-writable-dir",
                       "world-writable directory without the sticky bit", shown, {"mode": perms})
    if stat.S_ISREG(mode) and mode & stat.S_IWOTH:
        risky = mode & 0o111 or path.startswith(SYSTEM_DIRS) or path.startswith(b"/etc/")
        return Finding(f"host.world-writable-file.{shown}", "high" if risky else "medium",
                       "world-writable-file", "world-writable file"
                       + (" (executable or in a system directory)" if risky else ""), shown,
                       {"mode": perms})
    return None


def file_findings(roots: Iterable[str], *, skip_paths: Iterable[str] = (),
                  time_limit: float | None = None, show_progress: bool = False
                  ) -> tuple[list[Finding], WalkStats]:
    """Setuid/setgid files, world-writable files and directories without the sticky bit."""
    from corral.core.progress import Progress

    roots = list(roots)
    found: list[Finding] = []

    def visit(path: bytes, st: os.stat_result) -> None:
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH):
            finding = _file_finding(path, st)
            if finding:
                found.append(finding)

    skip = PSEUDO_FS | NETWORK_FS
    total = estimate_entries(roots, skip) if show_progress else 0
    deadline = None if time_limit is None else time.monotonic() + time_limit
    with Progress("scanning files", total or None, show_progress) as bar:  # type: ignore[arg-type]
        walker = Walker(visit, skip_types=skip, skip_paths=skip_paths, deadline=deadline,
                        tick=bar.advance)
        for root in roots:
            walker.walk(root)
    stats = walker.stats
    if stats.stopped_at:
        found.append(Finding("host.walk.incomplete", "medium", "walk",
                             f"the file walk stopped after {time_limit:g} s: later files were "
                             "not examined", stats.stopped_at))
    if stats.too_deep:
        found.append(Finding("host.walk.too-deep", "low", "walk",
                             f"directories nested deeper than {MAX_DEPTH} levels not walked",
                             stats.too_deep[0], {"paths": stats.too_deep[:50]}))
    return found, stats




"""The service's root file system: read-only BASE + throwaway DELTA (overlayfs), a minimal /dev,
the volumes, and per process its own /proc, then pivot_root.

Two levels, like the processes that do them:
- `prepare_service_root` runs in the supervisor, which has its own private mount namespace: the
  delta (tmpfs in the host namespace, so `corral delta` and `revert` can read it), the overlay,
  /dev and the volumes. None of these mounts is visible on the host.
- `enter_root` runs in each process's child, in a new mount namespace copied from the
  supervisor's: its /proc (it has its own PID namespace), read-only volumes it does not own,
  then pivot_root and detach the old root, so nothing of the host stays reachable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from corral.core import mountinfo, tree
from corral.core.record import record
from corral.kernel import syscalls as kernel
from corral.kernel.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)
from corral.launch import imageroot

DEVICES = ("null", "zero", "full", "random", "urandom")
SAFE = MS_NOSUID | MS_NODEV


@record(frozen=True)
class VolumeMount:
    path: str  # inside the root
    source: str  # host directory under the state directory
    owner: str  # process name that may write
    work: str  # overlayfs work directory for it, on the same file system as `source`


def _is_mountpoint(path: str) -> bool:
    try:
        return mountinfo.at(mountinfo.read(), path) is not None
    except OSError:
        return False


def mount_delta(delta_dir: str, kind: str, size: int) -> None:
    """The writable layer, in the host's mount namespace: a tmpfs of `size`, or for "disk" an
    ext4 of `size` in an image file next to it (host.loopfs), so that neither can take more
    of the host than that. The disk delta stays mounted after a stop (it survives a restart,
    and `corral delta` reads it) until uninstall; its image is made anew when `size`
    changed (a delta is throwaway: a revert discards it too)."""
    os.makedirs(delta_dir, mode=0o700, exist_ok=True)
    if kind == "tmpfs" and not _is_mountpoint(delta_dir):
        kernel.mount("corral-delta", delta_dir, "tmpfs", SAFE, f"size={size},mode=0700")
    elif kind == "disk":
        _mount_disk_delta(delta_dir, size)
    for sub in ("upper", "work"):
        os.makedirs(os.path.join(delta_dir, sub), mode=0o755, exist_ok=True)


def _mount_disk_delta(delta_dir: str, size: int) -> None:
    from pathlib import Path

    from corral.host import loopfs

    image, top = Path(delta_dir + ".img"), Path(delta_dir)
    if image.exists() and loopfs.image_size(image) != size:
        loopfs.unmount(top)
        image.unlink()
    if not image.exists():
        loopfs.unmount(top)
        _empty(delta_dir)  # an unbounded delta of an older corral: under the mount, it would
        loopfs.make_image(image, size)  # hold its blocks where nothing can reach them
    if loopfs.mounted_at(top) is None:
        loopfs.mount_image(image, top, loopfs.DELTA_OPTIONS)


def unmount_delta(delta_dir: str, kind: str) -> None:
    if kind == "tmpfs" and _is_mountpoint(delta_dir):
        kernel.umount2(delta_dir, MNT_DETACH)
    if kind == "tmpfs":
        try:  # unmounted: an empty mount point, unless the unmount above failed
            _empty(delta_dir)
            os.rmdir(delta_dir)
        except (OSError, tree.WalkError):
            pass


def _empty(directory: str) -> None:
    """Remove everything in a directory the service filled: tree.remove, iterative, because
    shutil.rmtree recurses and a service can nest its /tmp deeper than Python's stack."""
    with tree.directory(directory) as fd:
        for name in os.listdir(fd):
            tree.remove(fd, name)


def clear_delta(delta_dir: str) -> None:
    """Empty the delta (a fresh start from the base) without unmounting it."""
    _empty(delta_dir)
    for sub in ("upper", "work"):
        os.makedirs(os.path.join(delta_dir, sub), mode=0o755)


def private_namespace() -> None:
    """Give the calling process its own mount namespace whose mounts never propagate back."""
    kernel.unshare(kernel.CLONE_NEWNS)
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)


def whole_overlay(why: str | None) -> str:
    """The status warning of a root that is not the base's image (launch.imageroot)."""
    return (f"the root is one overlay on the whole base ({why}): reads of base files take the "
            "overlay's slower path")


def prepare_service_root(root: str, base: str, delta_dir: str, volumes: list[VolumeMount],
                         noexec: tuple[str, ...] = ("/tmp",), writable: tuple[str, ...] = (),
                         image: str | None = None, bench_bind_root: bool = False) -> list[str]:
    """In the supervisor's private mount namespace: the root, /dev, volumes, and `noexec` for
    the places the service can write to (so nothing it writes can be mapped executable, not
    even through the dynamic loader, which Landlock must let it execute). Returns warnings
    for the service's status (a volume that had to be bind-mounted, a root without its image).

    The root is the base's read-only `image` (host.baseimage) with an overlay of the delta on
    each of the `writable` paths (every process's Landlock read_write: nothing else can be
    written, whatever the mounts), a bind mount of the delta's directory where the image's is
    empty; without an image, or when the paths do not allow it, one overlay of the delta on
    the whole base."""
    os.makedirs(root, mode=0o755, exist_ok=True)
    warnings = []
    if bench_bind_root:
        _bench_bind_root(root, base, noexec)
    elif image is None or (why := imageroot.mount(root, image, delta_dir, writable,
                                                   tuple(v.path for v in volumes), noexec)):
        if image is not None:
            warnings.append(whole_overlay(why))
        upper, work = os.path.join(delta_dir, "upper"), os.path.join(delta_dir, "work")
        with _by_descriptor(base, upper, work) as (lower_fd, upper_fd, work_fd):
            kernel.mount("corral-root", root, "overlay", SAFE,
                         f"lowerdir={lower_fd},upperdir={upper_fd},workdir={work_fd}")
    for path in noexec:
        target = os.path.join(root, path.lstrip("/"))
        # A writable path of the image root is mounted noexec already (launch.imageroot): a
        # second mount on it would only lengthen every lookup through it.
        if os.path.isdir(target) and not os.path.islink(target) \
                and not os.statvfs(target).f_flag & os.ST_NOEXEC:
            kernel.mount(target, target, None, MS_BIND)
            kernel.mount(None, target, None, MS_BIND | MS_REMOUNT | SAFE | MS_NOEXEC)
    _mount_dev(os.path.join(root, "dev"))
    for vol in volumes:
        target = os.path.join(root, vol.path.lstrip("/"))
        # The mount point comes from the base (plan adds it); refuse one the delta replaced with
        # a symlink, which would redirect the bind mount outside the root.
        if os.path.islink(target) or not os.path.isdir(target):
            raise OSError(f"volume mount point {vol.path} is not a directory in the root")
        try:
            _mount_volume(vol, target)
        except OSError as exc:
            # Some file systems cannot be an overlay's upper layer (an overlay itself, as in a
            # container; NFS; XFS without d_type): a bind mount works everywhere, at the price
            # of the host path showing in the service's mountinfo. Said in `status`.
            kernel.mount(vol.source, target, None, MS_BIND)
            kernel.mount(None, target, None, MS_BIND | MS_REMOUNT | SAFE | MS_NOEXEC)
            warnings.append(f"volume {vol.path} is bind-mounted (its file system cannot be an "
                            f"overlay's upper layer: {exc.strerror}); the service can see its "
                            "host path in /proc/self/mountinfo")
    return warnings


def _bench_bind_root(root: str, base: str, writable: tuple[str, ...]) -> None:
    """CORRAL_BENCH_SKIP=overlay only (launch.benchskip): the base as a read-only bind mount,
    and an empty tmpfs (the base directory's owner and mode) on each writable path, to measure
    what the overlay costs. Writes there are not in the delta."""
    kernel.mount(base, root, None, MS_BIND)
    kernel.mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | SAFE)
    for path in writable:
        target = os.path.join(root, path.lstrip("/"))
        if os.path.isdir(target) and not os.path.islink(target):
            st = os.stat(target)
            kernel.mount("corral-bench", target, "tmpfs", SAFE,
                         f"size=64m,mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}")


def _mount_volume(vol: VolumeMount, target: str) -> None:
    """The volume as the upper layer of an overlay over an empty directory, not a bind mount.

    A bind mount's root shows in the service's /proc/self/mountinfo as its path on the host file
    system (the state directory's layout). An overlay is a superblock of its own, so its root is
    "/", and its layers are named through descriptors as for the root. Files live in the volume
    directory as they are (the lower layer is empty: no copy-up, no whiteouts; only a directory
    made at the top is marked opaque, as the overlay's root merges the empty layer).
    Caveat, documented: the overlay caches lookups, so files the host adds to a running
    service's volume may stay invisible to it; write through `corral exec` or stop it first."""
    empty = os.path.join(os.path.dirname(vol.work), ".empty")
    for path in (empty, vol.work):
        os.makedirs(path, mode=0o700, exist_ok=True)
    with _by_descriptor(empty, vol.source, vol.work) as (lower, upper, work):
        # index=off: after a revert the old overlay may linger (lazily detached) for a moment,
        # and with the index on, a second overlay on the same upper is refused. uuid=off: else
        # the kernel stores a trusted.overlay.uuid xattr on the volume directory.
        kernel.mount("corral-volume", target, "overlay", SAFE | MS_NOEXEC,
                     f"lowerdir={lower},upperdir={upper},workdir={work},index=off,uuid=off")


@contextmanager
def _by_descriptor(*dirs: str) -> Iterator[tuple[str, ...]]:
    """Overlay layers named "/proc/self/fd/N", so that the service's /proc/self/mountinfo shows
    that instead of the host's paths of the state directory. The descriptors (O_PATH, no
    symlink followed at the end) are open only for the mount call."""
    fds: list[int] = []
    try:
        for path in dirs:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
        yield tuple(f"/proc/self/fd/{fd}" for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)


def _mount_dev(dev: str) -> None:
    """A /dev with only null, zero, full, random and urandom (bind mounts of the host's nodes,
    so no mknod is needed) and the usual symlinks to /proc/self/fd."""
    kernel.mount("corral-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        node = os.path.join(dev, name)
        open(node, "w").close()
        kernel.mount(f"/dev/{name}", node, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    kernel.mount("corral-shm", os.path.join(dev, "shm"), "tmpfs",
                 SAFE | MS_NOEXEC, "size=16m,mode=1777")
    kernel.mount(None, dev, None, MS_REMOUNT | MS_NOSUID | MS_NOEXEC | MS_RDONLY,
                 "size=64k,mode=0755")


# Host-wide facts a service's own /proc would still show (its PID namespace does not cover
# them), masked the way runc masks paths: an empty file, an empty directory. Other services'
# activity: pressure stalls, interrupt counts (a published timing side channel), block I/O
# counters, every file lock of the host; the host's identity: the kernel command line, which
# uids hold keys, its boot id (the same in every service: a correlator), its disks, buses, ACPI
# and SCSI devices. Also runc's list of root-only files, in case. What programs commonly read
# (loadavg, stat, meminfo, cpuinfo, uptime) stays: an empty one breaks them (docs/sandbox.md).
MASKED_FILES = ("cmdline", "key-users", "interrupts", "softirqs", "diskstats", "partitions",
                "swaps", "locks", "sys/kernel/random/boot_id", "kcore", "timer_list",
                "sched_debug", "latency_stats", "timer_stats", "vmallocinfo")
MASKED_DIRS = ("pressure", "acpi", "scsi", "irq", "bus", "driver", "fs")


def _mask_proc(proc: str) -> None:
    for name in MASKED_FILES:
        target = os.path.join(proc, name)
        if os.path.exists(target):
            kernel.mount("/dev/null", target, None, MS_BIND)  # reads as empty; nodev would
            kernel.mount(None, target, None,  # make it unreadable, so only read-only, nosuid
                         MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    for name in MASKED_DIRS:
        target = os.path.join(proc, name)
        if os.path.isdir(target):
            kernel.mount("corral-masked", target, "tmpfs", SAFE | MS_NOEXEC | MS_RDONLY,
                         "size=4k,mode=0555")


def enter_root(root: str, process: str, volumes: list[VolumeMount]) -> None:
    """In the process's new mount + PID namespaces: /proc (host-wide entries masked),
    read-only foreign volumes, pivot."""
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)
    kernel.mount("proc", os.path.join(root, "proc"), "proc", SAFE | MS_NOEXEC)
    _mask_proc(os.path.join(root, "proc"))
    for vol in volumes:
        if vol.owner != process:
            target = os.path.join(root, vol.path.lstrip("/"))
            kernel.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | SAFE | MS_NOEXEC)
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    # only the new root (the trick runc and nsjail use; no put_old directory needed).
    kernel.pivot_root(".", ".")
    kernel.umount2(".", MNT_DETACH)
    os.chdir("/")

"""Sizes the kernel enforces: a file system of its own in a sparse image file, loop-mounted.

The host's state file system has no project quota to give a directory a limit, so a volume
with `size` (and a `delta = "disk"`) is an ext4 file system in an image file of that size: a
write past it fails with ENOSPC inside that file system, and the host's loses at most the
image's size. The image is sparse (it costs what was written), made with no reserved blocks
(`-m 0`: the service gets all of it), and mounted nosuid, nodev, noexec.

A sized volume, for the volume store STORE of a service's state directory STATE:

    STATE/volume-images/STORE.img   the image (root's, 0600): kept by `uninstall` without --purge
    STATE/volume-fs/STORE/          its mount point; on it:
        data/                       the volume's files (owner and mode as declared)
        work/                       the overlay's work directory (same file system as data/)
        lost+found/                 ext4's, never in the service's view
    STATE/volumes/STORE             a bind mount of data/: where every reader of the volume
                                    (journal, export, audit, an administrator) finds it

The service sees data/ through its overlay (launch.mnt), so its mountinfo shows no host path;
the overlay needs its work directory on the same mount as its upper layer, which is why the
launch names data/ and work/ through the loop mount, not the bind mount.
Mounts are made in the host's mount namespace at install and at each start (after a reboot they
are gone), and undone at uninstall. `mount -o loop` sets the loop device to detach itself when
its last mount goes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from corral.core import mountinfo
from corral.core.errors import RuntimeFailure
from corral.core.record import record
from corral.kernel import syscalls as kernel

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

IMAGES = "volume-images"
FILESYSTEMS = "volume-fs"
OPTIONS = "loop,nosuid,nodev,noexec"
# A delta is an overlay's upper layer: as the tmpfs delta, not noexec (the overlay mount and
# the noexec bind mounts on the service's writable places decide what may run).
DELTA_OPTIONS = "loop,nosuid,nodev"
TIMEOUT = 300  # mkfs of a large sparse image writes only its metadata: seconds, not minutes


@record(frozen=True)
class SizedVolume:
    image: Path
    top: Path  # the loop mount's mount point
    view: Path  # STATE/volumes/STORE: a bind mount of data

    @property
    def data(self) -> Path:
        return self.top / "data"

    @property
    def work(self) -> Path:
        return self.top / "work"


def sized(state: str | Path, store: str) -> SizedVolume:
    state = Path(state)
    return SizedVolume(state / IMAGES / f"{store}.img", state / FILESYSTEMS / store,
                       state / "volumes" / store)


def has_image(state: str | Path, store: str) -> bool:
    return sized(state, store).image.exists()


def mounted_at(path: str | Path) -> str | None:
    """The source of what is mounted at exactly `path` in this mount namespace (the topmost),
    or None."""
    try:
        top = mountinfo.at(mountinfo.read(), os.path.abspath(path))
    except OSError:
        return None
    return top.source if top else None


def _run(argv: list[str], what: str) -> None:
    import subprocess  # here: the supervisor loads this module on `corral run`'s path (floods)

    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"{what}: {argv[0]}: {exc}") from None
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeFailure(f"{what}: {argv[0]} failed: {said[-1] if said else result.returncode}")


def make_image(image: Path, size: int) -> None:
    """A sparse file of `size` bytes holding an empty ext4 (no reserved blocks); a file that
    exists is never touched."""
    image.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    try:
        # -E root_owner: the root directory is root's whatever the caller; -F: it is a file.
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", "-L", "corral",
              str(image)], f"making the file system in {image}")
    except BaseException:
        image.unlink(missing_ok=True)
        raise


def mount_image(image: Path, top: Path, options: str = OPTIONS) -> None:
    top.mkdir(mode=0o700, parents=True, exist_ok=True)
    _run(["mount", "-t", "ext4", "-o", options, str(image), str(top)], f"mounting {image}")
    os.chmod(top, 0o700)  # the file system's root: root's only (lost+found, work)


def unmount(path: Path) -> bool:
    """Detach what is mounted at `path` (lazily: a process still in it does not keep the
    uninstall waiting; the loop device goes with the last user). Whether one was."""
    if mounted_at(path) is None:
        return False
    kernel.umount2(str(path), kernel.MNT_DETACH)
    return True


def attached(image: Path) -> bool:
    """Is a loop device backed by `image` (mounted in some namespace, or being released)?"""
    import subprocess

    result = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    return bool(result.stdout.strip())


def grow(vol: SizedVolume, size: int) -> None:
    """Grow a volume's file system to `size`, unmounted: online growth needs CAP_SYS_RESOURCE,
    which a root in a container may lack, and an image mounted anywhere (a running service's
    namespace) must not be resized from outside."""
    unmount_volume(vol)
    deadline = time.monotonic() + 10  # a lazy unmount lets the loop device go a moment later
    while attached(vol.image):
        if time.monotonic() > deadline:
            mount_volume(vol)  # as it was
            raise RuntimeFailure(f"{vol.view}: its file system is in use (the service runs?); "
                                 "growing it needs it stopped: corral down, then install")
        time.sleep(0.2)
    was = image_size(vol.image)
    os.truncate(vol.image, size)
    try:
        _run(["e2fsck", "-f", "-p", str(vol.image)], f"checking {vol.image} before growing it")
    except BaseException:
        os.truncate(vol.image, was)
        raise
    _run(["resize2fs", str(vol.image)], f"growing the file system in {vol.image}")


def mount_volume(vol: SizedVolume) -> list[str]:
    """Mount a sized volume's image and its view if they are not (a start after a reboot, an
    install); returns what it mounted. The image must exist (install makes it)."""
    done = []
    if not vol.image.exists():
        raise RuntimeFailure(f"{vol.view}: its file system image {vol.image} is missing; "
                             "run corral install again")
    if mounted_at(vol.top) is None:
        mount_image(vol.image, vol.top)
        done.append(str(vol.top))
    for sub in (vol.data, vol.work):
        sub.mkdir(mode=0o700, exist_ok=True)
    if mounted_at(vol.view) is None:
        vol.view.mkdir(mode=0o700, exist_ok=True)
        if any(vol.view.iterdir()):  # the files would be hidden under the mount, not in it
            raise RuntimeFailure(f"{vol.view}: holds files of its own on the state file "
                                 "system; a volume with `size` keeps its files in its own file "
                                 "system (move them out first)")
        kernel.mount(str(vol.data), str(vol.view), None, kernel.MS_BIND)
        kernel.mount(None, str(vol.view), None, kernel.MS_BIND | kernel.MS_REMOUNT
                     | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC)
        done.append(str(vol.view))
    return done


def unmount_volume(vol: SizedVolume) -> bool:
    """The view first, then the file system; the mount point stays (empty)."""
    view = unmount(vol.view)
    return unmount(vol.top) or view


def image_size(image: Path) -> int:
    return os.stat(image).st_size


def quietly(action: Callable[[], Any]) -> Callable[[], None]:
    """An undo of something that may be gone already (an empty directory another step removed)."""
    def run() -> None:
        try:
            action()
        except (FileNotFoundError, OSError):
            pass
    return run


def install_volume(state: Path, path: str, store: str, size: int, changes: list[str],
                   undo: Callable[[str, Callable[[], Any]], None]) -> None:
    """A volume with `size`: its image (made once; grown, never shrunk), mounted with its view
    (host.loopfs), each step undone if a later one fails."""
    vol = sized(state, store)
    for directory in (vol.image.parent, vol.top.parent):
        if not directory.exists():
            directory.mkdir(mode=0o700)
            undo(f"remove {directory}", quietly(directory.rmdir))
    if not vol.image.exists():
        if vol.view.is_dir() and mounted_at(vol.view) is None and any(vol.view.iterdir()):
            raise RuntimeFailure(f"volume {path} holds files on the state file system "
                                 f"({vol.view}); a `size` is given to a new volume only: "
                                 "move its files out, install, and copy them in with corral "
                                 "exec")
        make_image(vol.image, size)
        undo(f"remove the image of volume {path}", quietly(vol.image.unlink))
        changes.append(f"created the {size >> 20} MiB file system of volume {path}")
    elif image_size(vol.image) > size:
        raise RuntimeFailure(f"volume {path}: its file system is "
                             f"{image_size(vol.image) >> 20} MiB, the manifest says "
                             f"{size >> 20} MiB: a volume's file system never shrinks")
    for directory in (vol.top, vol.view):
        if not directory.exists():
            undo(f"remove {directory}", quietly(directory.rmdir))
    if image_size(vol.image) < size:
        was = image_size(vol.image)
        grow(vol, size)
        changes.append(f"grew the file system of volume {path} from {was >> 20} MiB to "
                       f"{size >> 20} MiB")
    before = {p: mounted_at(p) is not None for p in (vol.view, vol.top)}
    undo(f"unmount volume {path}",  # what was mounted before stays so
         lambda: [unmount(p) for p, was in before.items() if not was])
    mount_volume(vol)


def unmount_all(state: Path) -> list[str]:
    """Every file system of its own the service has (sized volumes, a disk delta), unmounted:
    nothing below the state directory may be removed through a mount."""
    done = []
    images = state / IMAGES
    stores = sorted(p.name[:-4] for p in images.iterdir() if p.name.endswith(".img")) \
        if images.is_dir() else []
    for store in stores:
        if unmount_volume(sized(state, store)):
            done.append(f"unmounted the file system of volume store {store}")
    if unmount(state / "delta"):
        done.append("unmounted the disk delta")
    left = [str(p) for p in [state / "delta", *(sized(state, s).top for s in stores),
                             *(sized(state, s).view for s in stores)]
            if mounted_at(p) is not None]
    if left:
        raise RuntimeFailure("still mounted, nothing removed: " + ", ".join(left))
    return done

"""The service's root as the base's read-only image, with the delta only where it may write.

One overlay over the whole base makes every open of a base file pay overlayfs' second open
(bench/servers.md: most of nginx's containment cost). Yet a process can write only below its
Landlock `read_write` paths, whatever the mounts say, so the delta is needed only there. The
root is the base's erofs image (host.baseimage; read-only, nosuid, nodev), and each writable
path gets an overlay: the image's directory below, the delta's `upper/PATH` above. The delta's
layout is exactly the one a whole-root overlay gives (`upper/tmp/x` for /tmp/x), so everything
that reads the delta (corral delta, revert archives, the base-write tripwire, commit) is
unchanged; the overlays' work directories are `work/path-NAME`, beside the whole-root overlay's.

A writable path whose directory in the image is empty (/tmp, /var/tmp, a runtime directory) is
no overlay but a bind mount of the delta's `upper/PATH`: with no lower entry there is nothing to
show, copy up or white out, yet every access would go through two file systems and a second
permission check with the overlay's mounter's credentials (the files loop in /tmp took 43-44%
less CPU bound than overlaid, bench/README.md "third round"). The image is read-only, so the
emptiness cannot change under the mount. The bind's root is that directory of the delta's file
system: the service's mountinfo shows `/upper/PATH` of "corral-delta" (a disk delta: its loop
device), the delta's own names, no host path, and nothing above it is reachable (`..` of a
mount's root is its mount point's parent).

What differs from one overlay: a rename or a hard link between two writable paths, or from the
base into one, is EXDEV (as between any two mounts; programs copy instead), and a write outside
them is EROFS instead of Landlock's EACCES. A delta that is no file system of its own (a plain
directory: a bind would show the host's path of it) keeps an overlay on every path.
"""

from __future__ import annotations

import os
import stat

from corral.core import mountinfo, tree
from corral.kernel import syscalls as kernel
from corral.kernel.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
)

SAFE = MS_NOSUID | MS_NODEV


def _under(path: str, tops: set[str] | tuple[str, ...]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)


def writable_tops(root_fd: int, writable: tuple[str, ...],
                  volumes: tuple[str, ...]) -> list[str] | None:
    """The directories to put an overlay on: each writable path (a file's directory), none
    inside another or inside a volume (mounted on its own), /dev left out (its own tmpfs).
    None when only a whole-root overlay will do: "/" is writable, or a path goes through a
    symlink in the image (/var/run -> /run: the overlay would have to go where the link
    points, which Landlock resolves in the service's root and the supervisor would not). A
    path missing from the image is left out: Landlock grants nothing on it either."""
    tops: set[str] = set()
    for path in writable:
        path = os.path.normpath(path)
        if path == "/dev" or _under(path, volumes):
            continue
        if path == "/":
            return None
        try:
            fd = tree.open_beneath(root_fd, path, os.O_PATH)
        except FileNotFoundError:
            continue
        except OSError:  # ELOOP, ENOTDIR: a symlink on the way
            return None
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        if not is_dir:
            path = os.path.dirname(path)
            if path == "/":
                return None
        tops.add(path)
    return sorted(p for p in tops if not any(p.startswith(t + "/") for t in tops))


def mount_image(image: str, root: str, from_file: bool = True) -> str | None:
    """The image, read-only, at `root`: straight from its file (Linux 6.12+), else through a
    loop device (Debian 12's 6.1, or an image on a file system erofs cannot read from, such as
    an overlay); None when mounted, else why not."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"its image: {exc.strerror}"
    try:
        # Named by descriptor: the service's mountinfo shows /proc/self/fd/N as the source,
        # not the state directory's path.
        if from_file:
            kernel.mount(f"/proc/self/fd/{fd}", root, "erofs", MS_RDONLY | SAFE)
            return None
    except OSError:
        pass
    finally:
        os.close(fd)
    return _mount_by_loop(image, root)


def _mount_by_loop(image: str, root: str) -> str | None:
    """mount(8)'s loop: it finds a free device, attaches the image read-only and sets the device
    to detach itself with its last mount (here: when the supervisor's namespace goes). The
    service's mountinfo shows /dev/loopN. A helper program, so only on kernels without the
    file-backed mount (subprocess stays off the launch path otherwise)."""
    import subprocess

    try:
        done = subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro,nosuid,nodev", image, root],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mounting its image: {exc}"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"mounting its image: {said[-1] if said else done.returncode}"
    return None


def mount(root: str, image: str, delta_dir: str, writable: tuple[str, ...],
          volumes: tuple[str, ...], noexec: tuple[str, ...] = ()) -> str | None:
    """Mount the root at `root` as above; None when done, else why not, with nothing left
    mounted (the caller then makes one overlay on the whole base). A top in `noexec` is
    mounted noexec itself (no second mount on it)."""
    if why := mount_image(image, root):
        return why
    try:
        with tree.directory(root) as root_fd, \
                tree.directory(os.path.join(delta_dir, "upper")) as upper_fd:
            tops = writable_tops(root_fd, writable, volumes)
            if tops is None:
                kernel.umount2(root, MNT_DETACH)
                return "a writable path is / or goes through a symlink"
            noexec = tuple(os.path.normpath(p) for p in noexec)
            bind = own_filesystem(delta_dir)
            for top in tops:
                flags = SAFE | (MS_NOEXEC if top in noexec else 0)
                if bind and empty_in_image(root_fd, top):
                    _bind(root_fd, upper_fd, top, flags)
                else:
                    _overlay(root_fd, upper_fd, delta_dir, top, flags)
    except OSError as exc:
        kernel.umount2(root, MNT_DETACH)  # the image and the mounts made so far
        return f"a mount on a writable path: {exc.strerror or exc}"
    return None


def own_filesystem(delta_dir: str) -> bool:
    """Whether a file system's own root is mounted at `delta_dir` (the tmpfs or the disk delta,
    host.loopfs): only then does a bind mount of a directory in it show the delta's names in
    mountinfo rather than a host path (a delta that is a plain directory keeps overlays)."""
    try:
        top = mountinfo.at(mountinfo.read(), os.path.realpath(delta_dir))
    except OSError:
        return False
    return top is not None and top.root == "/"


def empty_in_image(root_fd: int, top: str) -> bool:
    """Whether `top` is a directory of the image with no entry (no symlink on the way or at
    the end: anything but a plain empty directory keeps its overlay)."""
    try:
        with tree.opened(root_fd, top.lstrip("/"), tree.DIR_FLAGS) as fd:
            with os.scandir(fd) as entries:
                return next(entries, None) is None
    except OSError:
        return False


def _overlay(root_fd: int, upper_fd: int, delta_dir: str, top: str, flags: int) -> None:
    rel = top.lstrip("/")
    work = os.path.join(delta_dir, "work", "path-" + rel.replace("%", "%25").replace("/", "%2F"))
    os.makedirs(work, mode=0o700, exist_ok=True)
    with tree.opened(root_fd, rel, os.O_PATH | os.O_DIRECTORY) as lower, \
            _upper(root_fd, upper_fd, rel) as upper, tree.directory(work) as work_fd:
        kernel.mount("corral-root", f"/proc/self/fd/{lower}", "overlay", flags,
                     f"lowerdir=/proc/self/fd/{lower},upperdir=/proc/self/fd/{upper},"
                     f"workdir=/proc/self/fd/{work_fd}")


def _bind(root_fd: int, upper_fd: int, top: str, flags: int) -> None:
    """The delta's `upper/TOP` (made as the image has it, as for an overlay) bound on the
    image's empty TOP, both named by descriptor; then its flags, which a bind mount takes
    only from a remount."""
    rel = top.lstrip("/")
    with tree.opened(root_fd, rel, os.O_PATH | os.O_DIRECTORY) as target, \
            _upper(root_fd, upper_fd, rel) as upper:
        kernel.mount(f"/proc/self/fd/{upper}", f"/proc/self/fd/{target}", None, MS_BIND)
        # The new mount is on top of the one `target` names: remounted through its path.
        kernel.mount(None, f"/proc/self/fd/{root_fd}/{rel}", None,
                     MS_BIND | MS_REMOUNT | flags)


class _upper:
    """The delta's directory for `rel`, each missing level made as the image has it (owner
    and mode: the overlay's root directory shows the upper one's); a level that is there is
    used as it is (a disk delta keeps what the service did), unless it is no directory."""

    def __init__(self, root_fd: int, upper_fd: int, rel: str):
        self.fd = os.dup(upper_fd)
        image_fd = os.dup(root_fd)
        try:
            for part in [p for p in rel.split("/") if p]:
                st = os.stat(part, dir_fd=image_fd, follow_symlinks=False)
                try:
                    os.mkdir(part, 0o700, dir_fd=self.fd)
                    made = True
                except FileExistsError:
                    made = False
                step = os.open(part, tree.DIR_FLAGS, dir_fd=self.fd)
                os.close(self.fd)
                self.fd = step
                if made:
                    os.fchown(step, st.st_uid, st.st_gid)
                    os.fchmod(step, stat.S_IMODE(st.st_mode))
                following = os.open(part, tree.DIR_FLAGS, dir_fd=image_fd)
                os.close(image_fd)
                image_fd = following
        except BaseException:
            os.close(self.fd)
            raise
        finally:
            os.close(image_fd)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

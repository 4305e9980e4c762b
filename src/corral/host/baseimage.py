"""The base as a read-only file system image: what the service's root is read from.

Measured (bench/overlay_opts.sh, bench/servers.md): an open+read+close of a base file through
the overlay costs nearly twice what it costs on the base's own file system, because overlayfs
opens a second file on the real inode at every open; no overlay option helps. nginx spends most
of its containment cost there. So the root is this image, read-only, with an overlay only on the
paths a process may write (launch.mnt); everything else is read straight from the image.

Why an image rather than a bind mount of the base directory: a bind mount's root shows in the
service's /proc/self/mountinfo as its path on the host (the state directory's layout); an image
is a file system of its own, whose root is "/". erofs, because the kernel mounts an erofs image
straight from a file (CONFIG_EROFS_FS_BACKED_BY_FILE, Linux 6.12): no loop device, nothing
mounted on the host, and the mount lives and dies with the supervisor's private namespace
(older kernels: a loop device that detaches itself with it, launch.imageroot). Without an
image (no mkfs.erofs), the root is a whole overlay as before.

The image is made from the sealed base directory (`seal`, at install and commit), which stays
what every reader of the base uses (delta, revert, commit, audit, verify): it is the same tree.
A base sealed before images existed gets one at its next start (`ensure`).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from corral.core.fsio import StrPath

IMAGE = "root.erofs"
TOOL = "mkfs.erofs"
TIMEOUT = 600


def image_of(version_dir: StrPath) -> str:
    return os.path.join(version_dir, IMAGE)


def build(version_dir: StrPath) -> str | None:
    """Make `version_dir`/root.erofs from `version_dir`/root; None when made, else why not (no
    mkfs.erofs, or it failed): the root is then a whole overlay, slower but the same.
    Written to a temporary name and renamed, so a reader never sees half an image."""
    import shutil  # here, as subprocess: `ensure` is on the start path, which rarely builds
    import subprocess

    tool = shutil.which(TOOL)
    if tool is None:
        return f"{TOOL} is not installed (Debian: erofs-utils)"

    final = image_of(version_dir)
    temporary = os.path.join(version_dir, f".{IMAGE}.{os.getpid()}")
    # --preserve-mtime: a file's mtime is what the service sees (nginx's Last-Modified), not the
    # build's time. Uncompressed (no -z): reads cost what they cost on the base directory.
    argv = [tool, "--quiet", "--preserve-mtime", temporary, os.path.join(version_dir, "root")]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip().splitlines()
            return f"{TOOL} failed: {said[-1] if said else result.returncode}"
        os.chmod(temporary, 0o600)
        os.rename(temporary, final)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{TOOL}: {exc}"
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
    return None


def fingerprint(version_dir: StrPath) -> dict[str, object] | None:
    """Size and blake3 of the image, for the base's integrity manifest (`verify`), or None."""
    from corral.core import tree

    image = image_of(version_dir)
    if not os.path.isfile(image):
        return None
    with tree.directory(os.fspath(version_dir)) as fd:
        digest, _ = tree.hash_and_magic(fd, IMAGE.encode())
    return {"size": os.stat(image).st_size, "blake3": digest}


def ensure(version_dir: StrPath) -> str | None:
    """The image of a base sealed before images existed (or whose image was removed), made
    now from the sealed directory and recorded in its integrity manifest; None if there is
    one."""
    if os.path.isfile(image_of(version_dir)):
        return None
    why = build(version_dir)
    if why is None:
        import json

        from corral.core.fsio import write_json

        integrity = os.path.join(version_dir, "integrity.json")
        try:
            with open(integrity, "rb") as handle:
                data = json.loads(handle.read())
        except (OSError, ValueError):
            return None  # no manifest to add it to: `verify` says so about the base itself
        data["image"] = fingerprint(version_dir)
        write_json(integrity, data)
    return why

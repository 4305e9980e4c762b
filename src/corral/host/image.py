"""Build the read-only BASE image of a service from its plan.

Layout under the state directory:  base/<version>/root/  (the tree the service sees as /)
and base/<version>/image.json (what was built, from which plan). A build goes to a hidden
directory first and is renamed into place, so a crash never leaves a half-built base behind
under a real version number.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from corral.core import tree as safefs
from corral.core.progress import Progress
from corral.host.users import SystemUser
from corral.plan.closure import ImageEntry
from corral.plan.service import AddedEntry, ServicePlan

# The base must not carry sharp objects it did not ask for: setuid/setgid bits are stripped.
MODE_MASK = 0o1777
COPY_CHUNK = 1 << 20


def base_dir(state: Path, version: int) -> Path:
    return state / "base" / str(version)


def _copy_file(src: int, name: str, mode: int, dst: Path) -> int:
    """Copy the open regular file `src` to a new file `dst` (never an existing one)."""
    src_st = os.fstat(src)
    if not stat.S_ISREG(src_st.st_mode):
        raise OSError(f"{name}: changed since it was planned (no longer a regular file)")
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    try:
        size = 0
        while chunk := os.read(src, COPY_CHUNK):
            os.write(dst_fd, chunk)
            size += len(chunk)
        os.fchmod(dst_fd, mode & MODE_MASK)
        # Keep the modification time: Python's .pyc files record their source's mtime, and a
        # base with new mtimes makes every module recompile at each start (it cannot write
        # the cache there): 140-230 ms more for `import http.server` inside.
        os.utime(dst_fd, ns=(src_st.st_atime_ns, src_st.st_mtime_ns))
    finally:
        os.close(dst_fd)
    return size


def _copy_entry(src_root: int, entry: ImageEntry | AddedEntry, dst: Path) -> int:
    if isinstance(entry, AddedEntry):  # a vendor file the manifest named: trusted path, leaf
        fd = os.open(entry.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    else:  # closure entries are resolved below the image source: no symlink on the way
        fd = safefs.open_beneath(src_root, entry.path)
    try:
        return _copy_file(fd, entry.path, entry.mode, dst)
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> str:
    import blake3

    hasher = blake3.blake3()
    while chunk := os.read(fd, COPY_CHUNK):
        hasher.update(chunk)
    return str(hasher.hexdigest())


def source_hashes(plan: ServicePlan) -> dict[str, str]:
    """blake3 of what each file of the image would be built from now, by image path (the keys
    and hashes of the base's integrity manifest), so `install` can tell which input changed.
    A source that is gone or no longer a regular file hashes as "" (changed: the rebuild
    then reports the real error)."""
    out: dict[str, str] = {}
    with safefs.directory(plan.image.host_root) as src_root:
        for entry in plan.image.entries + plan.image.added:
            if entry.kind != "file":
                continue
            try:
                if isinstance(entry, AddedEntry):
                    fd = os.open(entry.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                else:
                    fd = safefs.open_beneath(src_root, entry.path)
            except OSError:
                out[entry.path] = ""
                continue
            try:
                out[entry.path] = _hash_fd(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else ""
            finally:
                os.close(fd)
    return out


def _accounts(users: list[tuple[str, SystemUser]]) -> tuple[str, str]:
    """passwd and group holding root and the service's own users only, never the host's."""
    passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin"]
    group = ["root:x:0:"]
    for comment, user in users:
        passwd.append(f"{user.name}:x:{user.uid}:{user.gid}:{comment}:/nonexistent:/usr/sbin/nologin")
        group.append(f"{user.name}:x:{user.gid}:")
    return "\n".join(passwd) + "\n", "\n".join(group) + "\n"


def _chown(root: Path, owners: tuple[tuple[str, str], ...],
           accounts: dict[str, SystemUser]) -> None:
    """Give each (path, user) of the plan to that user, a directory with all it holds. The
    tree is the build's own (just copied, not yet visible to any service): os.walk is safe."""
    for path, name in owners:
        user = accounts[name]
        top = root / path.lstrip("/")
        os.chown(top, user.uid, user.gid, follow_symlinks=False)
        if top.is_dir() and not top.is_symlink():
            for where, dirs, files in os.walk(top):
                for entry in dirs + files:
                    os.chown(os.path.join(where, entry), user.uid, user.gid,
                             follow_symlinks=False)


def build_base(plan: ServicePlan, state: Path, version: int,
               users: list[tuple[str, SystemUser]], show_progress: bool = False) -> Path:
    """Build base version `version`; returns its directory. Raises OSError on failure,
    leaving nothing behind."""
    final = base_dir(state, version)
    work = final.parent / f".building-{version}"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    root.mkdir(parents=True, mode=0o755)
    files = total = 0
    try:
        with safefs.directory(plan.image.host_root) as src_root, \
                Progress("building base image", len(plan.image.entries) + len(plan.image.added),
                         show_progress) as bar:
            for entry in plan.image.entries + plan.image.added:
                dst = root / entry.path.lstrip("/")
                if entry.kind == "dir":
                    dst.mkdir(exist_ok=True)
                    os.chmod(dst, entry.mode & MODE_MASK, follow_symlinks=False)
                elif entry.kind == "symlink":
                    if entry.target is None:
                        raise ValueError(f"image entry {entry.path}: a symlink without a target")
                    os.symlink(entry.target, dst)
                else:
                    total += _copy_entry(src_root, entry, dst)
                    files += 1
                bar.advance()
        for where, text in plan.image.generated:
            made = root / where.lstrip("/")
            made.write_text(text)
            made.chmod(0o644)
        _chown(root, plan.image.owners, {user.name: user for _, user in users})
        passwd, group = _accounts(users)
        (root / "etc/passwd").write_text(passwd)
        (root / "etc/group").write_text(group)
        for path in (root / "etc/passwd", root / "etc/group"):
            path.chmod(0o644)
        (work / "image.json").write_text(json.dumps({
            "version": version, "service": plan.service, "from": plan.image.source,
            "entries": len(plan.image.entries), "files": files, "bytes": total,
        }, indent=2) + "\n")
        from corral.host.base import seal

        seal(work)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def remove_bases(state: Path) -> None:
    shutil.rmtree(state / "base", ignore_errors=True)

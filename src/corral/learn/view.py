"""The throwaway view of the host that `corral learn` runs a program in, as a user who is not root.

Learning used to run the program as root on the host itself: it left root-owned files in
Debian's real redis and nginx directories, and PostgreSQL, which refuses root, could not be
learned at all. Now the program sees the host through a private mount namespace where every
file system is an overlay whose upper layer is one tmpfs: it reads the host's real files (so the
trace names real paths), and whatever it writes lands in RAM and is gone with the namespace.
Nothing on the host changes, not even an atime's worth of ownership.

It runs as `--user NAME` (the service's would-be user, e.g. Debian's `postgres`), or by default
as a throwaway uid no host user has, named `corral-learn` only inside the view (a line added to
the view's /etc/passwd, never the host's). `--writable DIR` gives that user DIR in the view, as
systemd's StateDirectory= would: created if missing and chowned, in the overlay only.

strace runs as that user too (it traces its own child), with no capability but
NET_BIND_SERVICE, ambient, the one a contained process may be given for a port below 1024 (and
the one learn infers from such a bind), and no_new_privs: as the containment will run it.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field

from corral.core import mountinfo
from corral.core.errors import UsageError

LEARN_USER = "corral-learn"
# A uid for the throwaway user: above Debian's dynamic range (1000-59999) and its system ones.
FREE_UIDS = range(64000, 65000)
# Kernel file systems: bound recursively as they are (the program's /proc is the host's: it
# runs in the host's PID namespace, as a user who cannot write there).
BOUND = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    throwaway: bool  # corral-learn: exists in the view's /etc/passwd only


@dataclass(frozen=True)
class View:
    work: str  # a root-only directory of the caller's, empty: the view is built under it
    user: User
    writable: tuple[str, ...] = field(default=())

    @property
    def root(self) -> str:
        return os.path.join(self.work, "root")


def user_for(name: str | None) -> User:
    """`--user NAME`, never root; without it a uid no host user or group has."""
    if name is not None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UsageError(f"--user: {name!r}: no such user") from None
        if entry.pw_uid == 0:
            raise UsageError(f"--user: {name!r} is root: learn never runs a program as root")
        return User(entry.pw_name, entry.pw_uid, entry.pw_gid, False)
    import grp

    taken = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    uid = next(u for u in FREE_UIDS if u not in taken)
    return User(LEARN_USER, uid, uid, True)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of this namespace, parents before children."""
    seen: dict[str, str] = {}
    for mount in mountinfo.read():
        seen[mount.point] = mount.fstype  # the last one mounted at a point is the one seen there
    return sorted(seen.items(), key=lambda item: (item[0].count("/"), item[0] != "/", item[0]))


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def enter(view: View) -> None:
    """In the child, before it execs strace: a private mount namespace, the view, chroot into
    it. Runs as root; raises OSError (the caller reports it, the program never starts)."""
    from corral.kernel import syscalls as k

    k.unshare(k.CLONE_NEWNS)
    k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)  # nothing below leaks to the host
    layers = os.path.join(view.work, "layers")
    os.makedirs(layers, exist_ok=True)
    k.mount("corral-learn", layers, "tmpfs", k.MS_NOSUID | k.MS_NODEV, "mode=0700")
    os.makedirs(view.root, exist_ok=True)
    for n, (point, fstype) in enumerate(_mounts()):
        if _under(point, BOUND) or _under(point, (view.work,)):
            continue
        target = view.root + point.rstrip("/") if point != "/" else view.root
        if fstype == "nsfs" or not os.path.isdir(point) or not os.path.isdir(target):
            continue  # a file bound over a file (a namespace, a masked file): the lower one
        upper, work = os.path.join(layers, f"u{n}"), os.path.join(layers, f"w{n}")
        os.mkdir(upper)
        os.mkdir(work)
        try:
            if any(c in point for c in ",:\\"):
                raise OSError("not as an overlay")
            k.mount("corral-learn", target, "overlay", k.MS_NOSUID,
                    f"lowerdir={point},upperdir={upper},workdir={work}")
        except OSError:
            # A file system that cannot be an overlay's lower layer: read-only, so a write
            # there fails instead of reaching the host.
            k.mount(point, target, None, k.MS_BIND)
            k.mount(None, target, None, k.MS_BIND | k.MS_REMOUNT | k.MS_RDONLY | k.MS_NOSUID)
    for point in BOUND:
        k.mount(point, view.root + point, None, k.MS_BIND | k.MS_REC)
    user = view.user
    if user.throwaway:  # its name, in the view only (getpwuid must find it: PostgreSQL asks)
        with open(os.path.join(view.root, "etc/passwd"), "a") as handle:
            handle.write(f"{user.name}:x:{user.uid}:{user.gid}:corral learn:/:/usr/sbin/nologin\n")
        with open(os.path.join(view.root, "etc/group"), "a") as handle:
            handle.write(f"{user.name}:x:{user.gid}:\n")
    for path in view.writable:
        inside = view.root + os.path.normpath(path)
        os.makedirs(inside, mode=0o755, exist_ok=True)
        for top, dirs, files in os.walk(inside):
            for entry in [top] + [os.path.join(top, e) for e in dirs + files]:
                os.lchown(entry, user.uid, user.gid)
    os.chroot(view.root)
    os.chdir("/")
    from corral.launch import creds

    creds.drop_privileges(user.uid, user.gid, ["NET_BIND_SERVICE"])

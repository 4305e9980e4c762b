"""Who holds the kernel's audit on. The audit sensor turns audit on for Landlock's refusal
records (kernel.audit), and corral must leave the host as it found it: every supervisor whose
audit sensor runs registers here, and the last one to leave turns audit off again, but only
if corral was the one that turned it on.

Audit is host-wide, so the registry is too: /run/corral-audit, not under CORRAL_ROOT (tests move
it with CORRAL_AUDIT_REGISTRY), a directory of root's alone (0700). A symlink, or a directory
that is not root's or is open to others, is refused, and audit is then left as it is. In it:
- `lock`: every change to the registry is made under an exclusive flock on it;
- `PID.N`: one holder file per sensor, exclusively flocked by it for its lifetime. The kernel
  drops a flock when its holder dies, so a holder file whose flock can be taken is stale (a
  supervisor killed by SIGKILL, which never unregistered): the next unregister removes it;
- `enabled-by-corral`: the marker that corral, not the admin, turned audit on. Without it
  corral never turns audit off. /run is emptied at boot, as the kernel's audit state is;
- `disables`: a byte appended each time corral turned audit off, after it did: a status asked
  ahead of the lock (`ask`, to overlap the kernel's slow reply with the service's set-up) is
  trusted by `register` only if this count has not moved since it was asked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import stat
import time
from collections.abc import Iterator

from corral.core.record import record
from corral.kernel import audit

REGISTRY = "/run/corral-audit"
LOCK, MARKER, DISABLES = "lock", "enabled-by-corral", "disables"
LOCK_WAIT = 10.0  # seconds; the lock is held only for a netlink round trip and a few files
_HOLDER = re.compile(r"[0-9]+\.[0-9]+")
_serial = itertools.count()  # two sensors of one process hold two files
_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


@record
class Hold:
    """One sensor's registration. `dir_fd` is None when the registry was refused (nothing is
    held, audit was left as it was); `note` says what register found or did, for `status`."""

    dir_fd: int | None
    name: str = ""
    fd: int = -1
    note: str = ""


@record
class Early:
    """The audit status asked ahead of `register` (kernel.audit.StatusQuery), and the count of
    corral's disables when it was asked."""

    disables: int
    query: audit.StatusQuery

    def close(self) -> None:
        self.query.close()


class _Refused(Exception):
    pass


def _disables(name: str, dir_fd: int | None = None) -> int:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
    except OSError:
        return -1  # never equal to a count read later: the status is asked again


def ask() -> Early:
    """Ask the audit status now, for a `register` a little later."""
    return Early(_disables(os.path.join(registry(), DISABLES)), audit.StatusQuery())


def registry() -> str:
    return os.environ.get("CORRAL_AUDIT_REGISTRY") or REGISTRY


def _open_registry(path: str) -> int:
    """The registry directory's fd, made if missing; checked on the fd itself, so a swap
    between the check and the use is impossible."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if os.path.islink(path):
        raise _Refused("it is a symlink")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _FLAGS)
    except OSError as exc:
        raise _Refused(exc.strerror or str(exc)) from exc
    st = os.fstat(fd)
    why = ("it is not owned by root" if st.st_uid != 0
           else f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0700"
           if st.st_mode & 0o077 else "")
    if why:
        os.close(fd)
        raise _Refused(why)
    return fd


@contextlib.contextmanager
def _locked(dir_fd: int) -> Iterator[None]:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | _FLAGS, 0o600, dir_fd=dir_fd)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:  # bounded: a wedged holder of the lock must not hang a supervisor's stop
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, "the audit registry's lock is busy") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the flock


def _has_marker(dir_fd: int) -> bool:
    try:
        return stat.S_ISREG(os.stat(MARKER, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def register(early: Early | None = None) -> Hold:
    """Register the calling sensor, and turn audit on if it is off (writing the marker).
    Raises OSError only for a registry that is sound but cannot be written."""
    path = registry()
    try:
        dir_fd = _open_registry(path)
    except _Refused as exc:
        if early is not None:
            early.close()
        try:
            was = "audit left on" if audit.enabled() else \
                "without Landlock's refusals: audit left off"
        except OSError as err:
            was = f"audit left as is ({err.strerror})"
        return Hold(None, note=f"{was}: holder registry {path} refused: {exc}")
    try:
        with _locked(dir_fd):
            name = f"{os.getpid()}.{next(_serial)}"
            fd = os.open(name, os.O_RDWR | os.O_CREAT | _FLAGS, 0o600, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            hold = Hold(dir_fd, name, fd)
            had_marker = _has_marker(dir_fd)
            try:
                if _status(dir_fd, early) == 0:
                    # the marker first: a crash between the two leaves a marker and audit off,
                    # which the last unregister sets right, never audit on and unclaimed
                    os.close(os.open(MARKER, os.O_WRONLY | os.O_CREAT | _FLAGS, 0o600,
                                     dir_fd=dir_fd))
                    audit.enable()
                    hold.note = "audit enabled by corral for Landlock's refusals"
            except OSError as exc:  # seccomp's records still come; Landlock's do not
                if not had_marker:  # corral did not turn it on: no claim on it later
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(MARKER, dir_fd=dir_fd)
                hold.note = f"without Landlock's refusals: audit is off, {exc.strerror}"
            return hold
    except BaseException:
        os.close(dir_fd)
        raise


def _status(dir_fd: int, early: Early | None) -> int:
    """Under the lock: the status asked early if no supervisor turned audit off since (the
    count moves after the disable, so an unmoved count means the question came after it or
    no disable happened), else asked now."""
    state = None
    if early is not None:
        if _disables(DISABLES, dir_fd) == early.disables:
            with contextlib.suppress(OSError):
                state = early.query.enabled()
        early.close()
    return audit.enabled() if state is None else state


def _live_holders(dir_fd: int) -> int:
    """Count the holders whose flock is held, removing the stale ones."""
    live = 0
    for name in os.listdir(dir_fd):
        if not _HOLDER.fullmatch(name):
            continue
        try:
            fd = os.open(name, os.O_RDWR | os.O_NONBLOCK | _FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1
                continue
            os.unlink(name, dir_fd=dir_fd)  # its process is gone
        finally:
            os.close(fd)
    return live


def unregister(hold: Hold) -> str:
    """Drop `hold`, and the stale holders; the last live holder out turns audit off if the
    marker says corral turned it on. Returns what was done to audit ("" when nothing)."""
    dir_fd, hold.dir_fd = hold.dir_fd, None
    if dir_fd is None:
        return ""
    try:
        with _locked(dir_fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(hold.name, dir_fd=dir_fd)
            os.close(hold.fd)
            if _live_holders(dir_fd) or not _has_marker(dir_fd):
                return ""
            state = audit.enabled()
            if state == 2:  # locked until reboot: nothing can be done, nothing is tried
                return "audit is locked on: left as is"
            if state == 1 and (daemon := audit.daemon()):
                done = f"audit left on: an audit daemon (pid {daemon}) registered since"
            elif state == 1:
                audit.disable()
                fd = os.open(DISABLES, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _FLAGS, 0o600,
                             dir_fd=dir_fd)
                try:
                    os.write(fd, b"x")
                finally:
                    os.close(fd)
                done = "audit disabled again (corral had enabled it)"
            else:
                done = "audit was already disabled"
            os.unlink(MARKER, dir_fd=dir_fd)
            return done
    finally:
        os.close(dir_fd)

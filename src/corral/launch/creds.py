"""Credentials of a contained process: its own user and group, no supplementary groups, and
only the capabilities the manifest declares (as ambient capabilities, so they survive execve of
a program that has no file capabilities). Called as root in the child, before Landlock and
seccomp."""

from __future__ import annotations

import os

from corral.core.capabilities import CAPABILITIES
from corral.kernel import syscalls as kernel

# Read from /proc/sys/kernel/cap_last_cap at run time: newer kernels know more capabilities than
# this table, and every one of them must leave the bounding set too.
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


def _last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_FILE) as handle:
            return int(handle.read())
    except OSError:
        return max(CAPABILITIES.values())


def mask(names: tuple[str, ...] | list[str]) -> int:
    value = 0
    for name in names:
        value |= 1 << CAPABILITIES[name]
    return value


def drop_privileges(uid: int, gid: int, keep: tuple[str, ...] | list[str],
                    last_cap: int | None = None) -> None:
    """Become uid/gid for good, keeping only `keep`, and set no_new_privs."""
    keep_mask = mask(keep)
    last = _last_cap() if last_cap is None else last_cap
    # Bounding set first, while we still have CAP_SETPCAP: nothing outside `keep` can ever come
    # back, not even through a setuid-root or file-capability binary.
    for cap in range(last + 1):
        if not keep_mask & (1 << cap):
            kernel.prctl(kernel.PR_CAPBSET_DROP, cap)
    kernel.prctl(kernel.PR_CAP_AMBIENT, kernel.PR_CAP_AMBIENT_CLEAR_ALL)
    if keep_mask:
        kernel.prctl(kernel.PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_mask:
        kernel.prctl(kernel.PR_SET_KEEPCAPS, 0)
        kernel.capset(keep_mask, keep_mask, keep_mask)
        for name in keep:
            kernel.prctl(kernel.PR_CAP_AMBIENT, kernel.PR_CAP_AMBIENT_RAISE, CAPABILITIES[name])
    kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)

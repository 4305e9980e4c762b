"""System users, one per process: created with shadow-utils, never adopted, removed exactly.

useradd/userdel are used instead of editing /etc/passwd by hand: they take the same locks as every
other tool on the host (lckpwdf), keep /etc/shadow and /etc/gshadow in step, and pick a uid in the
system range from /etc/login.defs.
"""

from __future__ import annotations

import pwd
import subprocess
from dataclasses import dataclass

from corral.core.errors import RuntimeFailure
from corral.plan.service import UserSpec

NOLOGIN = "/usr/sbin/nologin"
NO_HOME = "/nonexistent"


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int


def lookup(name: str) -> SystemUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return SystemUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def is_ours(spec: UserSpec) -> bool:
    try:
        entry = pwd.getpwnam(spec.name)
    except KeyError:
        return False
    return entry.pw_gecos == spec.comment and entry.pw_shell == NOLOGIN


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()
        raise RuntimeFailure(f"{what}: {detail[-1] if detail else f'exit {result.returncode}'}")


def create(spec: UserSpec) -> SystemUser:
    """Create a locked system user with its own group, no home and no login shell."""
    _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", NO_HOME,
          "--shell", NOLOGIN, "--comment", spec.comment, spec.name],
         f"cannot create user {spec.name}")
    user = lookup(spec.name)
    if user is None:  # useradd said yes but NSS does not see it (nscd, LDAP first): stop here
        raise RuntimeFailure(f"user {spec.name} was created but cannot be looked up")
    return user


def remove(spec: UserSpec) -> bool:
    """Delete the user and its group, only if it carries our marker. True if it existed."""
    if lookup(spec.name) is None:
        return False
    if not is_ours(spec):
        raise RuntimeFailure(f"user {spec.name} was not created by corral; left as it is")
    _run(["userdel", spec.name], f"cannot remove user {spec.name}")
    return True

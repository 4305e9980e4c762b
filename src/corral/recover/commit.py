"""`corral commit`: fold a service's delta into a new base version, refusing what must not enter
a base unless the operator names it (executables, setuid files, protected paths)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from corral.core.errors import UsageError
from corral.core.text import show
from corral.core.tree import is_opaque, is_whiteout
from corral.host import runtime
from corral.host.base import INTEGRITY, CheckFailed, next_version, seal, use
from corral.recover import delta


def refusals(changes: list[delta.Change], allow: list[str]) -> list[str]:
    """Why each change may not be folded into the base without being named in --allow."""
    allowed = tuple(a.rstrip("/") for a in allow)

    def is_allowed(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in allowed)

    out = []
    for change in changes:
        path = show(change.path)
        if is_allowed(path):
            continue
        why = []
        if change.setid:
            why.append("setuid/setgid")
        if change.executable:
            why.append("executable or library")
        if change.path.startswith(delta.SENSITIVE_PREFIXES):
            why.append("protected path")
        if why:
            out.append(f"{path}: {change.change}, {' and '.join(why)}")
    return out


def _apply_upper(upper_fd: int, dest: Path, prefix: str = "") -> None:
    """Copy the upper layer over a copy of the base: whiteouts delete, opaque dirs replace."""
    for item in sorted(os.scandir(upper_fd), key=lambda e: e.name):
        name = item.name
        st = os.stat(name, dir_fd=upper_fd, follow_symlinks=False)
        target = dest / prefix / name
        if os.path.lexists(target) and (is_whiteout(st) or not stat.S_ISDIR(st.st_mode)
                                        or not target.is_dir() or target.is_symlink()):
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() \
                else target.unlink()
        if is_whiteout(st):
            continue
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=upper_fd)
            try:
                if target.is_dir() and is_opaque(sub):
                    shutil.rmtree(target)
                target.mkdir(exist_ok=True)
                _apply_upper(sub, dest, f"{prefix}{name}/")
            finally:
                os.close(sub)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=upper_fd), target)
        elif stat.S_ISREG(st.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=upper_fd)
            try:
                with open(target, "xb") as out, os.fdopen(os.dup(src), "rb") as data:
                    shutil.copyfileobj(data, out)
            finally:
                os.close(src)
        else:
            continue  # devices, fifos and sockets never enter a base
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(st.st_mode) & 0o1777)  # never setuid in a base
            os.chown(target, st.st_uid, st.st_gid)


def commit(spec: runtime.ServiceSpec, upper_fd: int, base_fd: int,
           allow: list[str]) -> dict[str, Any]:
    """Fold the delta into base version max+1 and make it the current one."""
    found = delta.changes(upper_fd, base_fd)
    if not found:
        raise UsageError(f"{spec.service}: the delta is empty; nothing to commit")
    refused = refusals(found, allow)
    if refused:
        raise CheckFailed(f"{spec.service}: commit refused; these changes need --allow PATH:\n  "
                          + "\n  ".join(refused))
    version = next_version(spec.state)
    final = spec.state / "base" / str(version)
    work = spec.state / "base" / f".building-{version}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        # cp -a keeps every link and owner and never follows a symlink; the base is ours.
        subprocess.run(["cp", "-a", "--reflink=auto", str(spec.base_root), str(work / "root")],
                       check=True, capture_output=True)
        _apply_upper(upper_fd, work / "root")
        previous = json.loads((spec.base_root.parent / "image.json").read_text())
        (work / "image.json").write_text(json.dumps(
            dict(previous, version=version, note=f"commit of the delta on base "
                 f"{spec.base_version}", changes=len(found)), indent=2) + "\n")
        seal(work)
        meta = json.loads((work / "image.json").read_text())
        meta["entries"] = len(json.loads((work / INTEGRITY).read_text())["entries"])
        (work / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    use(spec, version)
    return {"service": spec.service, "version": version, "from_version": spec.base_version,
            "changes": [c.to_json() for c in found]}

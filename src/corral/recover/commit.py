"""`corral commit`: fold a service's delta into a new base version, refusing what must not enter
a base unless the operator names it (executables, setuid files, protected paths)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from corral.core import tree
from corral.core.errors import UsageError
from corral.core.text import show
from corral.core.tree import is_whiteout
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


def _fold(upper_fd: int, base_fd: int, dest: Path) -> list[delta.Change]:
    """Copy the upper layer over a copy of the base (whiteouts delete, opaque dirs replace) and
    return its changes, in ONE walk: what the refusals check is what was copied, read from the
    same descriptor. (Two walks, a check then a copy, once disagreed: the check skipped what it
    could not open, the copy did not.) A walk that cannot see the whole delta raises."""
    found: list[delta.Change] = []
    budget = tree.Budget(delta.READ_BUDGET)  # a delta may hold 8 EiB of holes: bounded
    for entry in tree.walk(upper_fd, base_fd=base_fd):
        st = entry.st
        target = dest / os.fsdecode(entry.path[1:])
        if os.path.lexists(target) and (is_whiteout(st) or not stat.S_ISDIR(st.st_mode)
                                        or not target.is_dir() or target.is_symlink()):
            _remove(target)
        if stat.S_ISDIR(st.st_mode) and not is_whiteout(st):
            if target.is_dir() and entry.opaque:
                _remove(target)
            target.mkdir(exist_ok=True)
            found.extend(delta.of_entry(entry))
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > delta.READ_BUDGET:  # only holes make a file this size in a delta
                raise tree.WalkError(entry.path, f"{st.st_size} bytes: larger than one commit "
                                     f"copies ({delta.READ_BUDGET} bytes)")
            try:  # sparsely: only the data is read and written, holes stay holes
                with open(target, "xb") as out:
                    described = delta.of_entry(entry, sink=out, budget=budget)
            except OSError as exc:  # EFBIG, ENOSPC...: refused, never a half-written base
                raise tree.WalkError(entry.path, f"cannot be copied: {exc.strerror}") from None
            if entry.path in budget.skipped:
                raise tree.WalkError(entry.path, "more data than one commit copies "
                                     f"({delta.READ_BUDGET} bytes)")
            if described and described[0].blake3 is None:  # not what was listed any more
                raise tree.WalkError(entry.path, "changed while being copied")
            found.extend(described)
        elif stat.S_ISLNK(st.st_mode):
            described = delta.of_entry(entry)
            found.extend(described)
            link = described[0].target if described else \
                os.readlink(entry.name, dir_fd=entry.dir_fd)
            if link is None:  # of_entry reads a symlink's text: a Change without it is a bug
                raise tree.WalkError(entry.path, "a symlink described without its target")
            os.symlink(link, target)
            continue
        else:
            found.extend(delta.of_entry(entry))
            continue  # whiteouts (their deletions are in `found`), devices, fifos, sockets
        os.chmod(target, stat.S_IMODE(st.st_mode) & 0o1777)  # never setuid in a base
        os.chown(target, st.st_uid, st.st_gid)
    return sorted(found, key=lambda c: c.path)


def _remove(path: Path) -> None:
    with tree.directory(str(path.parent)) as parent:
        tree.remove(parent, path.name)


def commit(spec: runtime.ServiceSpec, upper_fd: int, base_fd: int,
           allow: list[str]) -> dict[str, Any]:
    """Fold the delta into base version max+1 and make it the current one."""
    state = Path(spec.state)
    version = next_version(state)
    final = state / "base" / str(version)
    work = state / "base" / f".building-{version}"
    if work.exists():
        _remove(work)
    work.mkdir()
    try:
        # cp -a keeps every link and owner and never follows a symlink; the base is ours.
        subprocess.run(["cp", "-a", "--reflink=auto", spec.base_root, str(work / "root")],
                       check=True, capture_output=True)
        try:
            found = _fold(upper_fd, base_fd, work / "root")
        except tree.WalkError as exc:
            raise CheckFailed(f"{spec.service}: commit refused; the delta cannot be checked "
                              f"whole: {exc}") from None
        if not found:
            raise UsageError(f"{spec.service}: the delta is empty; nothing to commit")
        refused = refusals(found, allow)
        if refused:
            raise CheckFailed(f"{spec.service}: commit refused; these changes need --allow "
                              "PATH:\n  " + "\n  ".join(refused))
        previous = json.loads(Path(spec.base_root).parent.joinpath("image.json").read_text())
        (work / "image.json").write_text(json.dumps(
            dict(previous, version=version, note=f"commit of the delta on base "
                 f"{spec.base_version}", changes=len(found)), indent=2) + "\n")
        seal(work)
        meta = json.loads((work / "image.json").read_text())
        meta["entries"] = len(json.loads((work / INTEGRITY).read_text())["entries"])
        (work / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(work, final)
    except BaseException:
        _remove(work)
        raise
    use(spec, version)
    return {"service": spec.service, "version": version, "from_version": spec.base_version,
            "changes": [c.to_json() for c in found]}

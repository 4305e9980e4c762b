"""What a running service changed against its base: the overlay's upper layer, decoded.

The delta was written by the contained process, so everything in it is hostile: names may hold
newlines or invalid UTF-8, symlinks may point anywhere, files may be swapped while we read.
Every access is relative to a directory file descriptor, with O_NOFOLLOW, and a symlink is
reported by its text, never followed. The base is corral's own, but it is read the same way.

overlayfs encodes in the upper layer: a whiteout (a character device 0/0) for a deleted name,
and the xattr trusted.overlay.opaque = "y" on a directory that hides the base's contents.
"""

from __future__ import annotations

import os
import stat

from corral.core import tree
from corral.core.record import record
from corral.core.text import show
from corral.core.tree import KINDS, hash_and_magic, is_whiteout

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any, BinaryIO, TypedDict

    class _Common(TypedDict):
        """The fields of a Change that an added and a modified entry share."""

        kind: str
        mode: int
        uid: int
        gid: int
        size: int | None
        blake3: str | None
        target: bytes | None
        executable: bool
        setid: bool

# Paths whose change in the delta shadows what the service runs or trusts: base-write tripwire.
READ_BUDGET = 1 << 30  # bytes of file data one pass over a delta reads (tree.Budget)
SENSITIVE_PREFIXES = (b"/bin/", b"/sbin/", b"/usr/bin/", b"/usr/sbin/", b"/lib/", b"/lib64/",
                      b"/usr/lib/", b"/usr/lib64/", b"/usr/libexec/", b"/etc/", b"/opt/",
                      b"/usr/local/")


@record(frozen=True)
class Change:
    path: bytes  # inside the root, absolute
    change: str  # "added" | "modified" | "deleted"
    kind: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    blake3: str | None = None
    target: bytes | None = None  # symlink text
    details: tuple[str, ...] = ()  # for "modified": what differs (content, mode, owner, type)
    executable: bool = False  # has an x bit or is an ELF file
    setid: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": show(self.path), "change": self.change, "kind": self.kind}
        for name in ("uid", "gid", "size", "blake3"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.mode is not None:
            out["mode"] = f"{self.mode:04o}"
        if self.target is not None:
            out["target"] = show(self.target)
        if self.details:
            out["details"] = list(self.details)
        if self.change != "deleted":
            out["executable"], out["setid"] = self.executable, self.setid
        return out

    @property
    def sensitive(self) -> bool:
        return self.path.startswith(SENSITIVE_PREFIXES) or self.executable or self.setid


@record
class _Entry:
    st: os.stat_result
    blake3: str | None = None
    target: bytes | None = None
    elf: bool = False


def _describe(dir_fd: int, name: bytes, st: os.stat_result,
              sink: BinaryIO | None = None, budget: tree.Budget | None = None,
              path: bytes = b"") -> _Entry:
    entry = _Entry(st)
    if stat.S_ISREG(st.st_mode):
        entry.blake3, entry.elf = hash_and_magic(dir_fd, name, sink, budget, path)
    elif stat.S_ISLNK(st.st_mode):
        entry.target = os.readlink(name, dir_fd=dir_fd)
    return entry


def _change(path: bytes, kind_of: str, entry: _Entry, base: _Entry | None) -> Change | None:
    st = entry.st
    mode = stat.S_IMODE(st.st_mode)
    executable = entry.elf or (stat.S_ISREG(st.st_mode) and bool(mode & 0o111))
    common: _Common = {"kind": kind_of, "mode": mode, "uid": st.st_uid, "gid": st.st_gid,
                       "size": st.st_size if stat.S_ISREG(st.st_mode) else None,
                       "blake3": entry.blake3, "target": entry.target,
                       "executable": executable, "setid": bool(mode & 0o6000)}
    if base is None:
        return Change(path, "added", **common)
    details = []
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(base.st.st_mode):
        details.append("type")
    else:
        if entry.blake3 != base.blake3 or entry.target != base.target:
            details.append("content")
        if mode != stat.S_IMODE(base.st.st_mode):
            details.append("mode")
        if (st.st_uid, st.st_gid) != (base.st.st_uid, base.st.st_gid):
            details.append("owner")
    if not details:
        return None  # copied up without a change (e.g. opened for writing, nothing written)
    return Change(path, "modified", details=tuple(details), **common)


def _kind(st: os.stat_result) -> str:
    return KINDS.get(stat.S_IFMT(st.st_mode), "?")


def changes(upper_fd: int, base_fd: int, truncated: list[bytes] | None = None,
            budget: tree.Budget | None = None) -> list[Change]:
    """Walk the upper layer against the base; both are directory fds. A tree the walk cannot
    see whole raises (tree.WalkError, TooDeep past tree.MAX_DEPTH), unless `truncated` is given:
    then the directories too deep to enter are listed there (the archive of a revert keeps
    what it can). The files' contents are read within `budget` (READ_BUDGET by default):
    past it, a file is listed without its hash (budget.skipped)."""
    budget = budget or tree.Budget(READ_BUDGET)
    on_too_deep = None if truncated is None else (lambda e: truncated.append(e.path))
    out: list[Change] = []
    for entry in tree.walk(upper_fd, base_fd=base_fd, on_too_deep=on_too_deep):
        out.extend(of_entry(entry, budget=budget))
    return sorted(out, key=lambda c: c.path)


def of_entry(entry: tree.Entry, sink: BinaryIO | None = None,
             budget: tree.Budget | None = None) -> list[Change]:
    """What one entry of the upper layer changes in the base (a whiteout: every base path
    below it deleted; an opaque directory: the base's entries it lacks). `sink` receives a
    regular file's content as it is hashed, so that commit copies exactly what was checked."""
    path, st, base_st = entry.path, entry.st, entry.base_st
    if is_whiteout(st):
        if base_st is None:
            return []
        out = [Change(path, "deleted", _kind(base_st))]
        if stat.S_ISDIR(base_st.st_mode):
            with tree.opened(entry.base_fd, os.fsdecode(entry.name),  # type: ignore[arg-type]
                             tree.DIR_FLAGS) as sub:
                out.extend(Change(e.path, "deleted", _kind(e.st))
                           for e in tree.walk(sub, prefix=path, depth=entry.depth))
        return out
    described = _describe(entry.dir_fd, entry.name, st, sink, budget, path)
    base = _describe(entry.base_fd, entry.name, base_st) if base_st is not None else None  # type: ignore[arg-type]
    change = _change(path, _kind(st), described, base)
    out = [change] if change is not None else []
    if entry.opaque and base_st is not None and stat.S_ISDIR(base_st.st_mode):
        # The directory hides the base's: whatever the upper lacks is deleted.
        name = os.fsdecode(entry.name)
        with tree.opened(entry.dir_fd, name, tree.DIR_FLAGS) as sub_upper, \
                tree.opened(entry.base_fd, name, tree.DIR_FLAGS) as sub_base:  # type: ignore[arg-type]
            present = set(os.listdir(sub_upper))
            for bname in sorted(set(os.listdir(sub_base)) - present):
                try:
                    bst = os.stat(bname, dir_fd=sub_base, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append(Change(path + b"/" + os.fsencode(bname), "deleted", _kind(bst)))
    return out


def base_writes(found: list[Change]) -> list[Change]:
    """The base-write tripwire: a change over a base file that the service runs or trusts
    (executable, setuid/setgid, or under bin/lib/etc-style paths). A file the service only
    added is not one: running it is the `exec` tripwire's business."""
    return [c for c in found if c.change in ("modified", "deleted") and c.sensitive]

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from corral.core.text import show
from corral.core.tree import KINDS, hash_and_magic, is_opaque, is_whiteout, lstat_at, open_dir

# Paths whose change in the delta shadows what the service runs or trusts: base-write tripwire.
SENSITIVE_PREFIXES = (b"/bin/", b"/sbin/", b"/usr/bin/", b"/usr/sbin/", b"/lib/", b"/lib64/",
                      b"/usr/lib/", b"/usr/lib64/", b"/usr/libexec/", b"/etc/", b"/opt/",
                      b"/usr/local/")


@dataclass(frozen=True)
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


@dataclass
class _Entry:
    st: os.stat_result
    blake3: str | None = None
    target: bytes | None = None
    elf: bool = False
    children: dict[bytes, Any] = field(default_factory=dict)


def _describe(dir_fd: int, name: bytes, st: os.stat_result) -> _Entry:
    entry = _Entry(st)
    if stat.S_ISREG(st.st_mode):
        entry.blake3, entry.elf = hash_and_magic(dir_fd, name)
    elif stat.S_ISLNK(st.st_mode):
        entry.target = os.readlink(name, dir_fd=dir_fd)
    return entry


def _change(path: bytes, kind_of: str, entry: _Entry, base: _Entry | None) -> Change | None:
    st = entry.st
    mode = stat.S_IMODE(st.st_mode)
    executable = entry.elf or (stat.S_ISREG(st.st_mode) and bool(mode & 0o111))
    common = dict(kind=kind_of, mode=mode, uid=st.st_uid, gid=st.st_gid,
                  size=st.st_size if stat.S_ISREG(st.st_mode) else None,
                  blake3=entry.blake3, target=entry.target, executable=executable,
                  setid=bool(mode & 0o6000))
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


def _base_entries(fd: int | None, prefix: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """Every path under a base directory (for an opaque directory: all of them deleted)."""
    if fd is None:
        return
    for item in os.scandir(fd):
        name = os.fsencode(item.name)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        yield prefix + name, st
        if stat.S_ISDIR(st.st_mode):
            sub = open_dir(fd, name)
            try:
                yield from _base_entries(sub, prefix + name + b"/")
            finally:
                if sub is not None:
                    os.close(sub)


def changes(upper_fd: int, base_fd: int) -> list[Change]:
    """Walk the upper layer against the base; both are directory fds."""
    out: list[Change] = []
    _walk(upper_fd, base_fd, b"/", out)
    return sorted(out, key=lambda c: c.path)


def _walk(upper_fd: int, base_fd: int | None, prefix: bytes, out: list[Change]) -> None:
    for item in os.scandir(upper_fd):
        name = os.fsencode(item.name)
        path = prefix + name
        st = os.stat(name, dir_fd=upper_fd, follow_symlinks=False)
        base_st = lstat_at(base_fd, name)
        if is_whiteout(st):
            if base_st is not None:
                out.append(Change(path, "deleted", KINDS.get(stat.S_IFMT(base_st.st_mode), "?")))
                if stat.S_ISDIR(base_st.st_mode):
                    sub = open_dir(base_fd, name)
                    try:
                        out.extend(Change(p, "deleted", KINDS.get(stat.S_IFMT(s.st_mode), "?"))
                                   for p, s in _base_entries(sub, path + b"/"))
                    finally:
                        if sub is not None:
                            os.close(sub)
            continue
        entry = _describe(upper_fd, name, st)
        base_entry = _describe(base_fd, name, base_st) if base_st is not None else None
        change = _change(path, KINDS.get(stat.S_IFMT(st.st_mode), "?"), entry, base_entry)
        if change is not None:
            out.append(change)
        if stat.S_ISDIR(st.st_mode):
            sub_upper = open_dir(upper_fd, name)
            if sub_upper is None:
                continue
            base_is_dir = base_st is not None and stat.S_ISDIR(base_st.st_mode)
            sub_base = open_dir(base_fd, name) if base_is_dir else None
            try:
                if sub_base is not None and is_opaque(sub_upper):
                    # The directory hides the base's: whatever the upper lacks is deleted.
                    present = {os.fsencode(e.name) for e in os.scandir(sub_upper)}
                    for base_item in os.scandir(sub_base):
                        bname = os.fsencode(base_item.name)
                        if bname not in present:
                            bst = os.stat(bname, dir_fd=sub_base, follow_symlinks=False)
                            out.append(Change(path + b"/" + bname, "deleted",
                                              KINDS.get(stat.S_IFMT(bst.st_mode), "?")))
                    os.close(sub_base)
                    sub_base = None
                _walk(sub_upper, sub_base, path + b"/", out)
            finally:
                os.close(sub_upper)
                if sub_base is not None:
                    os.close(sub_base)


def base_writes(found: list[Change]) -> list[Change]:
    """The base-write tripwire: a change over a base file that the service runs or trusts
    (executable, setuid/setgid, or under bin/lib/etc-style paths). A file the service only
    added is not one: running it is the `exec` tripwire's business."""
    return [c for c in found if c.change in ("modified", "deleted") and c.sensitive]

"""/proc/self/mountinfo, read once and the same way everywhere (proc(5)).

A line: `ID PARENT MAJ:MIN ROOT POINT MOUNT-OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS`.
The paths (ROOT, POINT, SOURCE) are written with space, tab, newline and backslash as `\\ooo`,
so a path is compared only after `unescape`. POINT is as this process sees it: after a
pivot_root, relative to the new root. Only the standard library is used: the launch reads it.
"""

from __future__ import annotations

import os

from corral.core.record import record

PATH = "/proc/self/mountinfo"


@record(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    dev: int  # MAJ:MIN as os.makedev makes it: the st_dev of the files on this file system
    root: str  # the directory of the mounted file system shown at `point` ("/": its own root)
    point: str
    read_only: bool  # the mount or its super block: a write beneath it gets EROFS
    fstype: str
    source: str
    super_options: tuple[str, ...]


def unescape(field: str) -> str:
    """mountinfo's `\\ooo` (octal) back to the character."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[Mount]:
    """Every mount of `text`, in the kernel's order (a mount comes after the one it covers)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue  # not a mountinfo line: nothing to say about it
        supers = tuple(tail[2].split(","))
        # positional: a record's keyword arguments cost more, and the launch parses these
        major, _, minor = fields[2].partition(":")
        mounts.append(Mount(int(fields[0]), int(fields[1]), os.makedev(int(major), int(minor)),
                            unescape(fields[3]),
                            unescape(fields[4]), "ro" in fields[5].split(",") or "ro" in supers,
                            tail[0], unescape(tail[1]), supers))
    return mounts


def read(path: str = PATH) -> list[Mount]:
    """This process's mounts; OSError if /proc cannot be read."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return parse(handle.read())


def at(mounts: list[Mount], point: str) -> Mount | None:
    """The mount on top at exactly `point`, or None."""
    return next((m for m in reversed(mounts) if m.point == point), None)


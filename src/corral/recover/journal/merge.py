"""Excision at the grain of the data for files: take out what a stretch of epochs did to a file
that changed again after it, the way `git revert` takes a commit out of a file.

Three versions of the file are known: BEFORE the stretch, at its END, and CURRENT (after the
later epochs). The revert is a three-way merge whose common ancestor is END: CURRENT's changes
since END are kept, and the stretch's changes (END against BEFORE) are undone, region by region.

- Append-only files (BEFORE a prefix of END, END a prefix of CURRENT: a log, a JSON-lines
  store) are settled by byte ranges, whatever they hold: BEFORE + what came after END. The
  stretch's appended bytes go, the later ones stay, and no conflict is possible. A line merge
  would call this a conflict (the stretch's lines and the later ones touch at the end).
- Text files go through merge3 (bzr's three-way merge, the algorithm breezy has used for years,
  packaged on PyPI with types): its regions say which side changed what, so a region both
  sides changed is a conflict we can list with each version, and the rest merges. difflib
  gives two-way opcodes only; building the three-way merge on it would be our own merge
  algorithm to get right.
- Binary files (a NUL byte, as git decides) and anything too large to hold in memory stay at
  file level: the caller keeps the whole file and lists the conflict.

Pure functions on bytes, plus `store`, which puts a merged content into the object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_BYTES = 64 << 20  # larger versions are not merged in memory: file level
SHOWN_LINES = 20  # per side of a conflict in the record; the rest is counted


@dataclass
class Merged:
    content: bytes
    how: str  # "append" (byte ranges) or "lines"
    removed: int = 0  # for "append": the stretch's bytes taken out
    undone: int = 0  # for "lines": regions only the stretch changed, put back as before it
    hunks: list[dict[str, Any]] = field(default_factory=list)  # conflicting regions

    def info(self) -> dict[str, Any]:
        if self.how == "append":
            return {"how": "append", "removed_bytes": self.removed}
        return {"how": "lines", "undone_regions": self.undone, "conflicting_regions":
                len(self.hunks)}


def lines(data: bytes) -> list[bytes]:
    """Split after each "\\n" only (bytes.splitlines would also split at \\r, \\v, \\x1c...,
    which are data in a file, not line ends); joined, the pieces give `data` back exactly."""
    parts = data.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _text(chunk: list[bytes]) -> dict[str, Any]:
    shown = [line.decode("utf-8", "backslashreplace").rstrip("\n") for line in
             chunk[:SHOWN_LINES]]
    out: dict[str, Any] = {"lines": shown}
    if len(chunk) > SHOWN_LINES:
        out["more_lines"] = len(chunk) - SHOWN_LINES
    return out


def revert(before: bytes, end: bytes, current: bytes, prefer: str | None) -> Merged | None:
    """CURRENT without what the stretch (BEFORE -> END) did. None: a binary file, file level.
    A region both the stretch and a later epoch changed keeps its later version (or, with
    prefer="before", its version before the stretch) and is listed in `hunks`."""
    if end.startswith(before) and current.startswith(end):
        return Merged(before + current[len(end):], "append", removed=len(end) - len(before))
    if b"\0" in before or b"\0" in end or b"\0" in current:
        return None
    import merge3

    base, later, earlier = lines(end), lines(current), lines(before)
    out: list[bytes] = []
    merged = Merged(b"", "lines")
    # merge3's sides: a = the later epochs' version, b = the version before the stretch.
    regions: Any = merge3.Merge3(base, later, earlier).merge_regions()  # typed too narrowly
    for region in regions:
        kind = region[0]
        if kind == "unchanged":
            out += base[region[1]:region[2]]
        elif kind in ("a", "same"):
            out += later[region[1]:region[2]]
        elif kind == "b":  # only the stretch touched it: undo the stretch
            out += earlier[region[1]:region[2]]
            merged.undone += 1
        else:  # conflict: the stretch and a later epoch changed the same lines
            z0, z1, a0, a1, b0, b1 = region[1:7]
            kept = earlier[b0:b1] if prefer == "before" else later[a0:a1]
            merged.hunks.append({
                "line": len(out) + 1, "kept": "before" if prefer == "before" else "after",
                "before_stretch": _text(earlier[b0:b1]), "stretch": _text(base[z0:z1]),
                "later": _text(later[a0:a1])})
            out += kept
    merged.content = b"".join(out)
    return merged


DIFF_BYTES = 1 << 20  # `state diff` shows lines of text files up to this size
DIFF_LINES = 200  # ...and this many lines of the diff


def line_diff(before: bytes, after: bytes) -> list[str] | None:
    """The lines that changed, as a unified diff (for `state diff`); None for a binary file."""
    import difflib

    if b"\0" in before or b"\0" in after:
        return None
    text = lambda d: [x.decode("utf-8", "backslashreplace") for x in lines(d)]  # noqa: E731
    out = [line.rstrip("\n") for line in
           difflib.unified_diff(text(before), text(after), "before", "after", n=1)]
    return out[:DIFF_LINES] + ([f"... {len(out) - DIFF_LINES} more"] if len(out) > DIFF_LINES
                               else [])


def store(objects: Any, data: bytes) -> tuple[int, str, tuple[str, ...]]:
    """Stage `data` in the object store as the scanner would have stored it: (size, digest,
    chunks). The caller flushes before anything durable names the chunks."""
    import blake3

    from corral.recover.journal.fs import EMPTY
    from corral.recover.journal.store import CHUNK

    chunks = []
    for offset in range(0, len(data), CHUNK):
        piece = data[offset:offset + CHUNK]
        chunks.append(blake3.blake3(piece).hexdigest())
        objects.stage(chunks[-1], piece)
    if not chunks:
        return 0, EMPTY, ()
    digest = chunks[0] if len(chunks) == 1 else blake3.blake3(data).hexdigest()
    return len(data), digest, tuple(chunks)

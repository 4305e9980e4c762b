"""Paths inside an image, resolved on paper: the image is a list of entries (planned or read
from an installed base), not a tree to open, and its symlinks mean what they mean to the
service (an absolute target starts at the image's root, never the host's)."""

from __future__ import annotations

MAX_HOPS = 40  # as the kernel's MAXSYMLINKS: a loop ends instead of hanging


def resolve_in(path: str, links: dict[str, str]) -> str:
    """Where `path` leads inside an image whose symlinks are `links` (path -> link text).
    Never touches a file."""
    stack, resolved, hops = list(reversed(path.split("/"))), "", 0
    while stack:
        part = stack.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.rsplit("/", 1)[0]
            continue
        candidate = f"{resolved}/{part}"
        target = links.get(candidate)
        if target is None or hops >= MAX_HOPS:
            resolved = candidate
            continue
        hops += 1
        if target.startswith("/"):
            resolved = ""
        stack.extend(reversed(target.split("/")))
    return resolved or "/"

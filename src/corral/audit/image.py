"""`corral audit --image NAME`: the sharp objects inside a service's base image.

Shells, compilers, interpreters and network tools the processes do not execute, setuid/setgid
files, device nodes, world-writable paths, and (with learn data) files never used. The installed
base is read through `audit_walk` (no symlink followed); symlinks are then resolved on paper,
inside the image, the way the service would see them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from corral.audit.findings import Finding, sort_findings, tool_kind
from corral.core.imagepath import resolve_in
from corral.core.text import show

# -- a service's image ----------------------------------------------------------------------------

IMAGE_TOOL_SEVERITY = {"shell": "medium", "compiler": "high", "interpreter": "medium",
                       "network-tool": "medium"}


@dataclass(frozen=True)
class Entry:
    kind: str  # file, dir, symlink, chardev, blockdev, fifo, socket
    mode: int
    uid: int = 0
    target: str | None = None


def image_tree(root: str | os.PathLike) -> dict[str, Entry]:
    """Every entry of an installed base, read the hostile way (see audit_walk)."""
    from corral.audit.walk import Walker
    from corral.core.tree import KINDS

    entries: dict[str, Entry] = {}
    links: dict[bytes, bytes] = {}

    def visit(path: bytes, st: os.stat_result) -> None:
        entries[show(path)] = Entry(KINDS.get(stat.S_IFMT(st.st_mode), "?"),
                                    stat.S_IMODE(st.st_mode), st.st_uid)

    Walker(visit, links=links).walk(root, prefix=b"")
    for path, target in links.items():
        entries[show(path)] = Entry("symlink", 0o777, entries[show(path)].uid, show(target))
    return entries


def image_findings(entries: dict[str, Entry], needed: Iterable[str],
                   used: Iterable[str] | None = None) -> list[Finding]:
    """Sharp objects of one image. `needed`: what the processes execute (their exec lists and
    interpreters); `used`: every path the processes were seen using (learn data), or None."""
    links = {p: e.target for p, e in entries.items() if e.kind == "symlink" and e.target}
    needed_real = {resolve_in(p, links) for p in needed} | set(needed)
    aliases: dict[str, list[str]] = {}
    for path in links:
        aliases.setdefault(resolve_in(path, links), []).append(path)
    out: list[Finding] = []
    for path, entry in sorted(entries.items()):
        perms = {"mode": f"{entry.mode:04o}", "uid": entry.uid}
        if entry.kind in ("chardev", "blockdev"):
            out.append(Finding(f"image.device.{path}", "high", "device",
                               f"{entry.kind.replace('dev', ' device')} node", path, perms))
            continue
        if entry.kind == "file" and entry.mode & 0o6000:
            out.append(Finding(f"image.setuid.{path}", "high", "setuid", "setuid or setgid file "
                               "(install strips these bits: it was added later)", path, perms))
        if entry.kind == "dir" and entry.mode & 0o002 and not entry.mode & 0o1000:
            out.append(Finding(f"image.world-writable-dir.{path}", "high", "world-writable-dir",
                               "world-writable directory without the sticky bit", path, perms))
        elif entry.kind == "file" and entry.mode & 0o002:
            out.append(Finding(f"image.world-writable-file.{path}", "medium",
                               "world-writable-file", "world-writable file", path, perms))
        if entry.kind != "file" or not entry.mode & 0o111 or path in needed_real:
            continue
        names = [path] + sorted(aliases.get(path, []))
        kind = next((k for k in map(tool_kind, (n.rsplit("/", 1)[-1] for n in names)) if k), None)
        if kind:
            also = names[1:]
            out.append(Finding(f"image.{kind}.{path}", IMAGE_TOOL_SEVERITY[kind], kind,
                               f"{kind.replace('-', ' ')} the processes do not execute"
                               + (f" (also as {', '.join(also)})" if also else ""), path,
                               {"names": names}))
    if used is None:
        out.append(Finding("image.learn", "info", "learn", "no learn data: unused files cannot "
                           "be told apart", "learn.json"))
        return out
    used_real = {resolve_in(p, links) for p in used} | set(used) | needed_real
    unused = [p for p, e in sorted(entries.items()) if e.kind == "file" and p not in used_real]
    if unused:
        out.append(Finding("image.unused", "low", "unused", f"{len(unused)} files the processes "
                           "were never seen using", unused[0], {"count": len(unused),
                                                               "paths": unused[:200]}))
    return out


def learned_paths(state_dir: str | os.PathLike) -> list[str] | None:
    """The paths in the service's learn.json (any list of absolute paths in it), or None."""
    import json

    try:
        with open(os.path.join(state_dir, "learn.json"), "rb") as handle:
            data = json.loads(handle.read(64 << 20))
    except (OSError, ValueError):
        return None
    found: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, str) and node.startswith("/"):
            found.append(node)
        elif isinstance(node, list):
            for item in node:
                collect(item)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)

    collect(data)
    return found


def image_audit(service: str) -> dict[str, Any]:
    """The sharp objects in an installed service's current base."""
    from corral.supervise.control import spec_of

    spec = spec_of(service)
    needed = {p for paths in spec.exec_paths.values() for p in paths}
    for proc in spec.processes:
        needed |= set(proc.landlock.get("read_exec", ())) | {proc.command[0]}
    findings = image_findings(image_tree(spec.base_root), needed, learned_paths(spec.state))
    return {"service": service, "base_version": spec.base_version,
            "root": str(spec.base_root), "findings": sort_findings(findings)}


def plan_image_findings(plan: Any) -> list[Finding]:
    """The same checks on a plan's image (a manifest not installed yet): what install would
    copy. Setuid bits do not count there: install strips them."""
    entries = {e.path: Entry(e.kind, e.mode & 0o1777, 0, e.target)
               for e in list(plan.image.entries) + list(plan.image.added)}
    needed = {p for s in plan.sandbox for p in s.landlock.read_exec}
    return [f for f in image_findings(entries, needed, used=None) if f.kind != "learn"]

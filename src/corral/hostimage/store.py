"""The host images on disk: one directory per version, `current` naming the one the next boot
mounts, and `verify` of a version against its records.

A store is `images/` on the persistent disk of a host booted from an image
(/run/corral-host/persist/images), or any directory given with --store on a build machine. Each
version holds root.squashfs, the kernel and initramfs it was built with, image.json (its blake3,
size, inputs) and integrity.json (every entry of the root, as service bases record theirs).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from corral.core.errors import RuntimeFailure, UsageError
from corral.core.fsio import write_text
from corral.core.paths import corral_root
from corral.host.base import compare, snapshot

IMAGE = "root.squashfs"
META = "image.json"
INTEGRITY = "integrity.json"
CURRENT = "current"
CHUNK = 1 << 20


def host_run() -> Path:
    """Where the initramfs leaves the booted image's mounts (moved by CORRAL_ROOT for tests)."""
    return Path(corral_root(), "run/corral-host")


def default_store() -> Path:
    booted = host_run() / "persist/images"
    return booted if booted.is_dir() else Path(corral_root(), "var/lib/corral-host/images")


def versions(store: Path) -> list[int]:
    if not store.is_dir():
        return []
    return sorted(int(p.name) for p in store.iterdir()
                  if p.name.isdigit() and (p / META).is_file())


def current(store: Path) -> int | None:
    try:
        return int((store / CURRENT).read_text().strip())
    except (OSError, ValueError):
        return None


def booted() -> int | None:
    try:
        return int((host_run() / "version").read_text().strip())
    except (OSError, ValueError):
        return None


def meta(store: Path, version: int) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((store / str(version) / META).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"image {version}: {META} unreadable: {exc}") from None
    return data


def listing(store: Path) -> dict[str, Any]:
    cur, boot = current(store), booted()
    rows = []
    for version in versions(store):
        m = meta(store, version)
        rows.append({"version": version, "blake3": m.get("blake3"), "size": m.get("size"),
                     "created_at": m.get("created_at"), "kernel": m.get("kernel"),
                     "current": version == cur, "booted": version == boot})
    return {"store": str(store), "current": cur, "booted": boot, "images": rows}


def use(store: Path, version: int) -> dict[str, Any]:
    """Name the version the next boot mounts (a rollback is `use` of an older one). The file is
    replaced atomically: a crash leaves the old or the new version, never an empty name."""
    if version not in versions(store):
        have = ", ".join(map(str, versions(store))) or "none"
        raise UsageError(f"host image {version}: no such version in {store} (have: {have})")
    before = current(store)
    write_text(store / CURRENT, f"{version}\n")
    return {"store": str(store), "current": version, "previous": before,
            "kernel": meta(store, version).get("kernel")}


def file_hash(path: Path) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def verify(store: Path, version: int) -> dict[str, Any]:
    """The image file against its recorded blake3 (it lives on a writable disk), then every
    entry of its root against integrity.json: read from the mounted image when it is the one
    booted, else from a read-only loop mount made here and removed."""
    if version not in versions(store):
        raise UsageError(f"host image {version}: no such version in {store}")
    vdir = store / str(version)
    recorded = meta(store, version)
    problems: list[dict[str, Any]] = []
    digest = file_hash(vdir / IMAGE)
    if digest != recorded.get("blake3"):
        problems.append({"path": IMAGE, "change": "modified", "fields": ["blake3"],
                         "was": recorded.get("blake3"), "now": digest})
        return {"version": version, "entries": 0, "problems": problems}
    try:
        entries = json.loads((vdir / INTEGRITY).read_text())["entries"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeFailure(f"image {version}: {INTEGRITY} unreadable: {exc}") from None
    if booted() == version:
        problems += compare(entries, snapshot(host_run() / "image"))
    else:
        problems += compare(entries, _mounted_snapshot(vdir / IMAGE))
    return {"version": version, "entries": len(entries), "problems": problems}


def _mounted_snapshot(image: Path) -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0:
        raise RuntimeFailure("verify mounts the image read-only: run as root")
    with tempfile.TemporaryDirectory(prefix="corral-verify-") as mnt:
        done = subprocess.run(["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid,loop",
                               str(image), mnt], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeFailure(f"cannot mount {image}: {done.stderr.strip()}")
        try:
            return snapshot(Path(mnt))
        finally:
            subprocess.run(["umount", mnt], check=False)

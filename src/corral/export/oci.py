"""`corral export oci NAME`: the service's current base image as a tar archive of its root,
which `podman import` (or `docker import`) turns into an image. Only an installed service has a
base; its files keep their numeric owners and modes (the users' uids are in its /etc/passwd)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from corral.core.errors import UsageError
from corral.export.source import Source


def archive_name(src: Source) -> str:
    return f"corral-{src.manifest.name}-{src.base_version}.tar"


def write_archive(src: Source, directory: Path) -> Path:
    root = src.base_root
    if not src.installed or not root.is_dir():
        raise UsageError(f"{src.manifest.name}: no base image here (run `corral install` first)")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / archive_name(src)
    partial = target.with_name(target.name + ".partial")
    # Symlinks are stored as links (tarfile never follows them), so an image's link cannot pull
    # a host file into the archive; names are relative to the image's root.
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name, recursive=True)
    partial.rename(target)
    return target

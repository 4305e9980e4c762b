"""The files corral adds to a host image, prepared in a directory that the build copies over
the Debian root: corral itself, the services' manifests, the host file's firewall part, the
boot pieces (initramfs hook and script, systemd units) and the image's own settings."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from corral.core.errors import RuntimeFailure
from corral.manifest import tomlfile
from corral.manifest.hostfile import HostFile
from corral.manifest.model import load_manifest

# Debian puts /usr/local/lib/pythonX.Y/dist-packages on python3's path: corral and its
# dependencies go there, so Debian's own python3 runs it with no virtual environment.
SITE = "usr/local/lib/python{}.{}/dist-packages"
CONF = "etc/corral/host"
UNITS = ("corral-host-firewall.service", "corral-services.service")
REQUIREMENT = re.compile(r"^[A-Za-z0-9_.-]+")


def _asset(name: str) -> bytes:
    return resources.files("corral.hostimage").joinpath("boot", name).read_bytes()


def _put(root: Path, relpath: str, data: bytes, mode: int = 0o644) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _distributions(name: str, seen: set[str]) -> None:
    """The installed distribution `name` and, recursively, what it requires (extras skipped)."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    dist = importlib.metadata.distribution(name)
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        match = REQUIREMENT.match(req)
        if match:
            _distributions(match.group(0), seen)


def copy_corral(root: Path) -> str:
    """corral's package and its dependencies as this interpreter has them installed. They are
    pure Python or built for this CPython, so the image's python3 must be the same X.Y
    (checked by the build once Debian's root exists)."""
    import corral

    site = root / SITE.format(*sys.version_info[:2])
    site.mkdir(parents=True, exist_ok=True)
    package = Path(corral.__file__).parent
    shutil.copytree(package, site / "corral", ignore=shutil.ignore_patterns("__pycache__"))
    names: set[str] = set()
    _distributions("corral", names)
    names.discard("corral")
    for name in sorted(names):
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            src = Path(str(dist.locate_file(file)))
            if "__pycache__" in file.parts or file.parts[0] == ".." or not src.is_file():
                continue
            dest = site / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    return site.relative_to(root).as_posix()


def _copy_service(root: Path, host_dir: str, rel: str, index: int) -> tuple[str, str]:
    """A service's manifest directory (its `image.add` sources are relative to it), copied
    without following symlinks; returns its name and its manifest's path in the image."""
    manifest = os.path.join(host_dir, rel)
    name = load_manifest(manifest).name
    dest = root / "etc/corral/services" / name
    if dest.exists():
        raise RuntimeFailure(f"image.services[{index}]: service {name} is listed twice")
    shutil.copytree(os.path.dirname(os.path.abspath(manifest)), dest, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return name, f"/etc/corral/services/{name}/{os.path.basename(manifest)}"


def _copy_path(root: Path, host_dir: str, dest: str, source: str) -> None:
    src = os.path.join(host_dir, source)
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(src, target, follow_symlinks=False)


def prepare(root: Path, host_file: str, host: HostFile) -> dict[str, Any]:
    """Fill `root` (an empty directory) with corral's part of the image."""
    assert host.image is not None
    image = host.image
    host_dir = os.path.dirname(os.path.abspath(host_file))
    site = copy_corral(root)
    _put(root, "usr/local/sbin/corral",
         b"#!/usr/bin/python3\nfrom corral.cli.entry import main\n\nmain()\n", 0o755)
    _put(root, "usr/local/sbin/corral-host-boot", _asset("corral-host-boot"), 0o755)
    _put(root, "etc/initramfs-tools/scripts/corral", _asset("initramfs-script"))
    _put(root, "etc/initramfs-tools/hooks/corral", _asset("initramfs-hook"), 0o755)
    for unit in UNITS:
        _put(root, f"etc/systemd/system/{unit}", _asset(unit))
    services = [_copy_service(root, host_dir, rel, i) for i, rel in enumerate(image.services)]
    # The host file without [image]: inside the image it is the firewall's input only.
    data = {k: v for k, v in tomlfile.load(host_file).items() if k != "image"}
    import tomlkit

    _put(root, f"{CONF}/host.toml", tomlkit.dumps(data).encode())
    _put(root, f"{CONF}/services", "".join(f"{n} {p}\n" for n, p in services).encode())
    # Each service's volumes (and the images of those with a `size`) and journal persist; its
    # users, base and tables are made again at every boot, in RAM, from the manifest in the
    # image (and a start mounts the sized volumes' images again).
    persist = list(image.persist) + [f"/var/lib/corral/{n}/{d}" for n, _ in services
                                     for d in ("volumes", "volume-images", "journal")]
    _put(root, f"{CONF}/persist", "".join(f"{p}\n" for p in persist).encode())
    _put(root, f"{CONF}/delta_size", f"{image.delta_size}\n".encode())
    _put(root, "etc/hostname", b"corral-host\n")
    for dest, source in image.paths.items():
        _copy_path(root, host_dir, dest, source)
    return {"site": site, "services": [n for n, _ in services], "persist": persist}

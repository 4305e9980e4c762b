"""`corral host image build`: a Debian root made by mmdebstrap, corral's part copied over it,
sealed (integrity.json), squashed read-only and stored as the next version, content-addressed
by the blake3 of the squashfs file.

Everything happens in a hidden directory inside the store, removed on success and on failure:
the build never touches the machine it runs on beyond that directory (mmdebstrap's root mode
chroots into it, with its own /proc and /dev mounts, and undoes them).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.core.errors import RuntimeFailure, UsageError
from corral.core.fsio import write_json
from corral.host.base import snapshot
from corral.hostimage import stage, store
from corral.manifest.hostfile import load_host_file

# What corral itself needs on the host, beyond what the host file lists: its interpreter, the
# kernel interfaces it drives (nft, seccomp, useradd, mount; mkfs.ext4, e2fsck and resize2fs
# for the file systems of sized volumes and disk deltas; mkfs.erofs for the bases' read-only
# images) and the boot (systemd, the initramfs
# with busybox for the loop mount).
REQUIRED = ("python3", "nftables", "libseccomp2", "passwd", "util-linux", "mount", "iproute2",
            "kmod", "e2fsprogs", "erofs-utils", "systemd-sysv", "initramfs-tools", "busybox")
# Documentation is not a tool: leaving it out shrinks the image by a tenth.
EXCLUDE = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
TOOLS = {"mmdebstrap": "mmdebstrap", "mksquashfs": "squashfs-tools"}


def _check_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise RuntimeFailure(f"host image build needs {', '.join(missing)}: "
                             f"apt-get install {' '.join(missing)}")


def _run(argv: list[str], what: str, log: Path) -> None:
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeFailure(f"{what} failed (exit {done.returncode}); the end of its log:\n"
                             + "\n".join(tail))


def packages(host_packages: list[str]) -> list[str]:
    return sorted(set(REQUIRED) | set(host_packages))


def debootstrap_argv(host: Any, target: Path, overlay: Path) -> list[str]:
    image = host.image
    argv = ["mmdebstrap", "--mode=root", "--variant=essential",
            "--include=" + ",".join(packages(image.packages))]
    # dpkg reads these in order: the copyrights are included again after the exclusions.
    argv += [f"--dpkgopt=path-exclude={p}" for p in EXCLUDE]
    argv += ["--dpkgopt=path-include=/usr/share/doc/*/copyright"]
    # corral's files go in before the remaining packages install, so the kernel's postinst
    # builds the initramfs with corral's hook in it (one mkinitramfs, not two).
    argv += [f"--essential-hook=sync-in {overlay} /",
             "--customize-hook=chroot \"$1\" systemctl enable "
             + " ".join(stage.UNITS) + " systemd-networkd.service",
             image.suite, str(target), image.mirror]
    return argv


def _kernel(root: Path, vdir: Path) -> str:
    kernels = sorted(glob.glob(str(root / "boot/vmlinuz-*")))
    if not kernels:
        raise RuntimeFailure("the image has no kernel in /boot (is a linux-image-* listed?)")
    release = os.path.basename(kernels[-1]).removeprefix("vmlinuz-")
    initrd = root / f"boot/initrd.img-{release}"
    if not initrd.is_file():
        raise RuntimeFailure(f"no initramfs for kernel {release} in the image")
    # The bootloader (or qemu) loads these two; the image itself needs no /boot.
    shutil.copy2(kernels[-1], vdir / "vmlinuz")
    shutil.copy2(initrd, vdir / "initrd.img")
    for entry in (root / "boot").iterdir():
        entry.unlink()
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        if (root / link).is_symlink():
            (root / link).unlink()
    return release


Inspect = Callable[[Path], dict[str, Any]]


def build(host_file: str, store_dir: Path, say: Callable[[str], None] = lambda _m: None,
          inspect: Inspect | None = None) -> dict[str, Any]:
    """Build the next version; `inspect` (the CLI's audit, a layer above) sees the finished
    root before it is squashed, and what it returns is kept in image.json."""
    host = load_host_file(host_file)
    if host.image is None:
        raise UsageError(f"{host_file}: image: no [image] table (docs/host-image.md)")
    if os.geteuid() != 0:
        raise RuntimeFailure("host image build runs mmdebstrap as root: run as root")
    _check_tools()
    store_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=store_dir))
    try:
        return _build(host_file, host, store_dir, work, started, say, inspect)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(host_file: str, host: Any, store_dir: Path, work: Path, started: float,
           say: Callable[[str], None], inspect: Inspect | None) -> dict[str, Any]:
    overlay, root, vdir = work / "overlay", work / "root", work / "version"
    overlay.mkdir()
    vdir.mkdir()
    log = work / "build.log"
    added = stage.prepare(overlay, host_file, host)
    say(f"debootstrap: {len(packages(host.image.packages))} packages from {host.image.mirror}")
    _run(debootstrap_argv(host, root, overlay), "mmdebstrap", log)
    python = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if not (root / "usr/bin" / python).exists():
        raise RuntimeFailure(f"the image has no {python}: corral was copied from a {python} "
                             f"environment; build from the suite's own Python version")
    (root / "etc/hostname").write_text("corral-host\n")
    release = _kernel(root, vdir)
    say("sealing: blake3 of every file")
    entries = snapshot(root)
    write_json(vdir / store.INTEGRITY, {"hash": "blake3", "entries": entries})
    audit = inspect(root) if inspect is not None else None
    say("squashfs")
    _run(["mksquashfs", str(root), str(vdir / store.IMAGE), "-comp", "zstd",
          "-Xcompression-level", "9", "-noappend", "-quiet", "-no-progress"], "mksquashfs", log)
    digest = store.file_hash(vdir / store.IMAGE)
    for version in store.versions(store_dir):
        if store.meta(store_dir, version).get("blake3") == digest:
            return {"version": version, "new": False, "blake3": digest,
                    "store": str(store_dir), "audit": audit}
    version = max(store.versions(store_dir), default=0) + 1
    meta = {"version": version, "blake3": digest,
            "size": (vdir / store.IMAGE).stat().st_size,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host_file": os.path.abspath(host_file), "suite": host.image.suite,
            "packages": packages(host.image.packages), "kernel": release,
            "services": added["services"], "persist": added["persist"],
            "delta_size": host.image.delta_size, "entries": len(entries),
            "build_seconds": round(time.monotonic() - started, 1), "audit": audit}
    write_json(vdir / store.META, meta)
    os.rename(vdir, store_dir / str(version))
    if store.current(store_dir) is None:
        store.use(store_dir, version)
    return meta | {"new": True, "store": str(store_dir)}

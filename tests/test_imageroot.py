"""launch.imageroot and host.baseimage on the real kernel: the root is the base's erofs image,
read-only, with an overlay of the delta only on the writable paths (a bind mount of the delta's
directory where the image's is empty); the delta's layout is the one a whole-root overlay gives.
Mounts are made in a forked child's own mount namespace."""

from __future__ import annotations

import json
import os
import stat
import traceback
from pathlib import Path

import pytest

from corral.host import baseimage
from corral.kernel import syscalls as kernel
from corral.launch import imageroot, mnt

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _base(tmp_path: Path) -> Path:
    """A sealed-like version directory: root/ with /tmp (1777), /etc, /var/lib/app (owned by
    uid 4242), a file /etc/app.conf, and /var/run -> /run."""
    version = tmp_path / "base" / "1"
    root = version / "root"
    for d in ("tmp", "etc", "var/lib/app", "run", "srv/vol", "dev", "proc"):
        (root / d).mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "var/lib/app", 4242, 4242)
    os.chmod(root / "var/lib/app", 0o750)
    (root / "etc/app.conf").write_text("base\n")
    (root / "var/lib/app/state").write_text("base state\n")
    os.symlink("/run", root / "var/run")
    assert baseimage.build(version) is None, "mkfs.erofs (erofs-utils) is needed"
    return version


def _in_namespace(fn) -> dict:
    """Run fn() in a forked child with a private mount namespace; its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            mnt.private_namespace()
            out = {"ok": fn()}
        except BaseException:  # noqa: BLE001 (reported to the parent, which fails)
            out = {"error": traceback.format_exc()}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result.get("error")
    return result["ok"]


def test_writable_tops(tmp_path):
    version = _base(tmp_path)
    fd = os.open(version / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        tops = imageroot.writable_tops(
            fd, ("/tmp", "/tmp/sub", "/dev", "/srv/vol", "/srv/vol/x", "/var/lib/app",
                 "/etc/app.conf", "/nowhere"), ("/srv/vol",))
        assert tops == ["/etc", "/tmp", "/var/lib/app"]  # a file: its directory
        assert imageroot.writable_tops(fd, ("/tmp", "/var/run/x"), ()) is None  # a symlink
        assert imageroot.writable_tops(fd, ("/",), ()) is None
    finally:
        os.close(fd)


def test_image_root_writes_land_in_the_delta_and_nowhere_else(tmp_path):
    version = _base(tmp_path)
    delta, root = tmp_path / "delta", tmp_path / "mnt"
    for d in (delta / "upper", delta / "work", root):
        d.mkdir(parents=True)

    def inside():
        why = imageroot.mount(str(root), str(baseimage.image_of(version)), str(delta),
                              ("/tmp", "/var/lib/app"), ())
        assert why is None, why
        (root / "tmp/new").write_text("written")
        (root / "var/lib/app/state").write_text("changed")  # a base file: copied up
        try:
            (root / "etc/app.conf").write_text("trojan")
            etc = "written"
        except OSError as exc:
            etc = exc.errno
        fstypes = {line.split()[4]: line.partition(" - ")[2].split()[0]
                   for line in open("/proc/self/mountinfo")}
        return {"etc": etc, "root": fstypes[str(root)], "tmp": fstypes[str(root / "tmp")],
                "app": fstypes[str(root / "var/lib/app")],
                "read": (root / "etc/app.conf").read_text()}

    seen = _in_namespace(inside)
    # The delta here is a plain directory, no file system of its own: a bind of its upper/tmp
    # would show the host's path of it, so even the image's empty /tmp stays an overlay.
    assert seen == {"etc": 30, "root": "erofs", "tmp": "overlay", "app": "overlay",  # EROFS
                    "read": "base\n"}
    upper = delta / "upper"
    assert (upper / "tmp/new").read_text() == "written"
    assert (upper / "var/lib/app/state").read_text() == "changed"
    assert not (upper / "etc").exists()
    # The delta's directories are the image's (owner, mode): a whole-root overlay's layout.
    for rel, mode, uid in (("tmp", 0o1777, 0), ("var", 0o755, 0), ("var/lib/app", 0o750, 4242)):
        st = os.stat(upper / rel)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, uid), rel
    assert (version / "root/var/lib/app/state").read_text() == "base state\n"  # base intact


def _mountinfo(path: Path) -> list[dict[str, object]]:
    """The mounts at `path`, bottom first: fstype, source, root, per-mount options."""
    out = []
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        fields = left.split()
        if fields[4] == str(path):
            fstype, source = right.split()[:2]
            out.append({"fstype": fstype, "source": source, "root": fields[3],
                        "options": sorted(fields[5].split(","))})
    return out


def test_an_empty_writable_directory_of_the_image_is_a_bind_of_the_delta(tmp_path):
    """On the tmpfs delta (its own file system, as mnt.mount_delta makes it), the image's empty
    /tmp is a bind mount of the delta's upper/tmp, no overlay: nosuid, nodev and noexec on the
    mount itself (no second mount on it), writes land in upper/tmp as with an overlay, the
    directory has the image's owner and mode, and mountinfo names only the delta's own path
    (/upper/tmp), no host path. /var/lib/app, which holds a base file, stays an overlay; /etc
    stays the read-only image."""
    version = _base(tmp_path)
    delta, root = tmp_path / "delta", tmp_path / "mnt"
    root.mkdir()

    def inside():
        mnt.mount_delta(str(delta), "tmpfs", 16 << 20)
        warnings = mnt.prepare_service_root(
            str(root), str(version / "root"), str(delta), [], ("/tmp",),
            ("/tmp", "/var/lib/app"), str(baseimage.image_of(version)))
        (root / "tmp/new").write_text("written")
        os.mkdir(root / "tmp/sub")
        (root / "tmp/sub/deeper").write_text("deeper")
        (root / "var/lib/app/state").write_text("changed")  # copied up by the overlay
        st = os.stat(root / "tmp")
        try:
            os.rename(root / "tmp/new", root / "var/lib/app/moved")
            rename = "done"
        except OSError as exc:
            rename = exc.errno
        upper = delta / "upper"
        # What the service would see: the lines of the mounts in its root, but the mount point
        # (which, pivoted, is its own path).
        seen_lines = [" ".join(f for i, f in enumerate(line.split()) if i != 4)
                      for line in open("/proc/self/mountinfo")
                      if (line.split()[4] + "/").startswith(f"{root}/")]
        return {"warnings": warnings, "tmp": _mountinfo(root / "tmp"),
                "app": [m["fstype"] for m in _mountinfo(root / "var/lib/app")],
                "etc": [m["fstype"] for m in _mountinfo(root)],
                "mode": [stat.S_IMODE(st.st_mode), st.st_uid],
                "upper": {rel: (upper / rel).read_text()
                          for rel in ("tmp/new", "tmp/sub/deeper", "var/lib/app/state")},
                "work": sorted(os.listdir(delta / "work")), "rename": rename,
                "leaks": [line for line in seen_lines if str(tmp_path) in line]}

    seen = _in_namespace(inside)
    assert seen["warnings"] == []
    assert seen["tmp"] == [{"fstype": "tmpfs", "source": "corral-delta", "root": "/upper/tmp",
                            "options": ["nodev", "noexec", "nosuid", "relatime", "rw"]}]
    assert seen["app"] == ["overlay"] and seen["etc"] == ["erofs"]
    assert seen["mode"] == [0o1777, 0]
    assert seen["upper"] == {"tmp/new": "written", "tmp/sub/deeper": "deeper",
                             "var/lib/app/state": "changed"}
    assert seen["work"] == ["path-var%2Flib%2Fapp"]  # the overlay's only: a bind needs none
    assert seen["rename"] == 18  # EXDEV: two mounts, as between two overlays
    assert seen["leaks"] == []


def test_a_disk_delta_is_bound_too_and_keeps_what_was_written(tmp_path):
    """delta = "disk" (an ext4 image on a loop device, host.loopfs): /tmp is a bind of its
    upper/tmp, named in mountinfo by the loop device and /upper/tmp only; what was written
    there is still there when the root is mounted again (a restart keeps a disk delta). The
    loop device goes with the namespace that mounted it."""
    import subprocess
    import time

    version = _base(tmp_path)
    delta, root = tmp_path / "delta", tmp_path / "mnt"
    root.mkdir()
    image = str(baseimage.image_of(version))

    def inside():
        mnt.mount_delta(str(delta), "disk", 32 << 20)
        mnt.prepare_service_root(str(root), str(version / "root"), str(delta), [], ("/tmp",),
                                 ("/tmp",), image)
        (root / "tmp/kept").write_text("kept")
        first = _mountinfo(root / "tmp")
        # A disk delta stays mounted across a restart; the root is made again over it.
        kernel.umount2(str(root), kernel.MNT_DETACH)
        mnt.prepare_service_root(str(root), str(version / "root"), str(delta), [], ("/tmp",),
                                 ("/tmp",), image)
        return {"first": first, "again": (root / "tmp/kept").read_text(),
                "upper": (delta / "upper/tmp/kept").read_text()}

    seen = _in_namespace(inside)
    [mount] = seen["first"]
    assert (mount["fstype"], mount["root"]) == ("ext4", "/upper/tmp")
    assert str(mount["source"]).startswith("/dev/loop")
    assert {"nosuid", "nodev", "noexec"} <= set(mount["options"])
    assert seen["again"] == seen["upper"] == "kept"
    backing = str(delta) + ".img"
    deadline = time.monotonic() + 30
    while subprocess.run(["losetup", "-j", backing], capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, "the delta's loop device stayed attached"
        time.sleep(0.1)


def test_a_writable_path_with_base_files_or_not_empty_stays_an_overlay(tmp_path):
    """Only a plain empty directory of the image is bound: one holding anything (here a single
    empty directory) keeps its overlay, and what the service removes there is a whiteout."""
    version = tmp_path / "base" / "1"
    for d in ("tmp/keep", "run", "etc", "dev", "proc"):
        (version / "root" / d).mkdir(parents=True)
    assert baseimage.build(version) is None
    delta, root = tmp_path / "delta", tmp_path / "mnt"
    root.mkdir()

    def inside():
        mnt.mount_delta(str(delta), "tmpfs", 16 << 20)
        mnt.prepare_service_root(str(root), str(version / "root"), str(delta), [], ("/tmp",),
                                 ("/tmp", "/run"), str(baseimage.image_of(version)))
        os.rmdir(root / "tmp/keep")
        st = os.stat(delta / "upper/tmp/keep", follow_symlinks=False)
        return {"tmp": [m["fstype"] for m in _mountinfo(root / "tmp")],
                "run": [m["fstype"] for m in _mountinfo(root / "run")],
                "whiteout": stat.S_ISCHR(st.st_mode) and st.st_rdev == 0}

    assert _in_namespace(inside) == {"tmp": ["overlay"], "run": ["tmpfs"], "whiteout": True}


def test_a_root_that_cannot_use_the_image_is_one_overlay(tmp_path):
    """A writable path through a symlink of the image: nothing stays mounted, and
    prepare_service_root falls back to one overlay on the whole base, saying why."""
    version = _base(tmp_path)
    delta, root = tmp_path / "delta", tmp_path / "mnt"
    for d in (delta / "upper", delta / "work"):
        d.mkdir(parents=True)

    def inside():
        warnings = mnt.prepare_service_root(
            str(root), str(version / "root"), str(delta), [], ("/tmp",), ("/tmp", "/var/run/x"),
            str(baseimage.image_of(version)))
        mounts = [line.partition(" - ")[2].split()[0] for line in open("/proc/self/mountinfo")
                  if line.split()[4] == str(root)]
        (root / "etc/app.conf").write_text("into the delta")  # root may write the overlay
        return {"warnings": warnings, "mounts": mounts}

    seen = _in_namespace(inside)
    assert seen["mounts"] == ["overlay"]
    assert any("symlink" in w for w in seen["warnings"])
    assert (delta / "upper/etc/app.conf").read_text() == "into the delta"


def test_a_kernel_without_file_backed_erofs_mounts_the_image_through_a_loop_device(tmp_path):
    """Debian 12's 6.1 has no file-backed erofs: mount(8)'s loop device, read-only, detached by
    itself once the namespace that mounted it is gone."""
    import subprocess
    import time

    version = _base(tmp_path)
    root = tmp_path / "mnt"
    root.mkdir()
    image = str(baseimage.image_of(version))

    def inside():
        assert imageroot.mount_image(image, str(root), from_file=False) is None
        line = [ln for ln in open("/proc/self/mountinfo") if ln.split()[4] == str(root)][0]
        fstype, source, options = line.partition(" - ")[2].split()[:3]
        return {"fstype": fstype, "loop": source.startswith("/dev/loop"),
                "ro": "ro" in options.split(","), "read": (root / "etc/app.conf").read_text()}

    assert _in_namespace(inside) == {"fstype": "erofs", "loop": True, "ro": True,
                                     "read": "base\n"}
    deadline = time.monotonic() + 30
    while subprocess.run(["losetup", "-j", image], capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, "the loop device stayed attached"
        time.sleep(0.1)

"""core.mountinfo: one reader of /proc/self/mountinfo for every caller."""

from __future__ import annotations

import os

from corral.core import mountinfo

TEXT = (
    "22 1 0:21 / / ro,relatime shared:1 - erofs /dev/loop3 ro,user_xattr\n"
    "23 22 0:22 /upper/tmp /tmp rw,nosuid,nodev - tmpfs corral-delta rw,size=65536k\n"
    "24 22 0:23 / /srv/my\\040www rw,relatime - ext4 /dev/vdb rw\n"
    "25 24 0:23 /a /srv/my\\040www/ro\\134dir ro,relatime - ext4 /dev/vdb rw\n"
    "26 22 0:24 / /usr rw,relatime master:3 - squashfs /dev/loop4 ro\n"
    "not a mountinfo line\n"
)


def test_paths_are_unescaped_and_read_only_is_the_mount_or_its_super_block():
    mounts = mountinfo.parse(TEXT)
    assert [m.point for m in mounts] == ["/", "/tmp", "/srv/my www", "/srv/my www/ro\\dir",
                                         "/usr"]
    assert [m.read_only for m in mounts] == [True, False, False, True, True]
    assert mounts[1].root == "/upper/tmp" and mounts[1].source == "corral-delta"
    assert mounts[0].super_options == ("ro", "user_xattr") and mounts[0].fstype == "erofs"
    assert (mounts[2].mount_id, mounts[2].parent_id) == (24, 22)
    assert mounts[2].dev == os.makedev(0, 23) and mounts[0].dev == os.makedev(0, 21)


def test_at_is_the_mount_on_top():
    mounts = mountinfo.parse(TEXT + "27 23 0:25 / /tmp rw - tmpfs other rw\n")
    assert mountinfo.at(mounts, "/tmp").source == "other"  # mounted over the first
    assert mountinfo.at(mounts, "/srv") is None


def test_this_process_has_a_root_mount():
    mounts = mountinfo.read()
    assert any(m.point == "/" for m in mounts)
    assert all(os.path.isabs(m.point) for m in mounts)
    root = mountinfo.at(mounts, "/")
    assert root is not None and root.dev == os.stat("/").st_dev

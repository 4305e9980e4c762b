"""The one walker of hostile trees (core.tree.walk and remove): iterative, depth-bounded,
descriptor-bounded, never following a symlink, and loud: an error raises, never a silently
missing subtree. Plain directories under tmp_path; no root needed except where said."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from corral.core import tree


@pytest.fixture(autouse=True)
def _clean(tmp_path):
    """pytest's own clean-up of old temporary directories recurses: remove deep trees here."""
    yield
    with tree.directory(str(tmp_path)) as fd:
        for name in os.listdir(fd):
            tree.remove(fd, name)


def nest(top, levels: int, name: str = "d") -> bytes:
    """`levels` nested directories below `top` (os.makedirs would recurse as deep); returns the
    path of the deepest below `top`, as the walk spells it."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("payload", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return (b"/" + name.encode()) * levels


def paths(root, **kwargs) -> list[bytes]:
    with tree.directory(str(root)) as fd:
        return [e.path for e in tree.walk(fd, **kwargs)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_walks_parents_first_sorted_and_never_follows_a_symlink(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b/file").write_text("x")
    (tmp_path / "a").write_text("y")
    (tmp_path / "b/out").symlink_to("/etc")  # a directory elsewhere: never entered
    (tmp_path / "b/loop").symlink_to("..")
    assert paths(tmp_path) == [b"/a", b"/b", b"/b/file", b"/b/loop", b"/b/out"]


def test_depth_bound_raises_and_can_be_reported_instead(tmp_path):
    deepest = nest(tmp_path, tree.MAX_DEPTH + 1)
    before = open_fds()
    with pytest.raises(tree.TooDeep) as raised:
        paths(tmp_path)
    assert raised.value.path == deepest  # the first directory not entered
    assert open_fds() == before  # nothing left open by the raise
    too_deep: list[bytes] = []
    walked = paths(tmp_path, on_too_deep=lambda e: too_deep.append(e.path))
    assert too_deep == [deepest] and walked[-1] == deepest
    assert len(walked) == tree.MAX_DEPTH + 1
    tree_at_bound = tmp_path / "exact"
    tree_at_bound.mkdir()
    nest(tree_at_bound, tree.MAX_DEPTH)  # entries exactly at the bound: walked whole
    assert paths(tree_at_bound)[-1].endswith(b"/payload")


def test_descriptors_stay_bounded_however_deep(tmp_path):
    nest(tmp_path, 390)
    (tmp_path / "d" / "d" / "side").write_text("a file visited after the deep branch")
    with tree.directory(str(tmp_path)) as fd:
        before, most, seen = open_fds(), 0, []
        for entry in tree.walk(fd, base_fd=fd):  # both trees: twice the window at most
            most = max(most, open_fds() - before)
            seen.append(entry.path)
        assert open_fds() == before
    assert most <= 2 * tree.FD_WINDOW + 2  # + listdir's own descriptor, for a moment
    assert b"/d/d/side" in seen and seen[-1] == b"/d/d/side"  # reopened after the window


def test_errors_raise_instead_of_skipping(tmp_path):
    """RLIMIT_NOFILE so low that a directory cannot be opened: a WalkError, not a shorter
    walk. In a child, so the limit is its own."""
    nest(tmp_path, 40)
    code = f"""
import resource, sys
from corral.core import tree
fd = tree.os.open({str(tmp_path)!r}, tree.DIR_FLAGS)
used = len(tree.os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE,
                   (used + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    n = sum(1 for _ in tree.walk(fd))
except tree.WalkError as exc:
    print("raised", exc)
    sys.exit(0)
print("walked", n)
sys.exit(1)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Too many open files" in run.stdout


def test_a_vanished_entry_is_not_an_error(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with tree.directory(str(tmp_path)) as fd:
        seen = []
        for entry in tree.walk(fd):
            seen.append(entry.path)
            if entry.path == b"/a":
                os.rmdir(tmp_path / "b")  # listed already, gone before it is reached
    assert seen == [b"/a", b"/c"]


def test_pruning_and_the_base_in_parallel(tmp_path):
    upper, base = tmp_path / "upper", tmp_path / "base"
    for top in (upper, base):
        (top / "etc").mkdir(parents=True)
    (base / "etc/passwd").write_text("root")
    (upper / "etc/passwd").write_text("evil")
    (upper / "etc/new").write_text("new")
    (upper / "skip").mkdir()
    (upper / "skip/inner").write_text("x")
    with tree.directory(str(upper)) as ufd, tree.directory(str(base)) as bfd:
        found = {}
        for entry in tree.walk(ufd, base_fd=bfd):
            found[entry.path] = entry.base_st is not None
            if entry.path == b"/skip":
                entry.enter = False
    assert found == {b"/etc": True, b"/etc/new": False, b"/etc/passwd": True, b"/skip": False}


def test_remove_goes_deeper_than_the_walk_and_python_would(tmp_path):
    (tmp_path / "top").mkdir()
    nest(tmp_path / "top", 1200)
    (tmp_path / "top/link").symlink_to(tmp_path / "keep")  # removed as a link, not followed
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep/precious").write_text("stays")
    with tree.directory(str(tmp_path)) as fd:
        tree.remove(fd, "top")
        tree.remove(fd, "top")  # already gone: fine
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    assert (tmp_path / "keep/precious").read_text() == "stays"


def test_a_sparse_file_hashes_as_its_dense_twin(tmp_path):
    """The hash is the content's, whatever the allocation: mksquashfs, cp --sparse and overlay
    copy-ups turn zero blocks into holes, and a base verified against its own image must agree
    (the boot test's `host image verify` found three such files)."""
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    content = b"head" + bytes(3 << 20) + b"tail"
    dense.write_bytes(content)
    with open(sparse, "wb") as handle:
        handle.write(b"head")
        handle.seek(len(content) - 4)
        handle.write(b"tail")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(tree.extents(fd_of := os.open(sparse, os.O_RDONLY), len(content))) > 1
        os.close(fd_of)
        assert tree.hash_and_magic(fd, b"dense")[0] == tree.hash_and_magic(fd, b"sparse")[0]
    finally:
        os.close(fd)

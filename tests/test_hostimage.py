"""The host image's commands without a boot (the boot is tests/test_hostimage_boot.py): the
host file's [image] table, the store (list, use, verify against a real squashfs) and
`corral host delta` over a delta laid out as the initramfs leaves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.core.fsio import write_json
from corral.host.base import snapshot
from corral.hostimage.store import file_hash

CORRAL = [sys.executable, "-m", "corral.cli.entry"]
NOTES = Path(__file__).parent.parent / "examples/notes/notes.toml"


def corral(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CORRAL, *args], capture_output=True, text=True,
                          env=os.environ | (env or {}))


def host_file(tmp_path: Path, image: str) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(f'role = "server"\n[image]\n{image}\n')
    return path


@pytest.mark.parametrize("image, message", [
    ('packages = ["python3"]', "image.packages: the image boots its own kernel"),
    ('packages = ["linux-image-amd64", "Bad Name"]', "not a Debian package name"),
    ('packages = ["linux-image-amd64"]\npersist = ["/usr/lib"]', "image.persist[0]"),
    ('packages = ["linux-image-amd64"]\npaths = { "/etc/x" = "missing" }',
     'image.paths."/etc/x": "missing": no such file'),
    ('packages = ["linux-image-amd64"]\nservices = ["nope.toml"]', "image.services[0]"),
    ('packages = ["linux-image-amd64"]\ndelta_size = "1M"', "image.delta_size"),
    ('packages = ["linux-image-amd64"]\nmirror = "ftp://x"', "image.mirror"),
])
def test_bad_image_table_exits_2(tmp_path: Path, image: str, message: str) -> None:
    done = corral("check", str(host_file(tmp_path, image)))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_good_image_table(tmp_path: Path) -> None:
    shutil.copytree(NOTES.parent, tmp_path / "notes")
    path = host_file(tmp_path, 'packages = ["linux-image-amd64"]\n'
                               'services = ["notes/notes.toml"]\npersist = ["/var/log"]')
    assert corral("check", str(path)).returncode == 0


def _version(store: Path, n: int, tree: Path) -> None:
    vdir = store / str(n)
    vdir.mkdir(parents=True)
    subprocess.run(["mksquashfs", str(tree), str(vdir / "root.squashfs"), "-noappend",
                    "-quiet", "-no-progress"], check=True, capture_output=True)
    write_json(vdir / "integrity.json", {"hash": "blake3", "entries": snapshot(tree)})
    write_json(vdir / "image.json", {"version": n, "blake3": file_hash(vdir / "root.squashfs"),
                                     "size": 1, "kernel": "test"})


@pytest.fixture
def store(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_text("#!/bin/sh\n")
    os.symlink("usr/bin", tree / "bin")
    store = tmp_path / "images"
    _version(store, 1, tree)
    (tree / "usr/bin/tool").write_text("#!/bin/sh\necho 2\n")
    _version(store, 2, tree)
    return store


def test_list_use_and_rollback(store: Path) -> None:
    listing = json.loads(corral("host", "image", "list", "--store", str(store), "--json").stdout)
    assert [i["version"] for i in listing["images"]] == [1, 2] and listing["current"] is None
    done = corral("host", "image", "use", "2", "--store", str(store), "--json")
    assert json.loads(done.stdout)["current"] == 2
    done = corral("host", "image", "use", "1", "--store", str(store), "--json")
    assert json.loads(done.stdout) | {} == json.loads(done.stdout)
    assert (store / "current").read_text() == "1\n"
    done = corral("host", "image", "use", "7", "--store", str(store))
    assert done.returncode == 2 and "no such version" in done.stderr


def test_verify_finds_a_changed_image(store: Path) -> None:
    done = corral("host", "image", "verify", "1", "--store", str(store))
    assert done.returncode == 0 and "image 1: ok" in done.stdout, done.stderr
    # Someone with write access to the persistent disk swaps the image file.
    shutil.copy2(store / "2/root.squashfs", store / "1/root.squashfs")
    done = corral("host", "image", "verify", "1", "--store", str(store), "--json")
    assert done.returncode == 3
    assert json.loads(done.stdout)["problems"][0]["fields"] == ["blake3"]
    # ... or its integrity manifest and blake3 no longer describe what it holds.
    meta = json.loads((store / "1/image.json").read_text())
    write_json(store / "1/image.json", meta | {"blake3": file_hash(store / "1/root.squashfs")})
    done = corral("host", "image", "verify", "1", "--store", str(store), "--json")
    assert done.returncode == 3
    assert [p["path"] for p in json.loads(done.stdout)["problems"]] == ["/usr/bin/tool"]


def test_delta_of_a_booted_host(tmp_path: Path) -> None:
    run = tmp_path / "run/corral-host"
    image, upper = run / "image", run / "delta/upper"
    (image / "etc").mkdir(parents=True)
    (image / "etc/motd").write_text("hello\n")
    (image / "etc/gone").write_text("x\n")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/motd").write_text("owned\n")
    os.mknod(upper / "etc/gone", 0o600 | 0o020000, os.makedev(0, 0))  # overlayfs whiteout
    (upper / "usr/local/bin").mkdir(parents=True)
    (upper / "usr/local/bin/implant").write_text("#!/bin/sh\n")
    os.chmod(upper / "usr/local/bin/implant", 0o755)
    os.symlink("/etc/shadow", upper / "usr/local/bin/link")
    (run / "version").write_text("3\n")
    done = corral("host", "delta", "--json", env={"CORRAL_ROOT": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    got = {c["path"]: c["change"] for c in result["changes"]}
    assert got == {"/etc/motd": "modified", "/etc/gone": "deleted", "/usr": "added",
                   "/usr/local": "added", "/usr/local/bin": "added",
                   "/usr/local/bin/implant": "added", "/usr/local/bin/link": "added"}, got
    assert result["version"] == 3 and result["base_writes"] == 2


def test_delta_on_a_host_not_booted_from_an_image(tmp_path: Path) -> None:
    done = corral("host", "delta", env={"CORRAL_ROOT": str(tmp_path)})
    assert done.returncode == 1 and "not booted from a corral image" in done.stderr

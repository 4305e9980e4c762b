"""Recovery by reverting to base: the delta decoded exactly (on a real overlay), hostile names
and links handled, revert archives and restarts clean with the volume kept, verify catches a
tampered base, commit refuses executables unless allowed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import zstandard

from corral.recover import archive, delta

pytestmark = pytest.mark.root


@pytest.fixture
def overlay(tmp_path):
    """A real overlayfs: lower (the base), upper (the delta), merged (what a service sees)."""
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for path in dirs.values():
        path.mkdir()
    lower = dirs["lower"]
    (lower / "etc").mkdir()
    (lower / "etc/config").write_text("base config\n")
    (lower / "etc/keep").write_text("untouched\n")
    (lower / "bin").mkdir()
    (lower / "bin/tool").write_text("#!tool\n")
    os.chmod(lower / "bin/tool", 0o755)
    (lower / "data").mkdir()
    (lower / "data/a").write_text("a\n")
    (lower / "data/b").write_text("b\n")
    (lower / "gone").mkdir()
    (lower / "gone/inner").write_text("x\n")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={dirs['upper']},workdir={dirs['work']}",
                    str(dirs["merged"])], check=True)
    try:
        yield dirs
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)


def changes_of(dirs) -> dict[str, dict]:
    up = os.open(dirs["upper"], os.O_RDONLY | os.O_DIRECTORY)
    base = os.open(dirs["lower"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {c["path"]: c for c in (ch.to_json() for ch in delta.changes(up, base))}
    finally:
        os.close(up)
        os.close(base)


def test_delta_decodes_the_overlay_exactly(overlay):
    merged = overlay["merged"]
    (merged / "etc/config").write_text("changed\n")
    os.chmod(merged / "bin/tool", 0o700)
    (merged / "etc/new").write_text("new\n")
    os.unlink(merged / "data/a")
    subprocess.run(["rm", "-rf", str(merged / "gone")], check=True)
    # Without redirect_dir a directory rename is EXDEV; mv copies and deletes: the old name
    # becomes a whiteout, the new one a plain added tree.
    subprocess.run(["mv", str(merged / "data"), str(merged / "data.old")], check=True)
    (merged / "etc/keep").read_text()  # a read copies nothing up
    found = changes_of(overlay)
    assert found["/etc/config"]["change"] == "modified"
    assert found["/etc/config"]["details"] == ["content"]
    import blake3

    assert found["/etc/config"]["blake3"] == blake3.blake3(b"changed\n").hexdigest()
    assert found["/bin/tool"]["details"] == ["mode"] and found["/bin/tool"]["mode"] == "0700"
    assert found["/etc/new"]["change"] == "added" and found["/etc/new"]["size"] == 4
    assert found["/gone"]["change"] == "deleted" and found["/gone/inner"]["change"] == "deleted"
    assert found["/data"]["change"] == "deleted"
    assert found["/data.old/b"]["change"] == "added"
    assert "/etc/keep" not in found and "/etc" not in found


def test_an_opaque_directory_hides_the_base(overlay):
    merged = overlay["merged"]
    subprocess.run(["rm", "-rf", str(merged / "data")], check=True)
    (merged / "data").mkdir()  # recreated: overlay marks it opaque
    (merged / "data/c").write_text("c\n")
    found = changes_of(overlay)
    assert found["/data/a"]["change"] == "deleted" and found["/data/b"]["change"] == "deleted"
    assert found["/data/c"]["change"] == "added"


def test_hostile_names_and_links_never_lead_outside(overlay):
    merged = overlay["merged"]
    os.symlink("/etc/shadow", merged / "etc/shadowlink")
    os.symlink("/", merged / "rootlink")
    (merged / os.fsdecode(b"bad\nname\xff")).write_text("x")
    (merged / "esc\x1b[31m").write_text("x")
    found = changes_of(overlay)
    text = json.dumps(list(found.values()))
    json.loads(text)  # valid JSON
    assert found["/etc/shadowlink"] == {
        "path": "/etc/shadowlink", "change": "added", "kind": "symlink", "uid": 0, "gid": 0,
        "mode": "0777", "target": "/etc/shadow", "executable": False, "setid": False}
    assert "/bad\\x0aname\\xff" in found and "/esc\\x1b[31m" in found
    assert "/rootlink/etc" not in text  # never walked through


def test_the_archive_keeps_links_as_links_and_never_host_files(overlay, tmp_path):
    merged = overlay["merged"]
    os.symlink("/etc/shadow", merged / "etc/shadowlink")
    (merged / "etc/config").write_text("changed\n")
    os.unlink(merged / "data/a")
    up = os.open(overlay["upper"], os.O_RDONLY | os.O_DIRECTORY)
    base = os.open(overlay["lower"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        where = archive.archive_delta(up, base, tmp_path / "archives",
                                      {"reason": "test", "incident": "i-1"}, keep=2)
    finally:
        os.close(up)
        os.close(base)
    meta = json.loads((where / archive.META).read_text())
    assert meta["incident"] == "i-1" and {c["path"] for c in meta["changes"]} == {
        "/etc/shadowlink", "/etc/config", "/data/a"}
    with open(where / archive.ARCHIVE, "rb") as raw:
        with zstandard.ZstdDecompressor().stream_reader(raw) as zst:
            with tarfile.open(fileobj=zst, mode="r|") as tar:
                members = {m.name: (m, tar.extractfile(m).read() if m.isfile() else None)
                           for m in tar}
    link, _ = members["etc/shadowlink"]
    assert link.issym() and link.linkname == "/etc/shadow"
    assert members["etc/config"][1] == b"changed\n"
    assert members["data/a"][0].ischr()  # the whiteout
    shadow = open("/etc/shadow", "rb").read()
    assert all(data != shadow for _, data in members.values())


def test_retention_keeps_the_newest(tmp_path):
    for i in range(5):
        (tmp_path / f"2026010{i}T000000Z-x").mkdir()
    archive.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20260103T000000Z-x",
                                                          "20260104T000000Z-x"]


# -- on the running sample service ----------------------------------------------------------

ATTACK = """
import os
open('/tmp/dropper', 'w').write('payload'); os.chmod('/tmp/dropper', 0o755)
os.symlink('/etc/shadow', '/tmp/shadowlink')
open('/tmp/line\\nbreak', 'w').write('x')
"""


def test_delta_lists_an_attack_and_revert_removes_it_keeping_the_volume(notes):
    assert notes.http("/notes", data=b"precious") == b"stored\n"
    assert notes.exec(ATTACK).returncode == 0
    listed = json.loads(notes.corral("delta", notes.name, "--json", check=True).stdout)
    paths = {c["path"]: c for c in listed["changes"]}
    assert set(paths) == {"/tmp/dropper", "/tmp/shadowlink", "/tmp/line\\x0abreak"}
    assert paths["/tmp/dropper"]["executable"] is True
    assert paths["/tmp/shadowlink"]["target"] == "/etc/shadow"
    assert listed["base_writes"] == []  # added files, no base file overwritten

    result = json.loads(notes.corral("revert", notes.name, "--json", check=True).stdout)
    assert result["archive"].endswith("delta.tar.zst")
    after = json.loads(notes.corral("delta", notes.name, "--json", check=True).stdout)
    assert after["changes"] == []
    assert b"precious" in notes.http("/notes")  # the volume survived the revert
    status = notes.status()
    assert status["reverts"] == 1 and len(status["archives"]) == 1
    assert status["archives"][0]["changes"] == 3


def test_verify_reports_a_tampered_base(notes):
    assert notes.corral("verify", notes.name).returncode == 0
    target = notes.state_dir / "base/1/root/usr/bin/python3.11"
    with open(target, "ab") as handle:
        handle.write(b"trojan")
    result = notes.corral("verify", notes.name)
    assert result.returncode == 3
    assert re.search(r"modified +/usr/bin/python3.11 \(blake3, size\)", result.stdout)
    data = json.loads(notes.corral("verify", notes.name, "--json").stdout)
    assert [p["path"] for p in data["problems"]] == ["/usr/bin/python3.11"]


def test_verify_checks_the_read_only_image_and_a_start_remakes_a_missing_one(notes):
    """The root is mounted from base/1/root.erofs (host.baseimage): its hash is sealed with the
    tree, so a changed image is a problem; a missing one is made again from the sealed tree."""
    image = notes.state_dir / "base/1/root.erofs"
    assert image.is_file()
    notes.corral("down", notes.name, check=True)
    with open(image, "r+b") as handle:
        handle.seek(image.stat().st_size // 2)
        handle.write(b"trojan")
    result = notes.corral("verify", notes.name, "--json")
    assert result.returncode == 3
    assert [p["path"] for p in json.loads(result.stdout)["problems"]] == ["root.erofs"]
    image.unlink()
    assert notes.corral("verify", notes.name).returncode == 3  # gone: said too
    notes.corral("up", str(notes.manifest), check=True)
    assert image.is_file()
    assert notes.corral("verify", notes.name).returncode == 0
    assert notes.http("/health")
    assert not any("one overlay" in w for w in notes.status().get("warnings", []))


def test_commit_refuses_executables_unless_allowed(notes):
    code = ("import os; open('/tmp/settings', 'w').write('v=2'); "
            "open('/tmp/helper', 'w').write('#!x'); os.chmod('/tmp/helper', 0o755)")
    assert notes.exec(code).returncode == 0
    refused = notes.corral("commit", notes.name)
    assert refused.returncode == 3
    assert "/tmp/helper: added, executable or library" in refused.stderr
    assert notes.corral("base", "list", notes.name, "--json", check=True).stdout.count(
        '"base_version"') == 1
    done = notes.corral("commit", notes.name, "--allow", "/tmp/helper", check=True)
    assert "as base version 2" in done.stdout
    versions = json.loads(notes.corral("base", "list", notes.name, "--json").stdout)["versions"]
    assert [(v["base_version"], v["current"]) for v in versions] == [(1, False), (2, True)]
    # Running on the new base, with a fresh delta that holds nothing.
    out = notes.exec("print(open('/tmp/settings').read())")
    assert out.stdout == "v=2\n"
    assert json.loads(notes.corral("delta", notes.name, "--json").stdout)["changes"] == []
    assert notes.corral("verify", notes.name).returncode == 0
    # And back to version 1 on purpose.
    notes.corral("base", "use", notes.name, "1", check=True)
    notes.corral("revert", notes.name, check=True)
    assert notes.exec("import os; print(os.path.exists('/tmp/settings'))").stdout == "False\n"


def test_commit_refuses_while_an_incident_is_open(notes):
    assert notes.exec("open('/tmp/settings', 'w').write('v=2')").returncode == 0
    (notes.state_dir / "incidents.jsonl").write_text(json.dumps({"id": "i-1"}) + "\n")
    result = notes.corral("commit", notes.name)
    # A refusal by a check, like the refusal for executables: exit 3 (docs/cli.md).
    assert result.returncode == 3 and "an incident is open" in result.stderr


COMMIT_UNDER_LOW_FD_LIMIT = """
import os, resource, sys, types
from pathlib import Path
from corral.core.errors import CorralError
from corral.recover import commit
state, upper, base_root = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = types.SimpleNamespace(service="deep", state=state, base_root=Path(base_root),
                             base_version=1)
resource.setrlimit(resource.RLIMIT_NOFILE,
                   (int(sys.argv[4]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
base_fd = os.open(base_root, os.O_RDONLY | os.O_DIRECTORY)
try:
    commit.commit(spec, upper_fd, base_fd, [])
except CorralError as exc:
    print("refused", exc.exit_code, exc)
    sys.exit(0)
except BaseException as exc:
    print("failed", type(exc).__name__, exc)
    sys.exit(1)
print("committed")
sys.exit(1)
"""


@pytest.mark.parametrize("levels,limit", [(700, 1024), (350, 400)])
def test_commit_refuses_a_deep_setuid_file_under_a_low_descriptor_limit(tmp_path, levels, limit):
    """Review 6.2: the check skipped what it could not open (EMFILE), the copy did not, and a
    setuid executable went into the new base. Now one walk checks and copies, bounded in
    descriptors: beyond MAX_DEPTH it refuses, within it sees the file and refuses that."""
    from corral.core import tree

    state = tmp_path / "state"
    base_root = state / "base/1/root"
    (base_root / "tmp").mkdir(parents=True)
    (state / "base/1/image.json").write_text("{}")
    upper = tmp_path / "upper"
    (upper / "tmp").mkdir(parents=True)
    fd = os.open(upper / "tmp", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    payload = os.open("payload", os.O_CREAT | os.O_WRONLY, 0o755, dir_fd=fd)
    os.write(payload, b"\x7fELF")
    os.fchmod(payload, 0o4755)
    os.close(payload)
    os.close(fd)
    try:
        run = subprocess.run([sys.executable, "-c", COMMIT_UNDER_LOW_FD_LIMIT, str(state),
                              str(upper), str(base_root), str(limit)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.startswith("refused 3 ")  # CheckFailed: the commit's exit code
        if levels > tree.MAX_DEPTH:
            assert "cannot be checked whole" in run.stdout
        else:
            assert "/payload: added, setuid/setgid and executable or library" in run.stdout
        assert sorted(os.listdir(state / "base")) == ["1"]  # nothing built, nothing left
    finally:
        with tree.directory(str(tmp_path)) as top:  # pytest's clean-up would recurse
            tree.remove(top, "upper")


def test_base_build_commit_and_reinstall_agree_on_version_numbers(notes, tmp_path):
    """Review 6.3: `base build` and `commit` number versions from the disk, install from its
    record; after either, an install that builds a base must not pick a number already taken."""

    def record_base():
        return json.loads((notes.state_dir / "install.json").read_text())["base"]

    def add_to_image(path):
        text = notes.manifest.read_text()
        notes.manifest.write_text(text.replace('"/usr/lib/python3.11"',
                                               f'"/usr/lib/python3.11", "{path}"', 1))

    def on_disk():
        return sorted(int(p.name) for p in (notes.state_dir / "base").iterdir()
                      if p.name.isdigit())

    built = notes.corral("base", "build", notes.name, check=True)
    assert "built base version 2" in built.stdout
    assert on_disk() == [1, 2] and record_base()["versions"] == [1, 2]
    assert record_base()["version"] == 1  # built, not used

    notes.corral("down", notes.name, check=True)
    # A changed image (one more file) gives another digest: install builds a base.
    add_to_image("/usr/bin/true")
    notes.corral("install", str(notes.manifest), check=True)
    assert on_disk() == [1, 2, 3]
    assert record_base()["version"] == 3 and record_base()["versions"] == [1, 2, 3]

    notes.corral("up", str(notes.manifest), check=True)
    assert notes.exec("open('/tmp/settings', 'w').write('v=2')").returncode == 0
    done = notes.corral("commit", notes.name, check=True)
    assert "as base version 4" in done.stdout
    assert on_disk() == [1, 2, 3, 4]
    assert record_base()["version"] == 4 and record_base()["versions"] == [1, 2, 3, 4]

    notes.corral("down", notes.name, check=True)
    add_to_image("/usr/bin/false")
    notes.corral("install", str(notes.manifest), check=True)
    assert on_disk() == [1, 2, 3, 4, 5]
    assert record_base()["version"] == 5 and record_base()["versions"] == [1, 2, 3, 4, 5]
    notes.corral("up", str(notes.manifest), check=True)
    assert notes.http("/health")

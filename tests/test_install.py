"""install / uninstall against the real host: real users, real files, real nftables (in a
throwaway network namespace), and the promise that --purge leaves the host byte-identical."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time

import pytest

from conftest import EXAMPLES, corral, notes_manifest

pytestmark = pytest.mark.root
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
NOTES_PY = EXAMPLES / "notes" / "notes.py"


def accounts(mine: str) -> dict[str, bytes]:
    """The account files, byte for byte, less the lines of other tests' services (another test
    run on the same machine adds and removes its own `corral-tst...` users meanwhile)."""
    def others(line: bytes) -> bool:
        return line.startswith(b"corral-tst") and not line.startswith(f"corral-{mine}".encode())

    return {path: b"".join(ln for ln in open(path, "rb").read().splitlines(keepends=True)
                           if not others(ln))
            for path in ACCOUNT_FILES}


def tables(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"],
                          capture_output=True, text=True, check=True).stdout


def sample(tmp_path, name: str, extra: str = "") -> str:
    """The notes service under a test name, with a second process to exercise two users."""
    return str(notes_manifest(tmp_path, name, extra_process=f"""
[process.backup]
command = ["/usr/bin/python3.11", "-I", "-c", "pass"]
connect = ["tcp/873@10.0.0.9"]
{extra}"""))


def state_dir(root, name):
    return root / "var/lib/corral" / name


def test_install_twice_then_purge_leaves_host_byte_identical(tmp_path, corral_root, netns,
                                                               service_name):
    manifest = sample(tmp_path, service_name)
    before, before_tables = accounts(service_name), tables(netns)

    first = corral("install", manifest, netns=netns, check=True)
    assert f"created user corral-{service_name}-app" in first.stdout
    for process in ("app", "backup"):
        entry = pwd.getpwnam(f"corral-{service_name}-{process}")
        assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_dir == "/nonexistent"
        assert 100 <= entry.pw_uid < 1000, "system uid range"
        assert not os.path.exists(entry.pw_dir)
    app = pwd.getpwnam(f"corral-{service_name}-app")
    # The firewall table exists in the test's namespace, and only there.
    assert f"table inet corral-{service_name}" in tables(netns)
    assert f"corral-{service_name}" not in subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True).stdout
    # The base image holds what was planned, owned by root, with its own passwd.
    state = state_dir(corral_root, service_name)
    root = state / "base/1/root"
    assert (root / "usr/bin/python3.11").is_file() and (root / "lib64").is_symlink()
    assert (root / "opt/notes/notes.py").read_bytes() == NOTES_PY.read_bytes()
    passwd = (root / "etc/passwd").read_text()
    assert f"corral-{service_name}-app:x:{app.pw_uid}:" in passwd and "daemon" not in passwd
    assert not (root / "bin/sh").exists() and not (root / "usr/bin/sh").exists()
    volume = state / "volumes/srv-notes"
    st = volume.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (app.pw_uid, app.pw_gid, 0o750)

    record = (state / "install.json").read_bytes()
    tables_after_first = tables(netns)
    second = corral("install", manifest, netns=netns, check=True)
    assert second.stdout.strip() == f"{service_name}: installed, nothing to change"
    assert (state / "install.json").read_bytes() == record
    assert tables(netns) == tables_after_first
    assert sorted(p.name for p in (state / "base").iterdir()) == ["1"]

    corral("uninstall", manifest, "--purge", netns=netns, check=True)
    assert accounts(service_name) == before
    assert tables(netns) == before_tables
    assert not (corral_root / "var/lib/corral").exists()
    assert not (corral_root / "run/corral").exists()


def test_the_base_image_really_runs_the_service(tmp_path, corral_root, netns, service_name):
    """The ELF closure is complete: the interpreter starts inside the bare base (chroot)."""
    corral("install", sample(tmp_path, service_name), netns=netns, check=True)
    root = state_dir(corral_root, service_name) / "base/1/root"
    result = subprocess.run(
        ["chroot", str(root), "/usr/bin/python3.11", "-I", "-c",
         "import http.server, json, ssl, sqlite3, hashlib; print('ok')"],
        capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
    corral("uninstall", service_name, "--purge", netns=netns, check=True)


def test_uninstall_without_purge_keeps_volumes(tmp_path, corral_root, netns, service_name):
    manifest = sample(tmp_path, service_name)
    before = accounts(service_name)
    corral("install", manifest, netns=netns, check=True)
    state = state_dir(corral_root, service_name)
    (state / "volumes/srv-notes/notes.jsonl").write_text('{"text": "keep me"}\n')
    corral("uninstall", service_name, netns=netns, check=True)
    assert accounts(service_name) == before
    assert (state / "volumes/srv-notes/notes.jsonl").read_text() == '{"text": "keep me"}\n'
    assert sorted(p.name for p in state.iterdir()) == ["volumes"]
    # Installing again adopts the kept volume (new users get it chowned to them).
    corral("install", manifest, netns=netns, check=True)
    assert (state / "volumes/srv-notes/notes.jsonl").exists()
    corral("uninstall", service_name, "--purge", netns=netns, check=True)
    assert accounts(service_name) == before and not state.exists()


@pytest.mark.parametrize("step", ["users", "base", "volumes", "table"])
def test_a_failure_half_way_undoes_its_own_work(tmp_path, corral_root, netns, service_name,
                                                 step):
    manifest = sample(tmp_path, service_name)
    before, before_tables = accounts(service_name), tables(netns)
    result = corral("install", manifest, netns=netns, env={"CORRAL_TEST_FAIL_AFTER": step})
    assert result.returncode == 1
    assert f"install of {service_name} failed: injected failure after step '{step}'; undone" \
        in result.stderr
    assert "could not undo" not in result.stderr
    assert accounts(service_name) == before
    assert tables(netns) == before_tables
    assert not (corral_root / "var/lib/corral").exists()


def mounts_under(top) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4] for line in handle if line.split()[4].startswith(str(top))]


@pytest.mark.parametrize("step", ["volumes", "table"])
def test_a_failure_after_a_sized_volume_undoes_its_file_system(tmp_path, corral_root, netns,
                                                               service_name, step):
    manifest = sample(tmp_path, service_name)
    text = open(manifest).read().replace('mode = "0750"\n', 'mode = "0750"\nsize = "16M"\n', 1)
    open(manifest, "w").write(text)
    result = corral("install", manifest, netns=netns, env={"CORRAL_TEST_FAIL_AFTER": step})
    assert result.returncode == 1 and "undone" in result.stderr, result.stderr
    assert "could not undo" not in result.stderr
    assert mounts_under(corral_root) == []
    assert not (corral_root / "var/lib/corral").exists()
    deadline = time.monotonic() + 30  # a lazy unmount lets the loop device go soon after
    while True:
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        if str(corral_root) not in loops or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert str(corral_root) not in loops, loops


def test_a_real_failure_half_way_is_undone(tmp_path, corral_root, netns, service_name):
    """useradd fails for the second user (a group of that name exists already): the first
    user, created a moment before, is removed again."""
    group = f"corral-{service_name}-backup"
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        before = accounts(service_name)
        result = corral("install", sample(tmp_path, service_name), netns=netns)
        assert result.returncode == 1
        assert f"cannot create user {group}" in result.stderr and "undone" in result.stderr
        assert accounts(service_name) == before
        assert not (corral_root / "var/lib/corral").exists()
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


def test_refuses_to_adopt_a_foreign_user(tmp_path, corral_root, netns, service_name):
    user = f"corral-{service_name}-app"
    subprocess.run(["useradd", "--system", "--no-create-home", "--comment", "someone else",
                    user], check=True)
    try:
        before = accounts(service_name)
        result = corral("install", sample(tmp_path, service_name), netns=netns)
        assert result.returncode == 1
        assert f"user {user} exists and was not created by corral; refusing to adopt it" \
            in result.stderr
        assert accounts(service_name) == before
        assert pwd.getpwnam(user).pw_gecos == "someone else"
    finally:
        subprocess.run(["userdel", user], capture_output=True)


def test_refuses_to_replace_a_foreign_table(tmp_path, corral_root, netns, service_name):
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add", "table", "inet",
                    f"corral-{service_name}"], check=True)
    before = accounts(service_name)
    result = corral("install", sample(tmp_path, service_name), netns=netns)
    assert result.returncode == 1 and "was not made by corral" in result.stderr
    assert accounts(service_name) == before
    assert f"table inet corral-{service_name}" in tables(netns)


def test_a_changed_manifest_updates_only_what_changed(tmp_path, corral_root, netns,
                                                      service_name):
    corral("install", sample(tmp_path, service_name), netns=netns, check=True)
    before = tables(netns)
    changed = sample(tmp_path, service_name).replace("", "")
    text = open(changed).read().replace('connect = ["tcp/873@10.0.0.9"]',
                                        'connect = ["tcp/873@10.0.0.10"]')
    open(changed, "w").write(text)
    result = corral("install", changed, netns=netns, check=True)
    # Exactly what changed: the table re-applied, and the run-time settings of the one process
    # whose connect changed (issue 12: install says what it rewrote).
    assert result.stdout.strip().splitlines() == [
        f"{service_name}: applied nftables table inet corral-{service_name}",
        f"{service_name}: updated the run-time settings: process backup: connect"]
    assert tables(netns) == before  # same table, new contents
    rules = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "inet",
                            f"corral-{service_name}"], capture_output=True, text=True).stdout
    assert "10.0.0.10" in rules and "10.0.0.9 " not in rules
    corral("uninstall", service_name, "--purge", netns=netns, check=True)


def test_uninstall_of_an_unknown_service_is_a_usage_error(corral_root):
    result = corral("uninstall", "nosuchsvc")
    assert result.returncode == 2
    assert result.stderr.strip() == "corral: nosuchsvc: not installed"


def test_install_reports_json(tmp_path, corral_root, netns, service_name):
    out = json.loads(corral("install", sample(tmp_path, service_name), "--json", netns=netns,
                            check=True).stdout)
    assert out["service"] == service_name and out["changed"] is True and len(out["changes"]) == 5
    corral("uninstall", service_name, "--purge", netns=netns, check=True)


def test_an_edited_input_rebuilds_the_base_and_says_why(tmp_path, corral_root, netns,
                                                        service_name):
    """Editing an `add`ed config file used to leave install saying "nothing to change": the
    base's inputs are compared by content with what the current base was built from."""
    from conftest import write_manifest

    conf = tmp_path / "app.conf"
    conf.write_text("port 1\n")
    manifest = write_manifest(tmp_path, service_name, """
[image]
include = ["/usr/bin/true"]
add = { "/etc/app/app.conf" = "app.conf" }
[process.app]
command = ["/usr/bin/true"]
""")
    try:
        corral("install", str(manifest), netns=netns, check=True)
        conf.write_text("port 2\n")
        result = corral("install", str(manifest), netns=netns, check=True)
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{service_name}: built base version 2 ")
        assert lines[0].endswith(f": /etc/app/app.conf changed ({conf})"), lines
        base = state_dir(corral_root, service_name) / "base/2/root/etc/app/app.conf"
        assert base.read_text() == "port 2\n"
        again = corral("install", str(manifest), netns=netns, check=True)
        assert again.stdout.strip() == f"{service_name}: installed, nothing to change"
        # A manifest field the launch path reads (runtime.json) is named too.
        manifest.write_text(manifest.read_text() + 'environment = { MODE = "fast" }\n')
        result = corral("install", str(manifest), netns=netns, check=True)
        assert result.stdout.strip() == (f"{service_name}: updated the run-time settings: "
                                         "process app: environment")
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)

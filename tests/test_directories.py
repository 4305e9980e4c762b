"""systemd's RuntimeDirectory=/StateDirectory=/CacheDirectory=/LogsDirectory= and image file
owners: a contained server writes its pid file in /run/NAME, keeps state in /var/lib/NAME, and
reads a 0640 config that belongs to its own user, which another process cannot read."""

from __future__ import annotations

import os
import pwd
import time

import pytest

from conftest import Service, corral, write_manifest

pytestmark = pytest.mark.root

SLEEP = '["/usr/bin/python3.11", "-I", "-c", "import time; time.sleep(1e6)"]'


@pytest.fixture
def svc(tmp_path, corral_root, netns, service_name):
    conf = tmp_path / "secret.conf"
    conf.write_text("requirepass s3cret\n")
    conf.chmod(0o640)
    manifest = write_manifest(tmp_path, service_name, f"""
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11"]
add = {{ "/etc/app/secret.conf" = "secret.conf" }}
owner = {{ "/etc/app/secret.conf" = "app" }}
[process.app]
command = {SLEEP}
runtime_directory = ["{service_name}"]
runtime_directory_mode = "0750"
state_directory = ["{service_name}"]
logs_directory = ["{service_name}"]
[process.other]
command = {SLEEP}
""")
    corral("install", str(manifest), netns=netns, check=True)
    service = Service(service_name, netns, corral_root, manifest)
    try:
        service.corral("up", str(manifest), check=True)
        yield service
    finally:
        service.corral("down", service_name)
        service.corral("uninstall", service_name, "--purge")


def test_directories_and_owners(svc):
    name = svc.name
    app = pwd.getpwnam(f"corral-{name}-app")
    code = (f"import os\nopen('/run/{name}/app.pid', 'w').write(str(os.getpid()))\n"
            f"open('/var/lib/{name}/state', 'w').write('kept')\n"
            f"open('/var/log/{name}/app.log', 'w').write('log')\n"
            "print(open('/etc/app/secret.conf').read().strip())\n"
            f"st = os.stat('/run/{name}'); print(st.st_uid, oct(st.st_mode & 0o7777))")
    result = svc.exec(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["requirepass s3cret", f"{app.pw_uid} 0o750"]
    other = svc.exec("open('/etc/app/secret.conf').read()", process="other")
    assert "PermissionError" in other.stderr
    # The state and logs directories are volumes, owned by the process's user, mode 0755.
    for store in (f"var-lib-{name}", f"var-log-{name}"):
        st = os.stat(svc.state_dir / "volumes" / store)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (app.pw_uid, app.pw_gid, 0o755)
    # A revert keeps the state directory and gives back an empty runtime directory.
    svc.corral("revert", name, check=True)
    deadline = time.time() + 20
    while time.time() < deadline and svc.status()["state"] != "running":
        time.sleep(0.1)
    after = svc.exec(f"import os; print(os.listdir('/run/{name}'), "
                     f"open('/var/lib/{name}/state').read())")
    assert after.stdout.strip() == "[] kept", after.stderr


def test_unknown_owner_and_absent_path_are_input_errors(tmp_path, corral_root):
    manifest = write_manifest(tmp_path, "tstdirs", """
[image]
include = ["/usr/bin/true"]
owner = { "/etc/nope.conf" = "app", "/usr/bin/true" = "ghost" }
[process.app]
command = ["/usr/bin/true"]
state_directory = ["../escape"]
""")
    result = corral("check", str(manifest))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f'{manifest}: process.app.state_directory[0]: "../escape": expected a relative ' \
        'directory name like "nginx" (letters, digits, "._-@+", "/" between parts, no "..")' \
        in lines, lines
    fixed = manifest.read_text().replace('state_directory = ["../escape"]', "")
    manifest.write_text(fixed)
    result = corral("check", str(manifest))
    assert result.stderr.strip() == (f'{manifest}: image.owner."/usr/bin/true": "ghost": no such '
                                     "process (processes: app)"), result.stderr
    manifest.write_text(fixed.replace(', "/usr/bin/true" = "ghost"', ""))
    result = corral("plan", str(manifest))
    assert result.returncode == 2
    assert result.stderr.strip() == (f'{manifest}: image.owner."/etc/nope.conf": "/etc/nope.conf": '
                                     "not in the image (include or add it first)"), result.stderr


def test_a_mode_problem_is_not_blamed_on_landlock(tmp_path, corral_root, netns, service_name):
    """A root-only directory in the image keeps the process out before Landlock exists: the
    error says it is a file mode or owner, and how to fix it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # empty: a root-only directory the image copies with its mode
    (tmp_path / "app.conf").write_text("x\n")
    manifest = write_manifest(tmp_path, service_name, f"""
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11", "{private}"]
add = {{ "{private}/app.conf" = "app.conf" }}
[process.app]
command = {SLEEP}
""")
    try:
        corral("install", str(manifest), netns=netns, check=True)
        result = corral("up", str(manifest), netns=netns)
        assert result.returncode == 1
        assert "/private" in result.stderr and "not Landlock" in result.stderr, result.stderr
        assert "image.owner" in result.stderr and "landlock:" not in result.stderr
    finally:
        corral("down", service_name, netns=netns)
        corral("uninstall", service_name, "--purge", netns=netns)

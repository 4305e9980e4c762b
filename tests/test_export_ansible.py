"""`corral export ansible`: the generated playbook and role against golden files, and run for
real by ansible-core (`ansible-playbook -i localhost, -c local`) with the sample manifest under
a test name: a throwaway CORRAL_ROOT and corral_etc, and a throwaway network namespace, so the
service's table and the host filter the playbook applies never reach the host's own tables.
First run changed, second run changed=0, then `--check --diff` runs clean."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORRAL, EXAMPLES, corral, in_netns

GOLDEN = Path(__file__).parent / "golden" / "ansible"
INVENTORY = Path(__file__).parent / "data" / "ansible" / "inventory.ini"
NOTES = EXAMPLES / "notes" / "notes.toml"
FIXED_ROOT = "/nonexistent-corral-export"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
needs_ansible = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-core not installed")


def export(out: Path, *manifests: str, inventory: Path = INVENTORY) -> subprocess.CompletedProcess:
    return subprocess.run([*CORRAL, "export", "ansible", "--inventory", str(inventory),
                           *manifests, "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CORRAL_ROOT": FIXED_ROOT})


def test_golden(tmp_path):
    result = export(tmp_path, str(NOTES))
    assert result.returncode == 0, result.stderr
    assert "cannot express" in result.stderr
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert made == ["inventory.ini", "playbook.yml", "roles/corral/defaults/main.yml",
                    "roles/corral/files/notes/notes.py", "roles/corral/files/notes/notes.toml",
                    "roles/corral/tasks/main.yml", "roles/corral/templates/host.toml.j2"]
    # The copies are the sources as they are; the generated files are pinned.
    assert (tmp_path / "roles/corral/files/notes/notes.py").read_bytes() == \
        (NOTES.parent / "notes.py").read_bytes()
    for name in ("playbook.yml", "roles/corral/defaults/main.yml", "roles/corral/tasks/main.yml",
                 "roles/corral/templates/host.toml.j2"):
        golden = GOLDEN / name.replace("/", "__")
        if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
            GOLDEN.mkdir(exist_ok=True)
            golden.write_text((tmp_path / name).read_text())
        assert (tmp_path / name).read_text() == golden.read_text(), name


def test_bad_input_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "tstbad"\n[process.app]\ncommand = "not a list"\n')
    empty = tmp_path / "empty.ini"
    empty.write_text("# nothing\n")
    out = tmp_path / "out"
    for args, inventory in (([str(bad)], INVENTORY), ([str(NOTES)], tmp_path / "none.ini"),
                            ([str(NOTES)], empty), ([str(NOTES), str(NOTES)], INVENTORY)):
        result = export(out, *args, inventory=inventory)
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr
        assert not out.exists()


def recap(output: str) -> dict[str, int]:
    found = re.search(r"^localhost\s+:\s+(.*)$", output, re.M)
    assert found, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}


@needs_ansible
@pytest.mark.root
def test_playbook_runs_idempotent_and_check_clean(tmp_path, service_name, netns):
    """The sample manifest (as service tst...) installed, started and filtered by the playbook
    in a throwaway netns; the host filter is applied there for real, then confirmed."""
    source = tmp_path / "manifests"
    source.mkdir()
    text = NOTES.read_text().replace('name = "notes"', f'name = "{service_name}"')
    assert service_name in text
    (source / f"{service_name}.toml").write_text(text)
    (source / "notes.py").write_bytes((NOTES.parent / "notes.py").read_bytes())
    out = tmp_path / "export"
    assert export(out, str(source / f"{service_name}.toml")).returncode == 0

    root = tmp_path / "root"
    extra = {"ansible_python_interpreter": sys.executable, "corral_become": False,
             "corral_bin": str(Path(sys.executable).parent / "corral"),
             "corral_root": str(root), "corral_etc": str(tmp_path / "etc"),
             "corral_management": ["tcp/22@192.0.2.0/24"], "corral_confirm_timeout": 60}
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "tmp"), "ANSIBLE_HOME": str(tmp_path / "home"),
           "ANSIBLE_RETRY_FILES_ENABLED": "0"}

    def play(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*in_netns(netns), str(PLAYBOOK), "-i", "localhost,", "-c",
                               "local", "-e", f"@{tmp_path / 'vars.json'}", *args,
                               str(out / "playbook.yml")], capture_output=True, text=True,
                              env=env, cwd=out, timeout=600)

    ns_env = {"CORRAL_ROOT": str(root)}
    try:
        first = play()
        assert first.returncode == 0, first.stdout + first.stderr
        # copy, install, up, host file, host apply, host confirm
        assert recap(first.stdout)["changed"] == 6, first.stdout
        for task in ("corral install", "corral up"):
            block = first.stdout[first.stdout.index(f"TASK [corral : {task}"):]
            assert f"changed: [localhost] => (item={service_name})" in block.split("TASK")[1]
        status = json.loads(corral("status", service_name, "--json", netns=netns,
                                   env=ns_env).stdout)
        assert status["services"][0]["state"] == "running"
        table = subprocess.run([*in_netns(netns), "nft", "list", "table", "inet", "corral-host"],
                               capture_output=True, text=True)
        assert table.returncode == 0 and "8080" in table.stdout
        host_state = root / "var/lib/corral/host"
        assert (host_state / "confirmed.json").exists()
        assert not (host_state / "pending.json").exists()

        second = play()
        assert second.returncode == 0, second.stdout + second.stderr
        assert recap(second.stdout)["changed"] == 0, second.stdout

        check = play("--check", "--diff")
        assert check.returncode == 0, check.stdout + check.stderr
        counts = recap(check.stdout)
        assert counts["changed"] == 0 and counts["failed"] == 0, check.stdout
    finally:
        corral("down", service_name, netns=netns, env=ns_env)
        corral("uninstall", service_name, "--purge", netns=netns, env=ns_env)
        pending = root / "var/lib/corral/host/pending.json"
        if pending.exists():  # a failed run left a guard armed: stop it (it is ours)
            pid = json.loads(pending.read_text()).get("guard_pid")
            if isinstance(pid, int):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

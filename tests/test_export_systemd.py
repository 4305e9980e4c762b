"""`corral export systemd`: the unit of the sample service against its golden file, checked by
the real systemd-analyze (verify, and the offline security score), and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CORRAL, EXAMPLES

GOLDEN = Path(__file__).parent / "golden" / "corral-notes-app.service"
NOTES = str(EXAMPLES / "notes" / "notes.toml")
# A CORRAL_ROOT that does not exist: the unit's paths are stable and nothing installed is read.
FIXED_ROOT = "/nonexistent-corral-export"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def corral(*args: str, root: str = FIXED_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*CORRAL, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CORRAL_ROOT": root})


def export_to(tmp_path: Path, manifest: str = NOTES) -> Path:
    out = tmp_path / "units"
    result = corral("export", "systemd", manifest, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_golden(tmp_path):
    text = (export_to(tmp_path) / GOLDEN.name).read_text()
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_stdout_and_json_agree_with_the_file(tmp_path):
    printed = corral("export", "systemd", NOTES)
    assert printed.returncode == 0
    assert printed.stdout == GOLDEN.read_text()
    assert "cannot express" in printed.stderr and "Landlock" in printed.stderr
    data = json.loads(corral("export", "systemd", NOTES, "--json").stdout)
    assert data["files"] == {GOLDEN.name: GOLDEN.read_text()}
    assert any("redo log" in why for why in data["lost"][GOLDEN.name])


@needs_analyze
def test_verify_and_security_score(tmp_path):
    out = export_to(tmp_path)
    unit = str(out / GOLDEN.name)
    verify = subprocess.run([ANALYZE, "verify", unit], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run([ANALYZE, "security", "--offline=true", unit],
                              capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert found, security.stdout
    assert float(found.group(1)) <= 2.0, security.stdout


MANY = """
name = "tstexp"
[[volume]]
path = "/var/lib/data"
owner = "web"
[process.web]
command = ["/usr/bin/python3.11", "-c", "print('100% $HOME \\\\ \\"x\\"')"]
capabilities = ["NET_BIND_SERVICE"]
listen = ["tcp/443", "udp/5000-5010"]
connect = ["tcp/5432@10.0.0.5/32"]
writable = ["/var/cache/web"]
[process.worker]
command = ["/usr/bin/java", "-jar", "/opt/w.jar"]
connect = ["tcp/5432@10.0.0.5/32", "udp/53@127.0.0.53"]
syscalls = ["read", "write", "openat", "mmap"]
"""


@needs_analyze
def test_two_processes_caps_allowlist_and_quoting(tmp_path):
    manifest = tmp_path / "tstexp.toml"
    manifest.write_text(MANY)
    out = export_to(tmp_path, str(manifest))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["corral-tstexp-web.service", "corral-tstexp-worker.service",
                     "corral-tstexp.target"]
    web = (out / "corral-tstexp-web.service").read_text()
    worker = (out / "corral-tstexp-worker.service").read_text()
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in web and "PrivateUsers" not in web
    assert "SocketBindAllow=tcp:443\nSocketBindAllow=udp:5000-5010\n" in web
    assert "%%" in web and "$$HOME" in web  # no specifier or variable expansion
    assert "TemporaryFileSystem=/var/cache/web:mode=0755" in web
    assert "BindReadOnlyPaths=" in worker and "IPAddressAllow=10.0.0.5/32 127.0.0.53/32" in worker
    assert "SystemCallFilter=mmap openat read write" in worker
    assert "MemoryDenyWriteExecute" not in worker  # a JIT would die of it
    assert "CPUQuota=" not in web + worker  # neither asks for a quota: none by default
    units = [str(p) for p in sorted(out.iterdir())]
    verify = subprocess.run([ANALYZE, "verify", *units], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


def test_bad_input_exit_2_nothing_written(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "tstbad"\n[process.app]\ncommand = "not a list"\n')
    out = tmp_path / "out"
    for args in (["nosuchsvc"], [str(bad)], [str(tmp_path / "missing.toml")],
                 [NOTES, "--out", str(bad)]):
        result = corral("export", "systemd", *args, "--out", str(out)) if "--out" not in args \
            else corral("export", "systemd", *args)
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr
        assert not out.exists()

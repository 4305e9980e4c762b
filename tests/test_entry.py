"""The `corral` executable's entry point: `corral run FILE` skips click, and behaves exactly as
the click command does; pyseccomp loads without running ldconfig; a whole `corral run` imports
only what the launch needs and skips the interpreter's finalization."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORRAL, corral, in_netns, write_manifest

RUN_WITHOUT_CLICK = """import atexit, sys
atexit.register(lambda: print("click" in sys.modules, file=sys.stderr))
sys.argv = ["corral", "run", sys.argv[1]]
from corral.cli.entry import main
main()
"""


def both_ways(*args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`corral run ARGS` on the fast path, and the same through click (`--` forces it there)."""
    return corral("run", *args), corral("run", "--", *args)


@pytest.mark.parametrize("target", ["/nonexistent/svc.toml", "tstnosuch"])
def test_run_fast_path_answers_like_click(tmp_path, corral_root, target):
    fast, slow = both_ways(target)
    assert fast.returncode == slow.returncode == 2
    assert fast.stderr == slow.stderr and fast.stderr.strip()
    assert "Traceback" not in fast.stderr


def test_the_installed_executable_starts_the_primer_before_any_other_import(tmp_path,
                                                                         corral_root):
    """The environment's `corral` is bin/corral, not pip's generated console script, which
    imports `re` before the entry point: the primer (launch.cgprime) starts first, so that the
    kernel's wait it sets off overlaps everything else `corral run` imports."""
    exe = Path(sys.executable).with_name("corral")
    result = subprocess.run([str(exe), "run", str(tmp_path / "missing.toml")],
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "imported package" not in line]
    primer = imported.index("corral.launch.cgprime")
    assert "re" in imported[primer:] and "re" not in imported[:primer]
    assert "json" not in imported[:primer] and "enum" not in imported[:primer]


def test_run_fast_path_with_a_bad_name_in_the_file(tmp_path, corral_root):
    bad = write_manifest(tmp_path, "Bad Name", "")
    fast, slow = both_ways(str(bad))
    assert fast.returncode == slow.returncode == 2
    assert fast.stderr == slow.stderr and "name: missing or invalid" in fast.stderr


def test_run_fast_path_does_not_import_click(tmp_path, corral_root):
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_CLICK, "tstnosuch"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "False"


def test_other_spellings_of_run_go_through_click(corral_root):
    result = subprocess.run(CORRAL + ["run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage: corral run [OPTIONS] FILE" in result.stdout
    result = subprocess.run(CORRAL + ["run"], capture_output=True, text=True)
    assert result.returncode == 2 and "Missing argument 'FILE'" in result.stderr


def test_pyseccomp_loads_without_ldconfig():
    """corral.kernel.libseccomp answers find_library from the known sonames: the real search (which
    forks ldconfig) is not called for libc or libseccomp."""
    code = """import ctypes.util
def refuse(name):
    raise AssertionError(f"find_library({name!r}) was searched")
ctypes.util.find_library = refuse
from corral.kernel.libseccomp import load
seccomp = load()
assert seccomp.resolve_syscall(seccomp.Arch.NATIVE, "getppid") > 0
assert ctypes.util.find_library is refuse  # put back as it was
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout == "ok\n", result.stderr


def test_reading_commands_stay_off_the_manifest_model():
    """status, delta and incidents (report, service, delta) never load pydantic or the ELF
    parser: ~120 ms of imports that only check, plan and install need."""
    code = ("import sys, corral.cli.main, corral.cli.report, corral.supervise.control, "
            "corral.recover.delta; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'elftools') "
            "or m in ('corral.manifest.model', 'corral.plan.service', 'corral.plan.closure')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout == "[]\n", result.stderr


# A whole `corral run`, reporting the modules it imported where it ends: at os._exit, which
# it calls after the supervisor's tear-down instead of returning to the interpreter.
RUN_REPORTING_MODULES = """import gc, json, os, sys
me, real_exit = os.getpid(), os._exit
def exit_now(code):
    if os.getpid() == me:
        print("GC", gc.isenabled(), file=sys.stderr)  # off for the imports only
        print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr)
    real_exit(code)
os._exit = exit_now
sys.argv = ["corral", "run", sys.argv[1]]
from corral.cli.entry import main
main()
"""
# Never on the launch path: the CLI's and the manifest model's libraries, libseccomp's binding
# (the filters come from the service's cache, launch.bpf) and what it drags in, subprocess
# (no helper program is started), hashlib (OpenSSL for one hash), the nftables planner and
# runner (the watcher's NFLOG group comes from core.nflog), dataclasses and what it imports
# (the launch path's classes are core.record's: ~14 ms less), tomllib (the installed
# manifest's bytes are known by their digest, cli.base.installed_as), typing (annotations
# only, core.record) and pathlib with what it imports (paths are strings, core.paths).
NOT_ON_THE_LAUNCH_PATH = ("click", "rich", "pydantic", "elftools", "pyseccomp", "ctypes.util",
                          "corral.launch.seccomp", "subprocess", "hashlib", "tempfile",
                          "shutil", "corral.manifest.model", "corral.cli.main",
                          "corral.plan.nft_rules", "corral.host.nft", "dataclasses", "inspect",
                          "ast", "dis", "tokenize", "tomllib", "typing", "pathlib",
                          "ipaddress", "urllib.parse", "threading")


TRUE_SERVICE = """
[image]
include = ["/usr/bin/true"]
[process.main]
command = ["/usr/bin/true"]
"""


def test_run_imports_only_what_the_launch_needs(tmp_path, corral_root, netns, service_name):
    manifest = write_manifest(tmp_path, service_name, TRUE_SERVICE)
    corral("install", str(manifest), netns=netns, check=True)
    try:
        seen = []
        for _ in range(2):  # the first start compiles the seccomp filters, the second reads them
            result = subprocess.run(in_netns(netns) + [sys.executable, "-c",
                                                      RUN_REPORTING_MODULES, str(manifest)],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            line = [ln for ln in result.stderr.splitlines() if ln.startswith("MODULES ")]
            assert len(line) == 1, result.stderr  # it ended through os._exit, once
            assert "GC True" in result.stderr.splitlines()
            seen.append(set(json.loads(line[0].split(" ", 1)[1])))
        assert "pyseccomp" in seen[0]  # compiled, and kept
        assert (corral_root / "var/lib/corral" / service_name / "seccomp/main.bpf").is_file()
        assert sorted(set(NOT_ON_THE_LAUNCH_PATH) & seen[1]) == []
        assert "corral.launch.bpf" in seen[1] and "corral.supervise.supervisor" in seen[1]
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)


RUN_WITH_A_WAITING_PRIMER = """import os, sys
from corral.launch import cgprime
fifo = sys.argv[2]
os.mkfifo(fifo)  # nobody reads it: the primer's first write waits for as long as the launch
cgprime.own_procs_file = lambda: fifo
from corral.supervise import supervisor
make_children = supervisor.Supervisor.make_children
def noting(self):
    print("SENSORS_BEFORE_CGROUPS", self.watcher is not None, file=sys.stderr, flush=True)
    make_children(self)
supervisor.Supervisor.make_children = noting
sys.argv = ["corral", "run", sys.argv[1]]
from corral.cli.entry import main
main()
"""


def test_run_starts_the_sensors_first_while_the_primer_still_waits(tmp_path, corral_root,
                                                                   netns, service_name):
    """While the primer's first cgroup migration waits for its grace period (cgprime.waiting),
    the supervisor starts its sensors before it makes the cgroups (whose operations would
    wait for the same grace period), and the start goes on as usual: here the primer's write
    never goes through at all, and the service still runs, contained, to its exit."""
    manifest = write_manifest(tmp_path, service_name, TRUE_SERVICE)
    corral("install", str(manifest), netns=netns, check=True)
    try:
        result = subprocess.run(in_netns(netns) + [sys.executable, "-c",
                                                  RUN_WITH_A_WAITING_PRIMER, str(manifest),
                                                  str(tmp_path / "cgroup.procs")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "SENSORS_BEFORE_CGROUPS True" in result.stderr.splitlines(), result.stderr
        state = json.loads((corral_root / "run/corral" / service_name / "state.json").read_text())
        assert state["processes"]["main"]["exit_code"] == 0
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)


def test_run_parses_a_manifest_that_is_not_the_installed_one(tmp_path, corral_root, netns,
                                                              service_name):
    """`corral run FILE` skips parsing only for the very bytes install read: the same name line
    followed by something else (here a TOML error) is parsed, and refused as before."""
    manifest = write_manifest(tmp_path, service_name, TRUE_SERVICE)
    corral("install", str(manifest), netns=netns, check=True)
    try:
        record = json.loads((corral_root / "var/lib/corral" / service_name /
                             "install.json").read_text())
        assert len(record["manifest_sha256"]) == 64
        assert corral("run", str(manifest), netns=netns).returncode == 0
        state = corral_root / "run/corral" / service_name / "state.json"
        after_run = state.read_bytes()
        manifest.write_text(manifest.read_text() + "this is = = not TOML\n")
        fast, slow = both_ways(str(manifest))
        assert fast.returncode == slow.returncode == 2
        assert fast.stderr == slow.stderr and "TOML syntax" in fast.stderr
        assert state.read_bytes() == after_run  # nothing started
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)

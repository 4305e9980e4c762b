"""launch.bpf: a process's seccomp programs compiled once, kept in the service's state, and
loaded with seccomp(2) without libseccomp (the launch path's). Loaded in forked children on
the real kernel, as in test_seccomp, with the same probes."""

from __future__ import annotations

import errno
import json
import os
import platform
import resource
import stat
import subprocess
import sys
import traceback

import pytest

from corral.launch import bpf, seccomp
from corral.plan.sandbox import SeccompPlan
from test_seccomp import DANGEROUS, DEFAULT, SYS, dangerous_calls, syscall

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers"),
    pytest.mark.root,
]

NOTIFY = ("execve", "execveat")


def in_child_loaded(programs: bpf.Programs, body) -> tuple[int, object]:
    """body() in a forked child after bpf.load_all; (exit status, its JSON result, which
    also says what the listener descriptor is)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            listener = bpf.load_all(programs)
            out = {"listener": os.readlink(f"/proc/self/fd/{listener}") if listener >= 0
                   else None, "body": body()}
        except BaseException:  # noqa: BLE001 - report anything, never return into pytest
            out, code = {"exception": traceback.format_exc()}, 70
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as handle:
        data = handle.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(data)
    if "exception" in result:
        pytest.fail(f"child raised:\n{result['exception']}")
    return status, result


def probes() -> dict[str, object]:
    return {"dangerous": dangerous_calls(), "clone3": syscall(SYS["clone3"], 0, 0),
            "getppid": syscall(SYS["getppid"])[1]}


def test_loaded_from_the_cache_refuses_what_the_plan_refuses(tmp_path):
    cache = str(tmp_path / "seccomp" / "main.bpf")
    compiled = bpf.programs(DEFAULT, cache, notify=NOTIFY)
    cached = bpf.programs(DEFAULT, cache, notify=NOTIFY)
    assert cached == compiled
    status, result = in_child_loaded(cached, probes)
    assert os.waitstatus_to_exitcode(status) == 0
    body = result["body"]
    assert body["dangerous"] == {name: [-1, errno.EPERM] for name in DANGEROUS}
    assert body["clone3"] == [-1, errno.ENOSYS]  # the quiet filter's answer
    assert body["getppid"] == 0
    assert result["listener"] == "anon_inode:seccomp notify"  # the exec tripwire's listener


def test_the_programs_and_flags_are_libseccomps():
    """What launch loads is what libseccomp's own load would: its exported program, with the
    flags seccomp_load sets for these filters."""
    compiled = bpf.compile_plan(DEFAULT, notify=NOTIFY)
    filters = seccomp.build(DEFAULT, notify=NOTIFY)
    assert compiled.main.bpf == bpf._export(filters.main)
    assert compiled.quiet is not None and compiled.quiet.bpf == bpf._export(filters.quiet)
    assert compiled.main.flags == bpf.SECCOMP_FILTER_FLAG_LOG
    assert compiled.quiet.flags == bpf.SECCOMP_FILTER_FLAG_NEW_LISTENER
    assert bpf.compile_plan(DEFAULT, log=False).main.flags == 0
    assert bpf.compile_plan(DEFAULT).quiet.flags == 0  # ENOSYS only: no listener


CACHED_RUN = """import json, sys
from corral.launch import bpf
from corral.plan.sandbox import SeccompPlan, default_deny
progs = bpf.programs(SeccompPlan("deny-list", tuple(default_deny())), sys.argv[1],
                     notify=("execve", "execveat"))
print(json.dumps({"libseccomp": "pyseccomp" in sys.modules, "main": progs.main.bpf.hex()}))
"""


def test_a_second_start_reads_the_cache_without_libseccomp(tmp_path):
    cache = tmp_path / "seccomp" / "main.bpf"
    runs = [json.loads(subprocess.run([sys.executable, "-c", CACHED_RUN, str(cache)],
                                      capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]
    assert [run["libseccomp"] for run in runs] == [True, False]
    assert runs[0]["main"] == runs[1]["main"]
    mode = cache.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700


def test_a_changed_plan_is_compiled_anew(tmp_path):
    cache = str(tmp_path / "main.bpf")
    bpf.programs(DEFAULT, cache, notify=NOTIFY)
    other = SeccompPlan("deny-list", ("mount",))
    assert bpf.programs(other, cache, notify=NOTIFY) == bpf.compile_plan(other, notify=NOTIFY)
    assert bpf._read(cache, bpf.cache_key(other, True, NOTIFY)) is not None  # replaced
    assert bpf._read(cache, bpf.cache_key(DEFAULT, True, NOTIFY)) is None


@pytest.mark.parametrize("damage", ["flip a byte of the program", "cut the end", "no magic",
                                    "a symlink"])
def test_a_damaged_cache_is_never_loaded(tmp_path, damage):
    cache = tmp_path / "main.bpf"
    good = bpf.programs(DEFAULT, str(cache), notify=NOTIFY)
    data = cache.read_bytes()
    if damage == "flip a byte of the program":
        data = data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:]
        cache.write_bytes(data)
    elif damage == "cut the end":
        cache.write_bytes(data[:-8])
    elif damage == "no magic":
        cache.write_bytes(b"x" + data[1:])
    else:
        elsewhere = tmp_path / "elsewhere.bpf"
        elsewhere.write_bytes(data)
        cache.unlink()
        cache.symlink_to(elsewhere)
    key = bpf.cache_key(DEFAULT, True, NOTIFY)
    assert bpf._read(str(cache), key) is None
    assert bpf.programs(DEFAULT, str(cache), notify=NOTIFY) == good  # compiled again
    assert not cache.is_symlink() and bpf._read(str(cache), key) == good

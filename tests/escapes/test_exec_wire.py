"""Escapes through the exec wire (red team 2026-12-04, findings 1, 2 and 4; issue 16).

The exec check (seccomp user notification answered by the supervisor) must treat every
notification as hostile input:
- a path that is not UTF-8 used to crash the supervisor (a strict encode), which took the whole
  service down with no incident and discarded the delta;
- `/dev/fd/N`, `/dev/stdin` and `/proc//self/fd/N` with N open on ld.so passed the check: the
  supervisor resolved `/proc/self` as itself (another PID namespace: "no such file", allowed),
  then the kernel resolved it for the caller and ran the loader, which runs any ELF of the base;
- `execve(NULL)` (an unreadable path) made the supervisor close the listener, after which every
  exec failed with ENOSYS: no incident, no reaction, ever again.

Each hostile exec must be refused, leave the supervisor running and write an incident. Its own
service (port 8083): a crash here must not take the shared one down."""

from __future__ import annotations

import json
import time

import pytest

from .attack import blocked, returned, started

pytestmark = pytest.mark.root

LDSO = "/lib64/ld-linux-x86-64.so.2"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"

ATTACK = r'''
import time
LDSO, LIBC = PARAMS["ldso"], PARAMS["libc"]

def spawn_with_stdin(target, argv, stdin_fd):
    """spawn(), with stdin_fd as the child's fd 0."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stdin_fd, 0)
            os.dup2(out_w, 1)
            os.execve(target, argv, {})
        except OSError as exc:
            os.write(err_w, str(exc.errno).encode())
        finally:
            os._exit(127)
    os.close(err_w)
    os.close(out_w)
    err = os.read(err_r, 64)
    out = b""
    while chunk := os.read(out_r, 65536):
        out += chunk
    os.waitpid(pid, 0)
    if err:
        raise OSError(int(err), os.strerror(int(err)))
    return out.decode(errors="replace")[:80]

def gap():
    """Exec incidents of one process within 2 s join one record (a count): apart, each
    attempt leaves its own record, so the test can see how each was told."""
    time.sleep(2.2)

def ld_so_fd():
    fd = os.open(LDSO, os.O_RDONLY)
    os.set_inheritable(fd, True)
    return fd

@attempt("exec_missing_non_utf8_path")  # finding 1: used to end the supervisor
def _():
    return spawn(b"/nonexistent-\xff", [b"x"])

@attempt("exec_non_utf8_file_in_tmp")  # exists, not allowed: refused and recorded
def _():
    gap()
    path = b"/tmp/payload-\xff"
    with open(path, "wb") as handle:
        handle.write(b"#!/usr/bin/python3.11\n")
    os.chmod(path, 0o755)
    return spawn(path, [b"x"])

@attempt("exec_ld_so_through_dev_fd")  # finding 2
def _():
    gap()
    return spawn(f"/dev/fd/{ld_so_fd()}", [LDSO, LIBC])

@attempt("exec_ld_so_through_proc_double_slash_self_fd")
def _():
    gap()
    return spawn(f"/proc//self/fd/{ld_so_fd()}", [LDSO, LIBC])

@attempt("exec_ld_so_through_proc_self_dot_fd")
def _():
    gap()
    return spawn(f"/proc/self/./fd/{ld_so_fd()}", [LDSO, LIBC])

@attempt("exec_ld_so_through_dev_stdin")
def _():
    gap()
    return spawn_with_stdin("/dev/stdin", [LDSO, LIBC], ld_so_fd())

@attempt("exec_ld_so_relative_to_dev")
def _():
    gap()
    os.chdir("/dev")
    try:
        return spawn(f"fd/{ld_so_fd()}", [LDSO, LIBC])
    finally:
        os.chdir("/")

@attempt("execve_null")  # finding 4: an unreadable path
def _():
    gap()
    return syscall(59, None, None, None)

@attempt("exec_ld_so_after_execve_null")  # the wire must still be on
def _():
    gap()
    return spawn(LDSO, [LDSO, LIBC])

@attempt("exec_path_with_terminal_escapes")  # red team 13: a forged "no incidents"
def _():
    gap()
    path = "/tmp/\x1b[2K\r\x1b[1A\x1b]0;owned-title\x07no incidents\x1b[8m"
    with open(path, "w") as handle:  # a file that could run (a directory would fail anyway)
        handle.write("#!/usr/bin/python3.11\n")
    os.chmod(path, 0o755)
    return spawn(path, ["x"])

@attempt("exec_a_file_no_one_can_run")  # no x bit at all: EACCES for anybody, nothing to see
def _():
    gap()
    path = "/tmp/not-a-program"
    with open(path, "w") as handle:
        handle.write("#!/usr/bin/python3.11\n")
    os.chmod(path, 0o644)
    return spawn(path, ["x"])

@attempt("exec_python_still_allowed")  # and the one allowed program still runs
def _():
    return spawn("/usr/bin/python3.11", ["python3.11", "-I", "-c", "print('EXECUTED')"])
'''


@pytest.fixture(scope="module")
def wire(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8083,
                 volume="/srv/wire") as service:
        pid = service.app()["pid"]
        results = service.attack(ATTACK, {"ldso": LDSO, "libc": LIBC})
        yield service, results, pid


def exec_incidents(service) -> list[dict]:
    run = service.corral("incidents", service.name, "--json", check=True)
    return [i for i in json.loads(run.stdout)["incidents"] if i["tripwire"] == "exec"]


def test_the_supervisor_survives_every_hostile_exec(wire):
    service, _, pid = wire
    status = service.status()
    assert status["state"] == "running", status
    assert service.app()["pid"] == pid  # react = "log": the same process, nothing restarted
    assert service.serving()


def test_a_missing_non_utf8_path_is_just_missing(wire):
    _, results, _ = wire
    blocked(results, "exec_missing_non_utf8_path", "ENOENT")


def test_a_non_utf8_path_is_refused_and_recorded_escaped(wire):
    service, results, _ = wire
    blocked(results, "exec_non_utf8_file_in_tmp", "EPERM")
    paths = [i["detail"]["path"] for i in exec_incidents(service)]
    assert "/tmp/payload-\\xff" in paths, paths


def test_a_file_no_one_can_run_is_answered_eacces_without_an_incident(wire):
    """The kernel refuses it whoever asks (no x bit: not even CAP_DAC_OVERRIDE runs it), so the
    wire answers EACCES itself: no incident, and no revert racing the caller's own error."""
    service, results, _ = wire
    blocked(results, "exec_a_file_no_one_can_run", "EACCES")
    assert "/tmp/not-a-program" not in [i["detail"]["path"] for i in exec_incidents(service)]


@pytest.mark.parametrize("name", [
    "exec_ld_so_through_dev_fd",
    "exec_ld_so_through_proc_double_slash_self_fd",
    "exec_ld_so_through_proc_self_dot_fd",
    "exec_ld_so_through_dev_stdin",
    "exec_ld_so_relative_to_dev",
])
def test_ld_so_through_the_callers_own_fds_is_refused(wire, name):
    _, results, _ = wire
    blocked(results, name, "EPERM")


def test_the_fd_forms_are_recorded(wire):
    service, _, _ = wire
    paths = {i["detail"]["path"] or "" for i in exec_incidents(service)}
    for form in ("/dev/fd/", "/proc//self/fd/", "/proc/self/./fd/", "/dev/stdin", "fd/"):
        assert any(p.startswith(form) for p in paths), (form, paths)


def test_execve_null_is_refused_and_does_not_switch_the_wire_off(wire):
    service, results, _ = wire
    blocked(results, "execve_null", "EPERM")
    blocked(results, "exec_ld_so_after_execve_null", "EPERM")  # not ENOSYS
    assert returned(results, "exec_python_still_allowed").strip() == "EXECUTED"
    unreadable = [i for i in exec_incidents(service) if i["detail"].get("path") is None]
    assert unreadable and "unreadable" in unreadable[0]["detail"]["error"], unreadable


def test_exec_after_the_attack_still_trips_promptly(wire):
    service, _, _ = wire
    def seen() -> int:  # a repeat within 2 s joins the last record: count them all
        return sum(i.get("count", 1) for i in exec_incidents(service))

    before = seen()
    results = service.attack('@attempt("again")\ndef _():\n    return spawn(PARAMS["l"], '
                             '[PARAMS["l"], "--version"])\n', {"l": LDSO})
    blocked(results, "again", "EPERM")
    deadline = time.time() + 5
    while seen() <= before and time.time() < deadline:
        time.sleep(0.1)
    assert seen() > before


def test_terminal_escapes_in_a_path_never_reach_the_terminal(wire):
    service, results, _ = wire
    blocked(results, "exec_path_with_terminal_escapes", "EPERM")
    text = service.corral("incidents", service.name, check=True).stdout
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "/tmp/\\x1b[2K\\x0d\\x1b[1A" in text, text

"""Escapes towards ANOTHER service on the same host: a second sample service (its own user,
volume /srv/secret and port 8081) in the same CORRAL_ROOT and network namespace. The first
service's process must not see or reach its files, processes, IPC objects, sockets or port."""

from __future__ import annotations

import secrets
import select
import subprocess

import pytest

from .attack import CORRAL, alive, blocked, file_state, started

pytestmark = pytest.mark.root

SECRET = "the neighbour's secret " + secrets.token_hex(8)
SHM_KEY = 0x5EC2E7
ABSTRACT = "corral-neighbour-" + secrets.token_hex(4)

# Run inside the neighbour: IPC objects and a listening abstract socket, kept while it sleeps.
NEIGHBOUR_HOLDS = rf'''
import ctypes, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget({SHM_KEY}, 4096, 0o1666) >= 0  # IPC_CREAT | 0666
open("/dev/shm/secret", "w").write("{SECRET}")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\0{ABSTRACT}")
s.listen()
print("READY", flush=True)
time.sleep(30)
'''

ATTACK = r'''
N = PARAMS

@attempt("read_volume_by_its_path")
def _():
    return open("/srv/secret/notes.jsonl").read()

@attempt("read_volume_by_its_host_path")
def _():
    return open(N["volume_file"]).read()

@attempt("write_volume_by_its_host_path")
def _():
    return open(N["volume_file"], "a").write("forged\n")

@attempt("list_its_state_dir")
def _():
    return os.listdir(N["state_dir"])

@attempt("its_proc_entry")
def _():
    return os.listdir(f"/proc/{N['pid']}")

@attempt("kill_its_program")
def _():
    return os.kill(N["pid"], 9)

@attempt("pidfd_open_its_program")
def _():
    return os.pidfd_open(N["pid"])

@attempt("connect_its_port")
def _():
    with socket.create_connection(("127.0.0.1", N["port"]), timeout=3) as s:
        s.sendall(b"GET /notes HTTP/1.0\r\n\r\n")
        return s.recv(4096).decode(errors="replace")

@attempt("connect_its_abstract_socket")
def _():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(b"\0" + N["abstract"].encode())
        return "connected"

@attempt("attach_its_sysv_shared_memory")
def _():
    ctypes.set_errno(0)
    ident = _libc.shmget(N["shm_key"], 0, 0)
    if ident < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ident

@attempt("read_its_dev_shm")
def _():
    return open("/dev/shm/secret").read()
'''


@pytest.fixture(scope="module")
def neighbour(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8081,
                 volume="/srv/secret") as other:
        assert other.http("/notes", data=SECRET.encode()) == b"stored\n"
        yield other


@pytest.fixture(scope="module")
def attacked(svc, neighbour):
    volume_file = neighbour.state_dir / "volumes/srv-secret/notes.jsonl"
    neighbour.before = {"pid": neighbour.app()["pid"], "volume": file_state(volume_file)}
    holder = subprocess.Popen(
        neighbour.prefix() + CORRAL + ["exec", neighbour.name, "app", "--",
                                       "/usr/bin/python3.11", "-I", "-c", NEIGHBOUR_HOLDS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 15)
        line = holder.stdout.readline() if ready else ""
        assert line.strip() == "READY", f"neighbour's holder: {line} {holder.stderr.read()}"
        return svc.attack(ATTACK, params={
            "volume_file": str(volume_file), "state_dir": str(neighbour.state_dir),
            "pid": neighbour.before["pid"], "port": neighbour.port, "abstract": ABSTRACT,
            "shm_key": SHM_KEY})
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", ["read_volume_by_its_path", "read_volume_by_its_host_path",
                                  "write_volume_by_its_host_path", "list_its_state_dir",
                                  "read_its_dev_shm"])
def test_its_files_do_not_exist(attacked, name):
    blocked(attacked, name, "ENOENT")


def test_its_volume_is_unchanged(attacked, neighbour):
    volume_file = neighbour.state_dir / "volumes/srv-secret/notes.jsonl"
    assert file_state(volume_file) == neighbour.before["volume"]
    assert SECRET.encode() in neighbour.http("/notes")


@pytest.mark.parametrize("name, expected", [("its_proc_entry", "ENOENT"),
                                            ("kill_its_program", "ESRCH"),
                                            ("pidfd_open_its_program", "ESRCH")])
def test_its_processes_are_invisible(attacked, neighbour, name, expected):
    blocked(attacked, name, expected)
    assert alive(neighbour.before["pid"]) and neighbour.app()["pid"] == neighbour.before["pid"]


def test_its_port_is_unreachable(attacked):
    blocked(attacked, "connect_its_port", "EACCES")  # Landlock: only declared TCP ports


def test_its_abstract_socket_is_unreachable(attacked):
    # Same network namespace, so the same abstract names: Landlock's scope must refuse it.
    blocked(attacked, "connect_its_abstract_socket", "EPERM")


def test_its_ipc_objects_are_invisible(attacked):
    blocked(attacked, "attach_its_sysv_shared_memory", "ENOENT")  # another IPC namespace

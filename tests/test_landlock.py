"""Landlock on the real kernel.

Landlock cannot be undone, so every case restricts a forked child, never the test runner: the
child reports a JSON dict through a pipe and always leaves with os._exit. Everything the child
uses after `restrict` is imported here first (an import after it could not read its source).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import tempfile
import traceback
from pathlib import Path

import pytest

from corral.launch import landlock
from corral.plan.sandbox import LandlockPlan

ABI = landlock.abi_version()
INTERP = "/lib64/ld-linux-x86-64.so.2"  # PT_INTERP of Debian's x86_64 binaries
LIB_DIRS = ("/usr/lib", "/lib", "/lib64", "/usr/lib64")
NOBODY = 65534
needs_landlock = pytest.mark.skipif(ABI == 0, reason="Landlock is unavailable on this kernel")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setresuid, unshare)")
_libc = ctypes.CDLL(None, use_errno=True)


def in_child(body) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            signal.alarm(30)  # a hung child must not hang the suite
            try:
                out = {"result": body()}
            except BaseException:  # noqa: BLE001 - reported to the parent
                out = {"error": traceback.format_exc()}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"child died without reporting (wait status {status:#x})"
    out = json.loads(data)
    if "error" in out:
        pytest.fail("in the child:\n" + out["error"])
    return out["result"]


def attempt(fn, *args) -> str:
    """'ok' or the errno name of the OSError."""
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def run(path: str) -> str:
    """Execute `path` (no arguments): 'ok', the execve errno name, or the exit status."""
    try:
        pid = os.posix_spawn(path, [path], {})  # glibc reports a failed execve as the error
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return "ok" if code == 0 else f"exit {code}"


def read(path) -> None:
    with open(path, "rb") as f:
        f.read()


def append(path) -> None:
    with open(path, "ab") as f:
        f.write(b"x")


def no_new_privs() -> int:
    return _libc.prctl(ctypes.c_int(39), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0))


def plan(read_exec=(), read_only=(), read_write=(), tcp_bind=(), tcp_connect=(), **kw):
    return LandlockPlan(tuple(map(str, read_exec)), tuple(map(str, read_only)),
                        tuple(map(str, read_write)), tuple(tcp_bind), tuple(tcp_connect), **kw)


def make_tree(base: Path) -> Path:
    """bin/ (copies of true and cat), data/ (rw), ro/ (read only), secret/ (not granted)."""
    for d in ("bin", "data", "ro", "secret"):
        (base / d).mkdir()
        os.chmod(base / d, 0o755)  # whatever the umask: the unprivileged case walks these
        (base / d / "file").write_text("x\n")
        os.chmod(base / d / "file", 0o644)  # DAC lets anyone read: a denial is Landlock's
    (base / "secret" / "writable").write_text("")  # a single file granted read-write
    shutil.copy2("/bin/true", base / "bin" / "true")
    shutil.copy2("/bin/cat", base / "bin" / "cat")
    shutil.copy2("/bin/true", base / "data" / "true")  # written there: must not be executable
    return base


def tree_plan(t: Path) -> LandlockPlan:
    return plan(read_exec=[t / "bin/true"], read_only=[t / "bin", t / "ro", *LIB_DIRS],
                read_write=[t / "data", t / "secret/writable", "/nonexistent/optional"])


def fs_checks(t: Path) -> dict:
    return {
        "exec true": run(str(t / "bin/true")),
        "exec cat": run(str(t / "bin/cat")),  # readable, not in read_exec
        "read cat": attempt(read, t / "bin/cat"),
        "exec from data": run(str(t / "data/true")),
        "read secret": attempt(read, t / "secret/file"),
        "list secret": attempt(os.listdir, t / "secret"),
        "write secret/writable": attempt(append, t / "secret/writable"),
        "read ro": attempt(read, t / "ro/file"),
        "list ro": attempt(os.listdir, t / "ro"),
        "write ro": attempt(append, t / "ro/file"),
        "truncate ro": attempt(os.truncate, t / "ro/file", 0),
        "create in ro": attempt(append, t / "ro/new"),
        "unlink in ro": attempt(os.unlink, t / "ro/file"),
        "write data": attempt(append, t / "data/file"),
        "create in data": attempt(append, t / "data/new"),
        "mkdir in data": attempt(os.mkdir, t / "data/sub"),
        "rename within data": attempt(os.rename, t / "data/new", t / "data/sub/new"),
        "rename data to ro": attempt(os.rename, t / "data/sub/new", t / "ro/moved"),
        "read /etc/shadow": attempt(read, "/etc/shadow"),
    }


FS_EXPECTED = {
    "exec true": "ok", "exec cat": "EACCES", "read cat": "ok", "exec from data": "EACCES",
    "read secret": "EACCES", "list secret": "EACCES", "write secret/writable": "ok",
    "read ro": "ok", "list ro": "ok", "write ro": "EACCES", "truncate ro": "EACCES",
    "create in ro": "EACCES", "unlink in ro": "EACCES", "write data": "ok",
    "create in data": "ok", "mkdir in data": "ok", "rename within data": "ok",
    # the destination lacks MAKE_REG, so EACCES (EXDEV is only for a missing REFER)
    "rename data to ro": "EACCES", "read /etc/shadow": "EACCES",
}


# -- pure parts ------------------------------------------------------------------------------
def test_abi_available_here():
    assert ABI > 0, "this machine's kernel should have Landlock enabled"
    assert landlock.describe_abi().startswith(f"landlock ABI {ABI}: enforced")


def test_rights_and_degradation_by_abi():
    assert landlock.fs_rights(1) == (1 << 13) - 1
    assert landlock.fs_rights(2) == landlock.fs_rights(1) | landlock.REFER
    assert (landlock.fs_rights(4) == landlock.fs_rights(3)
            == landlock.fs_rights(2) | landlock.TRUNCATE)
    assert landlock.fs_rights(6) == landlock.fs_rights(5) == (1 << 16) - 1
    assert landlock.probe(0) == landlock.LandlockStatus(0, False, (
        "filesystem rules (ABI 1)", "rename/link across directories (ABI 2)",
        "truncate control (ABI 3)", "tcp port rules (ABI 4)", "device ioctl control (ABI 5)",
        "scoping (ABI 6)", "audit of refusals (ABI 7)"))
    assert landlock.probe(5).degraded == ("scoping (ABI 6)", "audit of refusals (ABI 7)")
    assert landlock.probe(7).degraded == ()
    assert "unknown to corral" in landlock.probe(99).degraded[0]


def test_describe():
    d = landlock.describe
    assert d(landlock.LandlockStatus(6, True, ())) == "landlock ABI 6: enforced"
    assert d(landlock.probe(0)) == "landlock unavailable: not enforced"
    assert d(landlock.probe(3)) == ("landlock ABI 3: enforced (without tcp port rules (ABI 4), "
                                    "device ioctl control (ABI 5), scoping (ABI 6), "
                                    "audit of refusals (ABI 7))")


# -- filesystem ------------------------------------------------------------------------------
@needs_landlock
def test_filesystem_rules_as_root(tmp_path):
    t = make_tree(tmp_path)

    def body():
        status = landlock.restrict(tree_plan(t), extra_read_exec=[INTERP])
        return {"status": [status.abi, status.enforced], "nnp": no_new_privs(), **fs_checks(t)}

    result = in_child(body)
    assert result.pop("status") == [ABI, True]
    assert result.pop("nnp") == 1
    assert result == FS_EXPECTED


@needs_landlock
@pytest.mark.parametrize("abi", [1, 2, 3, 5])
def test_best_effort_on_older_abi(tmp_path, monkeypatch, abi):
    """The ruleset an older kernel would get (shorter attr struct, fewer rights) is accepted
    here too, and what it leaves out is exactly what the ABI table says."""
    t = make_tree(tmp_path)
    monkeypatch.setattr(landlock, "abi_version", lambda: abi)

    def body():
        status = landlock.restrict(tree_plan(t), extra_read_exec=[INTERP])
        return {"degraded": list(status.degraded), **fs_checks(t)}

    result = in_child(body)
    assert result.pop("degraded") == list(landlock.probe(abi).degraded)
    expected = dict(FS_EXPECTED)
    if abi < 2:  # REFER not handled: Landlock then refuses every reparenting rename
        expected["rename within data"] = "EXDEV"
        expected["rename data to ro"] = "ENOENT"  # the file never reached data/sub
    if abi < 3:  # TRUNCATE not handled: truncate(2) is not Landlock's to refuse
        expected["truncate ro"] = "ok"
    assert result == expected


@pytest.fixture
def public_tree():
    """The tree where uid 65534 can reach it (tmp_path's parents are root's, mode 0700)."""
    base = Path(tempfile.mkdtemp(prefix="corral-landlock-"))
    try:
        os.chmod(base, 0o755)
        make_tree(base)
        for d in ("data", "ro", "secret"):  # DAC allows nobody everything here
            for p in [base / d, *(base / d).iterdir()]:
                os.chown(p, NOBODY, NOBODY)
        yield base
    finally:
        shutil.rmtree(base)


@needs_landlock
@needs_root
def test_filesystem_rules_unprivileged(public_tree):
    """As nobody, without CAP_SYS_ADMIN: restrict must set no_new_privs itself."""
    t = public_tree

    def body():
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        before = no_new_privs()
        landlock.restrict(tree_plan(t), extra_read_exec=[INTERP])
        return {"nnp": [before, no_new_privs()], **fs_checks(t)}

    result = in_child(body)
    assert result.pop("nnp") == [0, 1]
    assert result == FS_EXPECTED


@needs_landlock
def test_elf_interpreter_needs_execute(tmp_path):
    """execve opens PT_INTERP like the program itself (open_exec): it needs EXECUTE. The
    libraries are only mmap'ed PROT_EXEC by ld.so, which Landlock does not check: READ_FILE."""
    t = make_tree(tmp_path)
    true = str(t / "bin/true")

    def body(extra, read_only):
        def child():
            landlock.restrict(plan(read_exec=[true], read_only=read_only), extra_read_exec=extra)
            return run(true)
        return child

    assert in_child(body([INTERP], LIB_DIRS)) == "ok"
    assert in_child(body([], LIB_DIRS)) == "EACCES"  # the interpreter readable, not executable
    assert in_child(body([INTERP], [])) == "exit 127"  # ld.so starts, cannot read libc


@needs_landlock
def test_path_errors(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")

    def body(p):
        def child():
            try:
                landlock.restrict(p)
            except (OSError, ValueError) as e:
                return [type(e).__name__, getattr(e, "errno", None), str(e)]
            return "restricted"
        return child

    name, err, msg = in_child(body(plan(read_only=[tmp_path / "loop"])))
    assert (name, err) == ("OSError", errno.ELOOP) and str(tmp_path / "loop") in msg
    name, _, msg = in_child(body(plan(read_only=["relative/path"])))
    assert name == "ValueError" and "not absolute" in msg
    name, _, msg = in_child(body(plan(scoped=("bogus",))))
    assert name == "ValueError" and "bogus" in msg


@needs_landlock
@needs_root
def test_unopenable_path_is_an_error(tmp_path):
    """It exists, but nobody cannot search its parent (pytest's tmp dirs are mode 0700)."""
    secret = tmp_path / "file"
    secret.write_text("")

    def body():
        os.setresuid(NOBODY, NOBODY, NOBODY)
        try:
            landlock.restrict(plan(read_only=[secret]))
        except OSError as e:
            return [e.errno, str(e)]
        return "restricted"

    err, msg = in_child(body)
    # The cause is the file's mode, not Landlock: the message says so and how to fix it.
    assert err == errno.EACCES and f"{secret}: Permission denied for uid {NOBODY}" in msg
    assert "a file mode or owner in the image (not Landlock)" in msg


def test_unavailable_landlock_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)

    def body():
        s = landlock.restrict(plan(read_only=["/usr"]))
        return [s.abi, s.enforced, attempt(read, "/etc/hostname"), no_new_privs()]

    assert in_child(body) == [0, False, "ok", 1]


# -- network (ABI 4) ---------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _fresh_netns() -> None:
    """A network namespace of the child's own, with lo up: no port of the host is touched."""
    if _libc.unshare(ctypes.c_int(CLONE_NEWNET)) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


@pytest.mark.skipif(ABI < 4, reason=f"TCP port rules need Landlock ABI 4 (kernel has {ABI})")
@needs_root
def test_tcp_port_rules():
    BIND, CONNECT, OTHER = 4100, 4101, 4102

    def bind(family, host, port):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((host, port))
        s.listen()  # kept open (leaked until exit) so the port stays taken

    def connect(port):
        with socket.socket() as s:
            s.connect(("127.0.0.1", port))

    def udp_bind(port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))

    def body():
        _fresh_netns()
        landlock.restrict(plan(tcp_bind=[BIND], tcp_connect=[CONNECT]))
        return {
            "bind granted": attempt(bind, socket.AF_INET, "127.0.0.1", BIND),
            "bind other": attempt(bind, socket.AF_INET, "127.0.0.1", OTHER),
            "bind ephemeral": attempt(bind, socket.AF_INET, "127.0.0.1", 0),
            "bind6 granted": attempt(bind, socket.AF_INET6, "::1", BIND),
            "bind6 other": attempt(bind, socket.AF_INET6, "::1", OTHER),
            "connect granted": attempt(connect, CONNECT),
            "connect listening, ungranted": attempt(connect, BIND),
            "connect other": attempt(connect, OTHER),
            "udp bind": attempt(udp_bind, OTHER),  # Landlock (ABI < 10) does not handle UDP
        }

    assert in_child(body) == {
        "bind granted": "ok", "bind other": "EACCES", "bind ephemeral": "EACCES",
        "bind6 granted": "ok", "bind6 other": "EACCES",
        "connect granted": "ECONNREFUSED", "connect listening, ungranted": "EACCES",
        "connect other": "EACCES", "udp bind": "ok",
    }


# -- scoping (ABI 6) ---------------------------------------------------------------------------
@pytest.mark.skipif(ABI < 6, reason=f"scoping needs Landlock ABI 6 (kernel has {ABI})")
def test_scoping():
    name = f"\0corral-landlock-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(name)  # abstract: no file, so filesystem rules cannot protect it
        server.listen(8)

        def connect():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(name)

        def body(scoped):
            def child():
                before = [attempt(connect), attempt(os.kill, os.getppid(), 0)]
                landlock.restrict(plan(scoped=scoped))
                inner = os.fork()  # same domain: signals to it stay allowed
                if inner == 0:
                    signal.pause()
                    os._exit(0)
                after = [attempt(connect), attempt(os.kill, os.getppid(), 0),
                         attempt(os.kill, inner, 0)]
                os.kill(inner, signal.SIGKILL)
                os.waitpid(inner, 0)
                return {"before": before, "after": after}
            return child

        scoped = in_child(body(("abstract-unix-socket", "signal")))
        assert scoped == {"before": ["ok", "ok"], "after": ["EPERM", "EPERM", "ok"]}
        unscoped = in_child(body(()))  # the control: the denials come from the scope flags
        assert unscoped == {"before": ["ok", "ok"], "after": ["ok", "ok", "ok"]}
    finally:
        server.close()


def test_landlock_prctl_numbers_are_the_kernel_modules():
    """landlock repeats two prctl numbers so its import needs no ctypes; they must agree."""
    from corral.kernel import syscalls
    from corral.launch import landlock as ll

    assert (ll.PR_SET_NO_NEW_PRIVS, ll.PR_GET_NO_NEW_PRIVS) == \
        (syscalls.PR_SET_NO_NEW_PRIVS, syscalls.PR_GET_NO_NEW_PRIVS)


def _mount_tree() -> Path:
    """In the calling child's own mount namespace: a tmpfs with ro/ (a read-only bind mount of
    itself, nothing below), mixed/ (read-only, with a writable tmpfs at mixed/rw) and rw/."""
    from corral.kernel import syscalls as k

    k.unshare(k.CLONE_NEWNS)
    k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
    base = Path(tempfile.mkdtemp(prefix="corral-test-ll-"))
    k.mount("tmpfs", str(base), "tmpfs")
    for d in ("ro", "mixed", "mixed/rw", "rw"):
        (base / d).mkdir()
    for d in ("ro", "mixed", "mixed/rw", "rw"):
        (base / d / "file").write_text("x\n")
    for d in ("ro", "mixed"):
        k.mount(str(base / d), str(base / d), None, k.MS_BIND)
        k.mount(None, str(base / d), None, k.MS_BIND | k.MS_REMOUNT | k.MS_RDONLY)
    k.mount("tmpfs", str(base / "mixed/rw"), "tmpfs")
    (base / "mixed/rw/file").write_text("x\n")
    return base


@needs_landlock
@needs_root
@pytest.mark.skipif(ABI < 3, reason="TRUNCATE is ABI 3")
def test_truncate_is_added_only_where_every_mount_beneath_is_read_only():
    """Landlock asks for TRUNCATE at every open (kept with the file for ftruncate): a read-only
    rule without it lets each open walk to the root. It is added only where the kernel refuses
    any truncate anyway (EROFS), never above a writable mount."""
    def body():
        base = _mount_tree()
        moot = landlock._moot_truncate(landlock.fs_rights(ABI))
        verdicts = {}
        for name in ("ro", "ro/file", "mixed", "mixed/file", "mixed/rw", "rw", "rw/file"):
            fd = os.open(base / name, os.O_PATH | os.O_CLOEXEC)
            verdicts[name] = moot(fd)
            os.close(fd)
        landlock.restrict(plan(read_only=[base / "ro", base / "mixed", base / "rw", *LIB_DIRS]))
        walls = {name: attempt(os.truncate, base / name / "file", 0)
                 for name in ("ro", "mixed", "mixed/rw", "rw")}
        return {"verdicts": verdicts, "walls": walls,
                "without TRUNCATE handled": landlock._moot_truncate(
                    landlock.fs_rights(ABI) & ~landlock.TRUNCATE) is None}

    out = in_child(body)
    # mixed/file is on the read-only mount and has nothing mounted below it
    assert out["verdicts"] == {"ro": True, "ro/file": True, "mixed": False, "mixed/file": True,
                               "mixed/rw": False, "rw": False, "rw/file": False}
    # The read-only mounts refuse before Landlock is asked; the writable ones are still
    # Landlock's to refuse, below a read-only parent's rule too.
    assert out["walls"] == {"ro": "EROFS", "mixed": "EROFS", "mixed/rw": "EACCES",
                            "rw": "EACCES"}
    assert out["without TRUNCATE handled"]

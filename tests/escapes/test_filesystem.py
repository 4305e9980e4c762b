"""Escapes through the file system: host files, chroot and /proc roots, mounts, the base image,
executing anything but the service's interpreter, device nodes, setuid files.

All attempts run in ONE `corral exec` (ATTACK below, run once per module); each is asserted by
its own test, and the host is checked where the attempt would have changed it."""

from __future__ import annotations

import os
import secrets
import stat

import pytest

from .attack import blocked, diff_trees, file_state, returned, started, tree_state

pytestmark = pytest.mark.root

TOKEN = "corral-escape-" + secrets.token_hex(4)  # names the attacker's mount, to look for it

ATTACK = r'''
import resource, shutil, stat

# ---- reading the host's files ----------------------------------------------------------------
@attempt("read_host_etc_shadow")
def _():
    return open("/etc/shadow").read()

@attempt("list_host_root_home")
def _():
    return os.listdir("/root")

@attempt("open_host_path_of_own_state")  # where the host keeps this very service
def _():
    return os.listdir(PARAMS["state_dir"])

@attempt("passwd_users")
def _():
    return [line.split(":")[0] for line in open("/etc/passwd")]

@attempt("read_shadow_through_proc_1_root")
def _():
    return open("/proc/1/root/etc/shadow").read()

@attempt("read_shadow_through_proc_self_root_dotdot")
def _():
    return open("/proc/self/root/../../../../etc/shadow").read()

# ---- chroot and friends -----------------------------------------------------------------------
@attempt("chroot_deeper_then_climb")
def _():
    os.makedirs("/tmp/jail", exist_ok=True)
    os.chroot("/tmp/jail")  # the classic: chroot below the cwd, climb out with .., chroot there
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    return os.listdir("/")

@attempt("climb_dotdot_above_root")
def _():
    os.chdir("/tmp")
    for _ in range(64):
        os.chdir("..")
    here, top = os.stat("."), os.stat("/")
    os.chdir("/")
    if (here.st_dev, here.st_ino) != (top.st_dev, top.st_ino):
        return "climbed above the root"
    return open("/tmp/../../../etc/shadow").read()

@attempt("tmp_parent_is_the_root")
def _():
    # /tmp is a bind mount of a directory of the delta's file system (empty in the image):
    # its ".." is the root's, by path and by descriptor, never the delta's upper directory.
    fd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = [os.stat("/tmp/.."), os.stat("..", dir_fd=fd), os.stat("/")]
    finally:
        os.close(fd)
    return len({(st.st_dev, st.st_ino) for st in seen}) == 1 and os.stat("/tmp").st_dev != \
        seen[0].st_dev  # and /tmp a mount of its own (else this proved nothing)

@attempt("fchdir_to_inherited_directory_fds")
def _():
    found = {}
    for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]):
        try:
            os.fchdir(fd)
        except OSError:
            continue
        found[fd] = os.listdir(".")
        os.chdir("/")
    return found  # fds that are directories: a way out if one is outside the root

@attempt("fchdir_to_proc_1_cwd")
def _():
    fd = os.open("/proc/1/cwd", os.O_RDONLY | os.O_DIRECTORY)
    os.fchdir(fd)
    return os.listdir(".")

# ---- mounts -----------------------------------------------------------------------------------
@attempt("mount_tmpfs")
def _():
    return syscall(165, PARAMS["token"].encode(), b"/tmp", b"tmpfs", 0, None)

@attempt("unmount_proc")
def _():
    return syscall(166, b"/proc", 2)  # umount2(MNT_DETACH)

@attempt("open_tree_clone_root")  # the new mount API: clone a mount to move it elsewhere
def _():
    return syscall(428, -100, b"/", 1)  # open_tree(AT_FDCWD, "/", OPEN_TREE_CLONE)

@attempt("fsopen_new_filesystem")
def _():
    return syscall(430, b"tmpfs", 0)

@attempt("pivot_root")
def _():
    return syscall(155, b"/tmp", b"/tmp")

@attempt("mountinfo")
def _():
    return open("/proc/self/mountinfo").read()

# ---- trojaning the base -----------------------------------------------------------------------
@attempt("write_python_binary")
def _():
    return open("/usr/bin/python3.11", "r+b").write(b"\x7fELF")

@attempt("write_python_through_proc_self_exe")
def _():
    return open("/proc/self/exe", "r+b").write(b"\x7fELF")

@attempt("replace_python_by_rename")
def _():
    with open("/tmp/evil-python", "wb") as out:
        out.write(b"#!/tmp/evil\n")
    try:
        os.rename("/tmp/evil-python", "/usr/bin/python3.11")
    finally:
        if os.path.exists("/tmp/evil-python"):
            os.unlink("/tmp/evil-python")

@attempt("unlink_python")
def _():
    return os.unlink("/usr/bin/python3.11")

@attempt("setuid_bit_on_python")
def _():
    return os.chmod("/usr/bin/python3.11", 0o4755)

@attempt("backdate_python")
def _():
    return os.utime("/usr/bin/python3.11", (0, 0))

@attempt("trojan_stdlib_module")
def _():
    return open("/usr/lib/python3.11/os.py", "a").write("\nimport evil\n")

@attempt("plant_sitecustomize")
def _():
    return open("/etc/python3.11/sitecustomize.py", "a").write("\nimport evil\n")

@attempt("plant_ld_so_preload")
def _():
    return open("/etc/ld.so.preload", "w").write("/tmp/evil.so\n")

@attempt("write_outside_writable_paths")
def _():
    return open("/opt/evil", "w").write("x")

@attempt("hardlink_python_into_tmp")
def _():
    return os.link("/usr/bin/python3.11", "/tmp/python-link")

# ---- executing anything but python3.11 ---------------------------------------------------------
COPIES = {}
for where in ("/tmp", "/srv/notes", "/dev/shm"):
    path = where + "/python-copy"
    shutil.copy("/usr/bin/python3.11", path)
    os.chmod(path, 0o755)
    COPIES[where] = path

PRINT = ["-I", "-c", "print('EXECUTED')"]

@attempt("exec_python_copy_in_tmp")
def _():
    return run_program([COPIES["/tmp"]] + PRINT)

@attempt("exec_python_copy_in_volume")
def _():
    return run_program([COPIES["/srv/notes"]] + PRINT)

@attempt("exec_python_copy_in_dev_shm")
def _():
    return run_program([COPIES["/dev/shm"]] + PRINT)

@attempt("exec_script_in_tmp")
def _():
    with open("/tmp/script.py", "w") as out:
        out.write("#!/usr/bin/python3.11\nprint('EXECUTED')\n")
    os.chmod("/tmp/script.py", 0o755)
    return run_program(["/tmp/script.py"])

@attempt("exec_shared_library")  # libc.so.6 is an executable too
def _():
    return run_program(["/usr/lib/x86_64-linux-gnu/libc.so.6"])

LDSO = "/lib64/ld-linux-x86-64.so.2"

@attempt("exec_copy_through_ld_so_from_volume")
def _():
    return run_program([LDSO, COPIES["/srv/notes"]] + PRINT)

@attempt("exec_copy_through_ld_so_from_tmp")
def _():
    return run_program([LDSO, COPIES["/tmp"]] + PRINT)

@attempt("exec_copy_from_memfd")
def _():
    fd = os.memfd_create("python-copy", 0)
    with open("/usr/bin/python3.11", "rb") as src:
        os.write(fd, src.read())
    try:
        return run_program([f"/proc/self/fd/{fd}"] + PRINT, pass_fds=[fd])
    finally:
        os.close(fd)

@attempt("exec_ld_so_through_proc_self_root")  # the same loader, named through /proc
def _():
    return spawn("/proc/self/root" + LDSO, [LDSO, COPIES["/tmp"]] + PRINT)

@attempt("exec_memfd_by_fd")  # fexecve: execveat(fd, "", AT_EMPTY_PATH)
def _():
    fd = os.memfd_create("python-copy", 0)
    with open("/usr/bin/python3.11", "rb") as src:
        os.write(fd, src.read())
    try:
        return spawn(fd, ["python-copy"] + PRINT)
    finally:
        os.close(fd)

class RaceLost(Exception):
    pass

@attempt("exec_check_race_symlink_swap")
def _():
    # The exec check looks at the path before the kernel does: flip a symlink between the
    # allowed interpreter and the loader, hoping the check sees one and the kernel the other.
    import threading, time
    link, stop = "/tmp/race-link", []
    def flip():
        targets, i = ("/usr/bin/python3.11", LDSO), 0
        while not stop:
            os.symlink(targets[i % 2], link + ".new")
            os.rename(link + ".new", link)
            i += 1
    os.symlink("/usr/bin/python3.11", link)
    flipper = threading.Thread(target=flip)
    flipper.start()
    tries, seen, deadline = 0, {}, time.time() + 5
    try:
        while time.time() < deadline:
            tries += 1
            try:
                out = spawn(link, [link, COPIES["/tmp"]] + PRINT)
            except ExecFailed:
                seen["ran python3.11 (harmless)"] = seen.get("ran python3.11 (harmless)", 0) + 1
                continue
            except OSError as exc:
                seen[errname(exc)] = seen.get(errname(exc), 0) + 1
                continue
            if "EXECUTED" in out:
                return f"ran the copy through the loader after {tries} tries ({seen})"
    finally:
        stop.append(True)
        flipper.join()
        os.unlink(link)
    raise RaceLost(f"{tries} tries: {seen}")

for path in COPIES.values():
    os.unlink(path)
for name in ("/tmp/script.py",):
    if os.path.exists(name):
        os.unlink(name)

# ---- sharp objects and privileges in the root ----------------------------------------------------
@attempt("sharp_objects")
def _():
    seen = {}
    for path in PARAMS["sharp"]:
        try:
            os.lstat(path)
            seen[path] = "present"
        except OSError as exc:
            seen[path] = errname(exc)
    return seen

@attempt("setuid_or_setgid_files")
def _():
    found = []
    for top in ("/usr", "/usr/lib", "/usr/lib64", "/usr/bin", "/usr/sbin", "/usr/local", "/lib",
                "/lib64", "/etc", "/opt", "/srv", "/tmp", "/dev", "/var", "/bin", "/sbin"):
        for parent, dirs, files in os.walk(top):  # what it cannot list, it cannot reach by name
            for name in dirs + files:
                try:
                    mode = os.lstat(os.path.join(parent, name)).st_mode
                except OSError:
                    continue
                if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(mode):
                    found.append(os.path.join(parent, name))
    return found

# ---- device nodes --------------------------------------------------------------------------------
@attempt("dev_nodes")
def _():
    nodes = {}
    for name in os.listdir("/dev"):
        mode = os.lstat("/dev/" + name).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            nodes[name] = "chr" if stat.S_ISCHR(mode) else "blk"
    return nodes

@attempt("open_host_devices")
def _():
    seen = {}
    for path in PARAMS["devices"]:
        try:
            os.close(os.open(path, os.O_RDONLY))
            seen[path] = "opened"
        except OSError as exc:
            seen[path] = errname(exc)
    return seen

@attempt("mknod_dev_mem")
def _():
    return os.mknod("/tmp/mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))

@attempt("mknod_disk")
def _():
    return os.mknod("/tmp/disk", stat.S_IFBLK | 0o600, os.makedev(254, 0))

@attempt("create_file_in_dev")
def _():
    return open("/dev/evil", "w")

@attempt("sys_is_absent")
def _():
    return os.listdir("/sys")
'''

SHARP = ["/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/sh", "/usr/bin/bash", "/bin/busybox",
         "/usr/bin/gcc", "/usr/bin/cc", "/usr/bin/ld", "/usr/bin/as", "/usr/bin/nc",
         "/bin/nc", "/usr/bin/ncat", "/usr/bin/socat", "/usr/bin/curl", "/usr/bin/wget",
         "/usr/bin/perl", "/usr/bin/env", "/usr/bin/python3", "/usr/bin/sudo", "/usr/bin/su",
         "/bin/su", "/usr/bin/mount", "/bin/mount", "/usr/bin/nsenter", "/usr/bin/unshare",
         "/usr/sbin/ip", "/sbin/ip", "/usr/sbin/nft", "/usr/bin/ssh", "/usr/sbin/chroot",
         "/usr/bin/newuidmap", "/usr/bin/pkexec", "/usr/bin/passwd", "/usr/sbin/insmod",
         "/usr/bin/strace", "/usr/bin/gdb"]
DEVICES = ["/dev/mem", "/dev/kmem", "/dev/port", "/dev/sda", "/dev/vda", "/dev/nvme0n1",
           "/dev/kmsg", "/dev/tty", "/dev/console", "/dev/ptmx", "/dev/fuse", "/dev/net/tun",
           "/dev/userfaultfd", "/dev/loop0", "/dev/loop-control", "/dev/mapper/control",
           "/dev/kvm", "/dev/cpu/0/msr", "/dev/snapshot", "/dev/dri/card0"]
EXPECTED_DEVICES = {"null", "zero", "full", "random", "urandom"}


def _mountinfo(pid: int | str) -> str:
    with open(f"/proc/{pid}/mountinfo") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def attacked(svc):
    """Run the attack once; the tests below read its outcomes."""
    app = svc.app()["pid"]
    svc.before = {"app_mounts": _mountinfo(app), "supervisor": svc.status()["supervisor"]}
    return svc.attack(ATTACK, params={"state_dir": str(svc.state_dir), "token": TOKEN,
                                      "sharp": SHARP, "devices": DEVICES})


# ---- reading the host's files

def test_host_etc_shadow_is_not_there(attacked):
    blocked(attacked, "read_host_etc_shadow", "ENOENT")


def test_host_root_home_is_not_there(attacked):
    blocked(attacked, "list_host_root_home", "ENOENT")


def test_host_paths_do_not_exist_inside(attacked):
    blocked(attacked, "open_host_path_of_own_state", "ENOENT")


def test_passwd_lists_only_root_and_the_service_user(attacked, svc):
    assert returned(attacked, "passwd_users") == ["root", svc.user]


def test_proc_1_root_is_not_a_way_out(attacked):
    # PID 1 is the service's own program (another Landlock domain): no access to its root.
    blocked(attacked, "read_shadow_through_proc_1_root", "EACCES")


def test_proc_self_root_dotdot_stays_inside(attacked):
    blocked(attacked, "read_shadow_through_proc_self_root_dotdot", "ENOENT")


# ---- chroot

def test_chroot_escape(attacked):
    blocked(attacked, "chroot_deeper_then_climb", "EPERM")


def test_dotdot_does_not_climb_above_the_root(attacked):
    blocked(attacked, "climb_dotdot_above_root", "ENOENT")


def test_the_parent_of_tmp_is_the_root(attacked):
    assert returned(attacked, "tmp_parent_is_the_root") is True


def test_no_inherited_directory_fd_to_fchdir_to(attacked):
    assert returned(attacked, "fchdir_to_inherited_directory_fds") == {}


def test_fchdir_to_another_process_cwd(attacked):
    blocked(attacked, "fchdir_to_proc_1_cwd", "EACCES")


# ---- mounts

@pytest.mark.parametrize("name", ["mount_tmpfs", "unmount_proc", "open_tree_clone_root",
                                  "fsopen_new_filesystem", "pivot_root"])
def test_mount_calls_are_refused(attacked, name):
    blocked(attacked, name, "EPERM")


def test_mount_tables_unchanged(attacked, svc):
    app = svc.app()["pid"]
    assert _mountinfo(app) == svc.before["app_mounts"]  # the service's own mount namespace
    for where in ("self", str(svc.before["supervisor"]), str(app)):
        assert TOKEN not in _mountinfo(where)
    with open("/proc/mounts") as handle:  # the host's (this test's) mount namespace
        assert TOKEN not in handle.read()


def test_mountinfo_shows_only_the_service_root(attacked):
    points = {line.split()[4] for line in returned(attacked, "mountinfo").splitlines()}
    from corral.launch.mnt import MASKED_DIRS, MASKED_FILES

    masked = {f"/proc/{name}" for name in MASKED_FILES + MASKED_DIRS  # those this kernel has
              if os.path.exists(f"/proc/{name}")}
    assert points == {"/", "/dev", "/dev/shm", "/srv/notes", "/proc", "/tmp"} | masked | {
        f"/dev/{name}" for name in EXPECTED_DEVICES}


def test_mountinfo_reveals_no_host_path(attacked, svc):
    text = returned(attacked, "mountinfo")
    for host_path in (str(svc.root), "/var/lib/corral", "/run/corral"):
        assert host_path not in text


def test_the_root_is_the_read_only_image_with_the_delta_only_where_it_writes(attacked):
    """launch.imageroot: "/" is the base's erofs image, read-only; the delta is only on /tmp
    (the process's one writable path besides its volume and /dev), which is empty in the
    image: a bind mount of the delta's own upper/tmp, one mount, nosuid, nodev, noexec."""
    kinds: dict[str, list[tuple[str, str, str]]] = {}
    for line in returned(attacked, "mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        kinds.setdefault(fields[4], []).append((right.split()[0], fields[5], fields[3]))
    fstype, options, _ = kinds["/"][0]
    assert fstype == "erofs" and "ro" in options.split(",")
    assert len(kinds["/tmp"]) == 1
    fstype, options, root = kinds["/tmp"][0]
    assert (fstype, root) == ("tmpfs", "/upper/tmp")  # the delta's name of it, no host path
    assert {"rw", "nosuid", "nodev", "noexec"} <= set(options.split(","))
    overlays = {point for point, mounts in kinds.items() if mounts[0][0] == "overlay"}
    assert overlays == {"/srv/notes"}  # the volume is an overlay of its own


# ---- trojaning the base
# The read-only image refuses a write to the base before DAC or Landlock look (EROFS); with the
# whole-root overlay (no image: test_root_without_image below), those refuse it (EACCES).

@pytest.mark.parametrize("name, expected", [
    ("write_python_binary", "EROFS"),
    ("write_python_through_proc_self_exe", "EROFS"),
    ("replace_python_by_rename", "EXDEV"),  # /tmp is its own (noexec) mount now
    ("unlink_python", "EROFS"),
    ("setuid_bit_on_python", "EPERM"),
    ("backdate_python", "EROFS"),
    ("trojan_stdlib_module", "EROFS"),
    ("plant_sitecustomize", "EROFS"),
    ("plant_ld_so_preload", "EROFS"),
    ("write_outside_writable_paths", "EROFS"),
    ("hardlink_python_into_tmp", "EXDEV"),
])
def test_base_cannot_be_trojaned(attacked, name, expected):
    blocked(attacked, name, expected)


def test_base_image_on_disk_is_unchanged(attacked, svc):
    changed = diff_trees(svc.at_start.base, tree_state(svc.base_root))
    assert changed == []


def test_host_python_and_stdlib_unchanged(attacked, svc):
    assert file_state("/usr/bin/python3.11") == svc.at_start.host_python
    assert file_state("/usr/lib/python3.11/os.py") == svc.at_start.host_stdlib_os


# ---- executing anything else

# Two layers refuse an exec: the supervisor's exec check (seccomp user notification: only the
# process's `exec` paths may be an execve's target) answers EPERM before the kernel looks; Landlock
# (EXECUTE only on the executables and their loader) answers EACCES. A noexec mount makes the
# loader fail to map a program (ExecFailed).
REFUSED = ("EPERM", "EACCES")


@pytest.mark.parametrize("name, expected", [
    ("exec_python_copy_in_tmp", REFUSED),
    ("exec_python_copy_in_volume", REFUSED),
    ("exec_python_copy_in_dev_shm", REFUSED),
    ("exec_script_in_tmp", REFUSED),
    ("exec_shared_library", REFUSED),  # libc.so.6 is an executable too
    ("exec_copy_through_ld_so_from_volume", REFUSED + ("ExecFailed",)),
    ("exec_copy_through_ld_so_from_tmp", REFUSED + ("ExecFailed",)),
    ("exec_memfd_by_fd", REFUSED),
    # Fixed holes, kept as regressions: the exec check resolves the caller's own /proc magic
    # links and fails closed; memfds are noexec (vm.memfd_noexec=2 in the service's PID
    # namespace); /tmp is a noexec mount, so even a won race cannot map a payload from it.
    ("exec_ld_so_through_proc_self_root", REFUSED + ("ExecFailed",)),
    ("exec_copy_from_memfd", REFUSED),
    ("exec_check_race_symlink_swap", "RaceLost"),
])
def test_nothing_but_the_interpreter_executes(attacked, name, expected):
    blocked(attacked, name, expected)


# ---- sharp objects, setuid files, devices

def test_no_sharp_objects_in_the_root(attacked):
    seen = returned(attacked, "sharp_objects")
    assert {path: seen[path] for path in SHARP if seen[path] != "ENOENT"} == {}


def test_no_setuid_files_reachable_inside(attacked):
    assert returned(attacked, "setuid_or_setgid_files") == []


def test_no_setuid_or_file_capabilities_in_the_base_image(svc):
    found = []
    for parent, _, files in os.walk(svc.base_root):
        for name in files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(path)
            try:
                os.getxattr(path, "security.capability", follow_symlinks=False)
                found.append(path + " (file capabilities)")
            except OSError:
                pass
    assert found == []


def test_dev_has_only_the_five_harmless_nodes(attacked):
    assert returned(attacked, "dev_nodes") == {name: "chr" for name in EXPECTED_DEVICES}


def test_host_devices_do_not_exist_inside(attacked):
    seen = returned(attacked, "open_host_devices")
    assert {path: seen[path] for path in DEVICES if seen[path] != "ENOENT"} == {}


@pytest.mark.parametrize("name, expected", [("mknod_dev_mem", "EPERM"), ("mknod_disk", "EPERM"),
                                            ("create_file_in_dev", "EROFS")])
def test_no_new_device_nodes(attacked, name, expected):
    blocked(attacked, name, expected)


def test_no_sys_inside(attacked):
    blocked(attacked, "sys_is_absent", "ENOENT")


TROJANS = ("write_python_binary", "unlink_python", "trojan_stdlib_module", "plant_sitecustomize",
           "plant_ld_so_preload", "write_outside_writable_paths")


def test_root_without_image(escape_env, monkeypatch):
    """Without the image (the kernel cannot mount erofs from a file, no mkfs.erofs; here the
    bench-only switch), the root is one overlay on the whole base, and Landlock and the file
    modes refuse the same writes (EACCES) that the image refuses as read-only."""
    monkeypatch.setenv("CORRAL_BENCH_SKIP", "image")
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8093) as other:
        results = other.attack(ATTACK, params={"state_dir": str(other.state_dir),
                                               "token": TOKEN, "sharp": SHARP,
                                               "devices": DEVICES})
        root = [line for line in returned(results, "mountinfo").splitlines()
                if line.split()[4] == "/"]
        assert root[0].partition(" - ")[2].split()[0] == "overlay"
        for name in TROJANS:
            blocked(results, name, "EACCES")
        blocked(results, "backdate_python", "EPERM")

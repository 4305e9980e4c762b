"""Tests of corral.plan.closure: real host binaries against ldd, and fake roots built in tmp_path.

ldd is used here only as an oracle, on trusted host files. Where the kernel's own path resolution
is the oracle, a forked child chroots into a tree and stats paths there (needs root: skipped
otherwise).
"""

from __future__ import annotations

import glob
import os
import pickle
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.plan.closure import ClosureError, ImageEntry, _Closure, _Unresolved, image_closure

IS_ROOT = os.geteuid() == 0


def needs_root(test):
    """The project's `root` marker, and a skip of its own for when this file runs alone."""
    return pytest.mark.root(pytest.mark.skipif(not IS_ROOT, reason="chroot(2) needs root")(test))


# --- helpers -----------------------------------------------------------------------------------

def make_elf(needed=(), *, soname=None, rpath=None, runpath=None, interp=None, machine=62):
    """A minimal 64-bit little-endian ET_DYN (default machine x86-64): PT_LOAD, PT_DYNAMIC and
    maybe PT_INTERP, no section headers. Enough for pyelftools and readelf."""
    strtab = b"\0"

    def string(text: str) -> int:
        nonlocal strtab
        strtab += text.encode() + b"\0"
        return len(strtab) - len(text) - 1

    dyn = [(1, string(n)) for n in needed]  # DT_NEEDED
    for tag, value in ((14, soname), (15, rpath), (29, runpath)):  # DT_SONAME, _RPATH, _RUNPATH
        if value is not None:
            dyn.append((tag, string(value)))
    nph = 3 if interp else 2
    interp_bytes = interp.encode() + b"\0" if interp else b""
    str_off = 64 + 56 * nph + len(interp_bytes)
    dyn_off = (str_off + len(strtab) + 7) & ~7
    dyn += [(5, str_off), (10, len(strtab)), (0, 0)]  # DT_STRTAB (vaddr == offset), DT_STRSZ
    dyn_bytes = b"".join(struct.pack("<qQ", t, v) for t, v in dyn)
    total = dyn_off + len(dyn_bytes)
    phdr = "<IIQQQQQQ"
    ph = [struct.pack(phdr, 1, 5, 0, 0, 0, total, total, 0x1000),  # PT_LOAD: the whole file
          struct.pack(phdr, 2, 6, dyn_off, dyn_off, dyn_off, len(dyn_bytes), len(dyn_bytes), 8)]
    if interp:
        off = 64 + 56 * nph
        size = len(interp_bytes)
        ph.insert(0, struct.pack(phdr, 3, 4, off, off, off, size, size, 1))  # PT_INTERP
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 3, machine, 1, 0, 64, 0, 0, 64, 56, nph, 64, 0, 0)
    body = ehdr + b"".join(ph) + interp_bytes + strtab
    return body + b"\0" * (dyn_off - len(body)) + dyn_bytes


def put(root: Path, path: str, data: bytes = b"data\n", mode: int = 0o644) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(mode)
    return p


def link(root: Path, path: str, target: str) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def by_path(entries: list[ImageEntry]) -> dict[str, ImageEntry]:
    return {e.path: e for e in entries}


def check_well_formed(entries: list[ImageEntry], root: str = "/") -> None:
    """Sorted, unique, every ancestor a dir entry, and every entry is what lies under root."""
    assert entries == sorted(set(entries))
    paths = by_path(entries)
    assert len(paths) == len(entries)
    for e in entries:
        parent = os.path.dirname(e.path)
        assert parent == "/" or paths[parent].kind == "dir", e
        st_ = os.lstat(root.rstrip("/") + e.path)  # exists under root: nothing from outside
        kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}
        assert kind[stat.S_IFMT(st_.st_mode)] == e.kind, e
        if e.kind == "symlink":
            assert e.target == os.readlink(root.rstrip("/") + e.path) and e.mode == 0o777
        else:
            assert e.mode == stat.S_IMODE(st_.st_mode)


def materialize(entries: list[ImageEntry], dest: Path, source: str | None = None
                ) -> dict[int, str]:
    """Lay the entries out as the image builder does, files empty unless copied from `source`;
    returns inode -> image path."""
    dest.mkdir()
    inodes = {dest.stat().st_ino: "/"}
    for e in entries:  # sorted: a parent comes before its children
        p = str(dest) + e.path
        if e.kind == "dir":
            os.mkdir(p, e.mode)
        elif e.kind == "symlink":
            os.symlink(e.target, p)
        elif source is not None:
            shutil.copyfile(source.rstrip("/") + e.path, p)
            os.chmod(p, e.mode)
        else:
            open(p, "wb").close()
        if e.kind != "symlink":
            inodes[os.lstat(p).st_ino] = e.path
    return inodes


def kernel_stat(root: str, paths: list[str]) -> list[tuple[str, int]]:
    """stat(2) of each path in a child chrooted at root: ("ok", inode) or ("err", errno)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(r)
            os.chroot(root)
            os.chdir("/")
            out = []
            for p in paths:
                try:
                    out.append(("ok", os.stat(p).st_ino))
                except OSError as exc:
                    out.append(("err", exc.errno))
            data = pickle.dumps(out)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            data = pickle.dumps(repr(exc))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = pickle.loads(f.read())
    os.waitpid(pid, 0)
    assert isinstance(result, list), result
    return result


def ldd(path: str) -> set[str]:
    """The files ldd says `path` loads (vdso excluded), as printed."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("linux-vdso") or "statically linked" in line:
            continue
        file = line.split("=>", 1)[1].strip() if "=>" in line else line
        file = file.split(" (", 1)[0].strip()
        assert file != "not found", f"the host itself cannot load {path}: {line}"
        found.add(file)
    return found


def first_needed(path: str) -> str:
    with open(path, "rb") as f:
        return next(t.needed for t in ELFFile(f).get_section_by_name(".dynamic").iter_tags()
                    if t.entry.d_tag == "DT_NEEDED")


# --- real host binaries against ldd -------------------------------------------------------------

HOST_PROGRAMS = [p for p in ("/usr/bin/python3.11", "/usr/sbin/nft", "/bin/ls")
                 if os.path.exists(p)]
DYNLOAD = sorted(glob.glob("/usr/lib/python3.11/lib-dynload/*.so"))


def check_against_ldd(program: str, entries: list[ImageEntry], image: Path | None) -> None:
    files = {os.path.realpath(e.path) for e in entries if e.kind == "file"}
    wanted = ldd(program)
    for lib in wanted:
        assert os.path.realpath(lib) in files, f"{program}: {lib} missing from the closure"
    if image is not None:  # and the very paths ld.so opens resolve in the image, to the same file
        inodes = materialize(entries, image)
        results = kernel_stat(str(image), sorted(wanted))
        for lib, (status, value) in zip(sorted(wanted), results, strict=True):
            assert status == "ok", f"{lib} does not resolve in the image (errno {value})"
            assert inodes[value] == os.path.realpath(lib)


@pytest.mark.parametrize("program", HOST_PROGRAMS)
def test_host_program_matches_ldd(program, tmp_path):
    entries = image_closure([program])
    check_well_formed(entries)
    check_against_ldd(program, entries, tmp_path / "image" if IS_ROOT else None)


@pytest.mark.skipif(not DYNLOAD, reason="no /usr/lib/python3.11/lib-dynload on this host")
def test_python_extensions_match_ldd():
    for module in DYNLOAD:
        check_against_ldd(module, image_closure([module]), None)


@pytest.mark.skipif(not os.path.islink("/lib64"), reason="host is not usr-merged")
def test_lib64_symlink_and_interpreter():
    entries = image_closure(["/usr/bin/python3.11"])
    check_well_formed(entries)
    paths = by_path(entries)
    assert paths["/lib64"] == ImageEntry("/lib64", "symlink", os.readlink("/lib64"), 0o777)
    with open("/usr/bin/python3.11", "rb") as f:
        interp = next(s.get_interp_name() for s in ELFFile(f).iter_segments()
                      if s["p_type"] == "PT_INTERP")
    assert paths[os.path.realpath(interp)].kind == "file"
    # Debian: /lib64 -> usr/lib64, /usr/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...
    hop = os.path.join(os.path.realpath(os.path.dirname(interp)), os.path.basename(interp))
    if os.path.islink(hop):
        assert paths[hop] == ImageEntry(hop, "symlink", os.readlink(hop), 0o777)
    assert paths["/lib"] == ImageEntry("/lib", "symlink", os.readlink("/lib"), 0o777)


@needs_root
def test_python_runs_inside_its_closure(tmp_path):
    """The end-to-end check: the image of python3 starts and loads its C extensions."""
    if not os.path.exists("/usr/lib/python3.11"):
        pytest.skip("no python3.11 tree on this host")
    entries = image_closure(["/usr/bin/python3", "/usr/lib/python3.11"])
    materialize(entries, tmp_path / "image", source="/")
    code = "import ssl, sqlite3, hashlib, json, ctypes, decimal, lzma, bz2, zlib; print('ok')"
    result = subprocess.run(["chroot", str(tmp_path / "image"), "/usr/bin/python3", "-I", "-c",
                             code], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_python_closure_is_fast():
    include = ["/usr/bin/python3", "/usr/lib/python3.11"]
    if not all(os.path.exists(p) for p in include):
        pytest.skip("no python3.11 tree on this host")
    start = time.perf_counter()
    entries = image_closure(include)
    elapsed = time.perf_counter() - start
    print(f"closure of {include}: {len(entries)} entries in {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
    check_well_formed(entries)


# --- fake roots: resolution stays inside -------------------------------------------------------

def test_symlinks_pointing_out_resolve_inside(tmp_path):
    root = tmp_path / "root"
    put(root, "/etc/shadow", b"fake\n", 0o604)
    link(root, "/app/abs", "/etc/shadow")
    link(root, "/app/rel", "../../../../../../etc")
    put(root, "/app/run.sh", b"#!/bin/sh\n", 0o755)
    entries = image_closure(["/app"], host_root=str(root))
    check_well_formed(entries, str(root))
    paths = by_path(entries)
    assert paths["/etc/shadow"] == ImageEntry("/etc/shadow", "file", None, 0o604)
    assert paths["/app/abs"].target == "/etc/shadow"
    assert paths["/etc"].kind == "dir"  # the relative escape is clamped at the fake root
    assert "/etc/passwd" not in paths and "/etc/hostname" not in paths
    with pytest.raises(ClosureError) as err:  # exists on the host, not in the fake root
        image_closure(["/app/rel/hostname"], host_root=str(root))
    assert err.value.index == 0 and "no such file or directory" in str(err.value)


def test_symlink_loops(tmp_path):
    root = tmp_path / "root"
    link(root, "/a", "b")
    link(root, "/b", "/a")
    link(root, "/self", "self")
    put(root, "/ok")
    for path in ("/a", "/self", "/a/x"):
        with pytest.raises(ClosureError) as err:
            image_closure(["/ok", path], host_root=str(root))
        assert err.value.index == 1 and "too many levels of symbolic links" in str(err.value)
    link(root, "/tree/loop", "/a")
    with pytest.raises(ClosureError, match="too many levels"):
        image_closure(["/tree"], host_root=str(root))


def test_long_chain_below_the_limit(tmp_path):
    root = tmp_path / "root"
    put(root, "/target")
    for i in range(40):  # l0 -> l1 -> ... -> l39 -> target: 40 symlinks, the kernel's maximum
        link(root, f"/l{i}", f"l{i + 1}" if i < 39 else "target")
    entries = image_closure(["/l0"], host_root=str(root))
    assert len([e for e in entries if e.kind == "symlink"]) == 40
    link(root, "/l-1", "l0")
    with pytest.raises(ClosureError, match="too many levels"):
        image_closure(["/l-1"], host_root=str(root))
    if IS_ROOT:  # the kernel draws the line at the same place
        assert [s for s, _ in kernel_stat(str(root), ["/l0", "/l-1"])] == ["ok", "err"]


def test_missing_include(tmp_path):
    root = tmp_path / "root"
    put(root, "/exists")
    put(root, "/file")
    with pytest.raises(ClosureError) as err:
        image_closure(["/exists", "/usr/bin/foo"], host_root=str(root))
    assert (err.value.index, err.value.path) == (1, "/usr/bin/foo")
    assert str(err.value) == '"/usr/bin/foo": no such file or directory'
    with pytest.raises(ClosureError, match="not a directory") as err:
        image_closure(["/file/x"], host_root=str(root))
    assert err.value.index == 0
    with pytest.raises(ClosureError, match="not an absolute path"):
        image_closure(["exists"], host_root=str(root))


def test_tree_contents(tmp_path):
    root = tmp_path / "root"
    put(root, "/srv/app/main.py", b"print()\n", 0o640)
    put(root, "/srv/app/pkg/mod.py")
    link(root, "/srv/app/dangling", "nowhere")
    link(root, "/srv/app/here", ".")  # a cycle through a directory symlink, not a loop
    link(root, "/srv/app/shared", "../../opt/shared")
    put(root, "/opt/shared/sub/data.txt")
    put(root, "/opt/other.txt")
    os.mkfifo(root / "srv/app/fifo")
    entries = image_closure(["/srv/app"], host_root=str(root))
    check_well_formed(entries, str(root))
    paths = by_path(entries)
    assert paths["/srv/app/main.py"].mode == 0o640
    assert paths["/srv/app/dangling"].target == "nowhere"
    assert paths["/opt/shared/sub/data.txt"].kind == "file"  # the outside target, whole
    assert "/opt/other.txt" not in paths
    assert "/srv/app/fifo" not in paths  # special files are no image content
    with pytest.raises(ClosureError, match="no image content"):
        image_closure(["/srv/app/fifo"], host_root=str(root))


def test_proc_sys_dev_are_not_image_content(tmp_path):
    root = tmp_path / "root"
    link(root, "/etc/mtab", "../proc/self/mounts")
    link(root, "/proc/self", "1")
    put(root, "/proc/1/mounts", b"the host's mount table\n")
    put(root, "/dev/shm/x")
    put(root, "/sys/kernel/y")
    put(root, "/usr/z")
    paths = by_path(image_closure(["/etc"], host_root=str(root)))
    assert paths["/etc/mtab"].target == "../proc/self/mounts"
    assert not [p for p in paths if p.startswith("/proc")]
    for include in ("/proc/self/mounts", "/dev/shm", "/etc/mtab"):
        with pytest.raises(ClosureError, match="no image content"):
            image_closure([include], host_root=str(root))
    everything = {e.path for e in image_closure(["/"], host_root=str(root))}  # a copied root
    assert everything == {"/etc", "/etc/mtab", "/proc", "/dev", "/sys", "/usr", "/usr/z"}


@needs_root
def test_dotdot_after_symlink_keeps_the_link_target(tmp_path):
    """/a/l/../z: the kernel resolves l first, so /x/y must be in the image though unused."""
    root = tmp_path / "root"
    link(root, "/a/l", "/x/y")
    (root / "x/y").mkdir(parents=True)
    put(root, "/x/z")
    entries = image_closure(["/a/l/../z"], host_root=str(root))
    assert by_path(entries)["/x/y"].kind == "dir"
    inodes = materialize(entries, tmp_path / "image")
    [(status, ino)] = kernel_stat(str(tmp_path / "image"), ["/a/l/../z"])
    assert status == "ok" and inodes[ino] == "/x/z"


# --- fake roots: the loader's search ------------------------------------------------------------

X86 = "/usr/lib/x86_64-linux-gnu"


def test_copied_host_binary_without_its_libraries(tmp_path):
    root = tmp_path / "root"
    ls = os.path.realpath("/bin/ls")
    with open(ls, "rb") as f:
        interp = next(s.get_interp_name() for s in ELFFile(f).iter_segments()
                      if s["p_type"] == "PT_INTERP")
    put(root, "/bin/ls", Path(ls).read_bytes(), 0o755)
    with pytest.raises(ClosureError) as err:
        image_closure(["/bin/ls"], host_root=str(root))
    assert (err.value.path, err.value.library) == ("/bin/ls", interp)
    put(root, interp, Path(os.path.realpath(interp)).read_bytes(), 0o755)
    with pytest.raises(ClosureError) as err:
        image_closure(["/bin/ls"], host_root=str(root))
    lib = first_needed(ls)
    assert (err.value.path, err.value.library, err.value.index) == ("/bin/ls", lib, None)
    assert str(err.value) == (f'"/bin/ls" needs "{lib}", which is not found in its RUNPATH, '
                              "/etc/ld.so.conf paths or the default directories")


def test_copied_host_binary_with_its_libraries_in_a_usr_merged_root(tmp_path):
    root = tmp_path / "root"
    for name in ("bin", "lib", "lib64"):
        link(root, "/" + name, "usr/" + name)
    ls = os.path.realpath("/bin/ls")
    put(root, "/usr/bin/ls", Path(ls).read_bytes(), 0o755)
    libs = ldd(ls)
    for lib in libs:
        real = os.path.realpath(lib)
        put(root, X86 + "/" + os.path.basename(real), Path(real).read_bytes(), 0o644)
        if os.path.basename(lib) != os.path.basename(real):
            link(root, X86 + "/" + os.path.basename(lib), os.path.basename(real))
    link(root, "/usr/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    entries = image_closure(["/bin/ls"], host_root=str(root))
    check_well_formed(entries, str(root))
    paths = by_path(entries)
    assert paths["/bin"].target == "usr/bin" and paths["/lib64"].target == "usr/lib64"
    assert {os.path.basename(os.path.realpath(lib)) for lib in libs} <= \
        {os.path.basename(e.path) for e in entries if e.kind == "file"}


def test_runpath_origin_lib_platform_and_slash_names(tmp_path):
    root = tmp_path / "root"
    put(root, "/opt/app/bin/prog", make_elf(["liba.so.1", "libp.so", "$ORIGIN/../plugins/x.so"],
                                            runpath="$ORIGIN/../lib:/opt/$LIB/${PLATFORM}"), 0o755)
    put(root, "/opt/app/lib/liba.so.1.2.3", make_elf())
    link(root, "/opt/app/lib/liba.so.1", "liba.so.1.2")
    link(root, "/opt/app/lib/liba.so.1.2", "liba.so.1.2.3")
    put(root, "/opt/lib/x86_64-linux-gnu/x86_64/libp.so", make_elf())
    put(root, "/opt/app/plugins/x.so", make_elf())
    paths = by_path(image_closure(["/opt/app/bin/prog"], host_root=str(root)))
    assert paths["/opt/app/lib/liba.so.1"].kind == "symlink"
    assert paths["/opt/app/lib/liba.so.1.2"].kind == "symlink"
    assert paths["/opt/app/lib/liba.so.1.2.3"].kind == "file"
    assert paths["/opt/lib/x86_64-linux-gnu/x86_64/libp.so"].kind == "file"
    assert paths["/opt/app/plugins/x.so"].kind == "file"


def test_origin_of_the_program_is_its_real_directory(tmp_path):
    root = tmp_path / "root"
    put(root, "/opt/real/bin/prog", make_elf(["libq.so"], runpath="$ORIGIN/lib"), 0o755)
    link(root, "/usr/bin/prog", "/opt/real/bin/prog")
    put(root, "/opt/real/bin/lib/libq.so", make_elf())
    assert "/opt/real/bin/lib/libq.so" in by_path(image_closure(["/usr/bin/prog"],
                                                                host_root=str(root)))


def test_rpath_runpath_precedence_and_inheritance(tmp_path):
    root = tmp_path / "root"
    for d in ("/r1", "/r2", X86):
        put(root, d + "/libz.so", make_elf())
    put(root, "/r1/liba.so", make_elf(["libb.so"]))  # no search path of its own
    put(root, "/r1/libb.so", make_elf())
    put(root, "/r1/libc.so", make_elf(["libb.so"], runpath="/nowhere"))

    def chosen(prog: bytes, include_lib: str = "libz.so") -> str:
        put(root, "/prog", prog, 0o755)
        entries = image_closure(["/prog"], host_root=str(root))
        return next(e.path for e in entries if e.path.endswith("/" + include_lib))

    assert chosen(make_elf(["libz.so"], rpath="/r1")) == "/r1/libz.so"
    assert chosen(make_elf(["libz.so"], rpath="/r1", runpath="/r2")) == "/r2/libz.so"
    assert chosen(make_elf(["libz.so"])) == X86 + "/libz.so"
    # DT_RPATH of the program serves its libraries' DT_NEEDED too...
    assert chosen(make_elf(["liba.so"], rpath="/r1"), "libb.so") == "/r1/libb.so"
    # ...but not for one with DT_RUNPATH, and DT_RUNPATH serves direct dependencies only.
    put(root, "/prog", make_elf(["libc.so"], rpath="/r1"), 0o755)
    with pytest.raises(ClosureError) as err:
        image_closure(["/prog"], host_root=str(root))
    assert (err.value.path, err.value.library) == ("/r1/libc.so", "libb.so")
    put(root, "/prog", make_elf(["liba.so"], runpath="/r1"), 0o755)
    with pytest.raises(ClosureError, match='"/r1/liba.so" needs "libb.so"'):
        image_closure(["/prog"], host_root=str(root))
    # Unless the name is loaded already: ld.so reuses it without searching.
    assert chosen(make_elf(["liba.so", "libb.so"], runpath="/r1"), "libb.so") == "/r1/libb.so"


def test_ld_so_conf(tmp_path):
    root = tmp_path / "root"
    put(root, "/etc/ld.so.conf", b"include ld.so.conf.d/*.conf\ninclude /etc/ld.so.conf\n")
    put(root, "/etc/ld.so.conf.d/a.conf", b"# comment\n/opt/a/ # trailing\nhwcap 0 nosegneg\n")
    put(root, "/etc/ld.so.conf.d/b.conf", b"/opt/b=libc6\nrelative/dir\n")
    put(root, "/etc/ld.so.conf.d/.hidden.conf", b"/opt/hidden\n")
    put(root, "/opt/hidden/libh.so", make_elf())
    put(root, "/opt/b/libm.so", make_elf())
    put(root, "/opt/a/libm.so", make_elf())
    put(root, "/prog", make_elf(["libm.so"]), 0o755)
    closure = _Closure(str(root))
    assert closure._conf == ["/opt/a", "/opt/b"]
    assert "/opt/a/libm.so" in by_path(image_closure(["/prog"], host_root=str(root)))
    put(root, "/prog", make_elf(["libh.so"]), 0o755)
    with pytest.raises(ClosureError, match="libh.so"):
        image_closure(["/prog"], host_root=str(root))


def test_ld_so_conf_does_not_leave_the_root(tmp_path):
    root = tmp_path / "root"
    put(root, "/etc/ld.so.conf", b"include /x/*.conf\n")
    link(root, "/x", "/../../../../../etc/ld.so.conf.d")  # the host's, were it followed
    assert _Closure(str(root))._conf == []
    (root / "etc/ld.so.conf").unlink()
    link(root, "/etc/ld.so.conf", "../../../../../../../../etc/ld.so.conf")  # itself: a loop
    assert _Closure(str(root))._conf == []


def test_wrong_machine_is_skipped(tmp_path):
    root = tmp_path / "root"
    put(root, "/etc/ld.so.conf", b"/wrong\n")
    put(root, "/wrong/libw.so", make_elf(machine=183))  # EM_AARCH64
    put(root, X86 + "/libw.so", make_elf())
    put(root, "/prog", make_elf(["libw.so"]), 0o755)
    put(root, "/wrong/libn.so", b"\x7fELF but not really")  # unparseable: skipped too
    paths = by_path(image_closure(["/prog"], host_root=str(root)))
    assert X86 + "/libw.so" in paths and "/wrong/libw.so" not in paths
    put(root, "/prog", make_elf(["libn.so"]), 0o755)
    with pytest.raises(ClosureError, match="libn.so"):
        image_closure(["/prog"], host_root=str(root))


def _host_elf32() -> str | None:
    for pattern in ("/usr/libexec/valgrind/*x86-linux*", "/usr/lib/i386-linux-gnu/*.so*",
                    "/usr/lib32/*.so*", "/usr/lib/perf-core/*"):
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if f.read(5) == b"\x7fELF\x01":
                        return path
    return None


def test_wrong_class_is_skipped(tmp_path):
    elf32 = _host_elf32()
    if elf32 is None:
        pytest.skip("no 32-bit ELF file on this host to play the wrong-class candidate")
    root = tmp_path / "root"
    put(root, "/etc/ld.so.conf", b"/wrong\n")
    shutil.copyfile(elf32, put(root, "/wrong/libw.so"))
    put(root, X86 + "/libw.so", make_elf())
    put(root, "/prog", make_elf(["libw.so"]), 0o755)
    paths = by_path(image_closure(["/prog"], host_root=str(root)))
    assert X86 + "/libw.so" in paths and "/wrong/libw.so" not in paths


def test_interpreter_through_symlinks(tmp_path):
    root = tmp_path / "root"
    link(root, "/lib", "usr/lib")
    link(root, "/lib64", "usr/lib64")
    put(root, X86 + "/ld-linux-x86-64.so.2", make_elf(soname="ld-linux-x86-64.so.2"), 0o755)
    link(root, "/usr/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    # libc needs the loader by name: satisfied by the interpreter already in the process
    put(root, X86 + "/libc.so.6", make_elf(["ld-linux-x86-64.so.2"],
                                          interp="/lib64/ld-linux-x86-64.so.2"))
    put(root, "/usr/bin/prog", make_elf(["libc.so.6"], interp="/lib64/ld-linux-x86-64.so.2"),
        0o755)
    entries = image_closure(["/usr/bin/prog"], host_root=str(root))
    check_well_formed(entries, str(root))
    paths = by_path(entries)
    assert paths["/lib64"].target == "usr/lib64" and paths["/lib"].target == "usr/lib"
    assert paths["/usr/lib64/ld-linux-x86-64.so.2"].kind == "symlink"
    assert paths[X86 + "/ld-linux-x86-64.so.2"].kind == "file"
    assert paths[X86 + "/libc.so.6"].kind == "file"


def test_non_elf_and_malformed_files_are_just_copied(tmp_path):
    root = tmp_path / "root"
    put(root, "/app/run.sh", b"#!/no/such/interpreter\n", 0o755)  # shebangs are not followed
    put(root, "/app/broken.so", b"\x7fELF" + b"\xff" * 60)
    put(root, "/app/empty")
    assert {e.path for e in image_closure(["/app"], host_root=str(root))} == {
        "/app", "/app/run.sh", "/app/broken.so", "/app/empty"}


# --- property: resolution is the kernel's, and never leaves the root ----------------------------

NAMES = ["d0", "d1", "d2", "f0", "f1", "l0", "l1", "l2", "l3", "etc", "passwd", "..", "."]
DIRS = ["/d0", "/d1", "/d0/d2"]
FILES = ["/f0", "/d1/f1", "/d0/d2/f0"]
LINKS = ["/l0", "/d0/l1", "/d1/l2", "/d0/d2/l3"]


def paths_from(absolute: bool):
    parts = st.lists(st.sampled_from(NAMES), min_size=1, max_size=5)
    return parts.map(lambda p: ("/" if absolute else "") + "/".join(p))


link_texts = st.one_of(paths_from(True), paths_from(False))


@needs_root
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(targets=st.lists(link_texts, min_size=len(LINKS), max_size=len(LINKS)),
       query=paths_from(True))
def test_random_symlink_graphs(tmp_path_factory, targets, query):
    base = tmp_path_factory.mktemp("graph")
    root = base / "root"
    for d in DIRS:
        (root / d.lstrip("/")).mkdir(parents=True)
    for f in FILES:
        put(root, f, b"inside\n")
    for path, target in zip(LINKS, targets, strict=True):
        link(root, path, target)
    [(status, value)] = kernel_stat(str(root), [query])
    try:
        ours = _Closure(str(root)).resolve(query).path
    except _Unresolved:
        ours = None
    except ClosureError:
        ours = "ELOOP"
    if status == "ok":
        assert os.lstat(str(root) + ours).st_ino == value
    else:
        assert ours == ("ELOOP" if value == 40 else None), (query, value)
    try:
        entries = image_closure([query], host_root=str(root))
    except ClosureError as exc:  # the include, or a symlink in the included tree, fails
        assert status != "ok" or "too many levels" in str(exc)
        return
    assert status == "ok"
    check_well_formed(entries, str(root))  # nothing from outside the fake root
    inodes = materialize(entries, base / "image")
    [(image_status, image_ino)] = kernel_stat(str(base / "image"), [query])
    assert image_status == "ok", "the image lacks something the path needs"
    assert image_ino in inodes
    assert inodes[image_ino] == ours

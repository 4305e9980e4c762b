"""The files a service image needs: its includes plus the shared-library closure of each ELF.

Nothing is executed (no ldd, no `ld.so --list`): the files may be untrusted. pyelftools reads the
headers; glibc's ld.so search is redone. For a DT_NEEDED name without "/": DT_RPATH of the object
and its loaders up to the program (if the object has no DT_RUNPATH; DT_RPATH is ignored in those
that have one), its DT_RUNPATH, the /etc/ld.so.conf directories (the image needs the ld.so.cache
built from them for what is found there), the default directories; there is no LD_LIBRARY_PATH.
A candidate of another ELF class, byte order or machine is skipped as ld.so skips it; a name the
chain has loaded already (as DT_NEEDED or DT_SONAME) is reused. $ORIGIN is the directory the
object was found in (the program's with symlinks resolved, as /proc/self/exe), $PLATFORM is
AT_PLATFORM, $LIB is Debian's "lib/x86_64-linux-gnu", not upstream's "lib64" (as LD_DEBUG=files
shows). Empty and relative elements (the working directory) and glibc-hwcaps are not searched.

Paths are resolved component by component as the kernel does in a chroot at `host_root`: absolute
link texts restart at host_root, ".." stops there, 40 symlinks at most. Nothing outside host_root
is read; every symlink met is recorded, as the image needs it to resolve the same path. Entry
paths are physical (no symlink among their ancestors): the image builder follows nothing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

MAX_SYMLINKS = 40  # the kernel's limit per path lookup (ELOOP beyond)

# Mounted in the service at run time, never image content: what resolves into them is not added
# (a symlink such as /etc/mtab -> ../proc/self/mounts stays, dangling), nor walked.
_VIRTUAL = ("/proc", "/sys", "/dev")

# (EI_CLASS, e_machine) -> ($PLATFORM, $LIB, default directories), as Debian's glibc has them.
_ARCH: dict[tuple[int, str], tuple[str, str, tuple[str, ...]]] = {
    (64, "EM_X86_64"): ("x86_64", "lib/x86_64-linux-gnu", ("/lib/x86_64-linux-gnu",
                        "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")),
}
_OTHER_ARCH: tuple[str | None, str, tuple[str, ...]] = (None, "lib", ("/lib", "/usr/lib"))

# $NAME or ${NAME}; "$ORIGINAL" is no token (glibc requires a non-identifier character after it).
_DST = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")


@dataclass(frozen=True, order=True)
class ImageEntry:
    path: str  # absolute path inside the image (same as the host path it comes from)
    kind: str  # "dir" | "file" | "symlink"
    target: str | None  # for symlinks: the link text exactly as stored on the host; else None
    mode: int  # permission bits (stat.S_IMODE) of the host object; 0o777 for symlinks


class ClosureError(Exception):
    """A missing include (`index`, `path`), an unresolvable DT_NEEDED or interpreter (`path`: the
    ELF that needs it, `library`), or a symlink loop (`path`). str() is one line for the user."""

    def __init__(self, message: str, *, path: str | None = None, index: int | None = None,
                 library: str | None = None):
        super().__init__(message)
        self.path, self.index, self.library = path, index, library


class _Unresolved(Exception):
    """A path that does not resolve; str() reads like strerror."""


def _strerror(exc: OSError) -> str:
    """strerror in lower case; an OSError raised without an errno has none: its str() then."""
    return (exc.strerror or str(exc)).lower()


@dataclass(frozen=True)
class _Elf:
    arch: tuple[int, bool, str]  # EI_CLASS, little endian, e_machine: what must match to load
    etype: str
    interp: str | None
    needed: tuple[str, ...]
    soname: str | None
    rpath: str | None
    runpath: str | None


@dataclass(frozen=True)
class _Resolved:
    path: str  # physical path: no symlink in any component
    links: tuple[tuple[str, str], ...]  # (symlink path, link text) met on the way
    dirs: tuple[str, ...]  # directories passed through (a symlink's target may be no ancestor)


@dataclass
class _Node:
    """One object of a load chain, as ld.so's link_map."""
    path: str
    elf: _Elf
    origin: str  # value of $ORIGIN
    loader: _Node | None


def _parse_elf(f) -> _Elf | None:
    """What loading an ELF takes, or None when pyelftools cannot parse it (it is then data to copy;
    ld.so would refuse it too). The broad except: pyelftools raises a zoo of types (ELFError,
    ConstructError, ValueError...) on malformed input, and these files are untrusted."""
    try:
        f.seek(0)
        elf = ELFFile(f)
        interp: str | None = None
        dyn: dict[str, list[str]] = {"needed": [], "soname": [], "rpath": [], "runpath": []}
        for seg in elf.iter_segments():  # pyelftools makes these classes of PT_INTERP, PT_DYNAMIC
            if isinstance(seg, InterpSegment):
                interp = seg.get_interp_name()
            elif isinstance(seg, DynamicSegment):
                for tag in seg.iter_tags():  # DT_NEEDED -> tag.needed, DT_RPATH -> tag.rpath...
                    if (kind := str(tag.entry.d_tag)[3:].lower()) in dyn:
                        dyn[kind].append(getattr(tag, kind))
        return _Elf((elf.elfclass, elf.little_endian, elf["e_machine"]), elf["e_type"], interp,
                    tuple(dyn.pop("needed")), **{k: v[0] if v else None for k, v in dyn.items()})
    except Exception:  # noqa: BLE001 - whatever pyelftools raises, it is not a program we can load
        return None


class _Closure:
    def __init__(self, host_root: str):
        self.prefix = os.path.abspath(host_root).rstrip("/")  # "" when host_root is "/"
        self.entries: dict[str, ImageEntry] = {}
        self._lstat: dict[str, os.stat_result | None] = {}
        self._elf: dict[str, _Elf | None] = {}
        # search results: (the path ld.so opens, its resolution, the ELF found there)
        self._found: dict[tuple, tuple[str, _Resolved, _Elf] | None] = {}
        self._to_walk: list[str] = []  # directories wanted with everything beneath them
        self._walked: set[str] = set()
        self._programs: list[str] = []  # ELF files that start a load chain of their own
        self._queued: set[str] = set()
        self._conf: list[str] = []  # the directories of /etc/ld.so.conf
        self._read_conf("/etc/ld.so.conf", set())

    # --- the host, read under host_root only -----------------------------------------------
    def lstat(self, path: str) -> os.stat_result | None:
        if path not in self._lstat:
            try:
                self._lstat[path] = os.lstat(self.prefix + path)
            except (FileNotFoundError, NotADirectoryError):
                self._lstat[path] = None
        return self._lstat[path]

    def found(self, path: str) -> os.stat_result:
        """lstat of a path that resolve() or walk_trees() returned: it exists (and is cached)."""
        st = self.lstat(path)
        if st is None:
            raise ClosureError(f'"{path}": vanished while the closure was computed', path=path)
        return st

    def resolve(self, path: str) -> _Resolved:
        """Follow every symlink like the kernel in a chroot at host_root; raise _Unresolved."""
        todo = path.split("/")[::-1]  # a stack of components; a link's text is pushed onto it
        cur, links, dirs, hops = "", [], [], 0  # cur "" is "/"
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                cur = cur.rpartition("/")[0]  # the parent of "/" is "/": clamped at host_root
                continue
            nxt = cur + "/" + name
            st = self.lstat(nxt)
            if st is None:
                raise _Unresolved("no such file or directory")
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise ClosureError(f'"{path}": too many levels of symbolic links', path=path)
                target = os.readlink(self.prefix + nxt)
                links.append((nxt, target))
                cur = "" if target.startswith("/") else cur
                todo.extend(target.split("/")[::-1])
            elif todo and not stat.S_ISDIR(st.st_mode):  # "file/x", "file/", "file/.."
                raise _Unresolved("not a directory")
            else:
                cur = nxt
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(cur)
        return _Resolved(cur or "/", tuple(links), tuple(dirs))

    def elf(self, path: str) -> _Elf | None:
        """The ELF at physical `path`, or None for any other file; cached."""
        if path not in self._elf:
            try:  # O_NOFOLLOW|O_NONBLOCK: never through a symlink swapped in, never hang on a fifo
                fd = os.open(self.prefix + path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                raise ClosureError(f'"{path}": {_strerror(exc)}', path=path) from None
            # Most files are no ELF: no parse for them. Scripts are data too: their #! line is
            # not followed (an interpreter the service needs is named in `include`).
            with os.fdopen(fd, "rb") as f:
                self._elf[path] = _parse_elf(f) if f.read(4) == b"\x7fELF" else None
        return self._elf[path]

    # --- entries ---------------------------------------------------------------------------
    def add_dir(self, path: str) -> None:
        if path != "/" and path not in self.entries:
            st = self.lstat(path)
            assert st is not None and stat.S_ISDIR(st.st_mode), path
            self.entries[path] = ImageEntry(path, "dir", None, stat.S_IMODE(st.st_mode))

    def add_resolved(self, res: _Resolved, program: bool = True) -> bool:
        """The symlinks and directories met, and the object: a directory is wanted whole, an ELF
        file starts a load chain if `program`. False for what is no image content (a device,
        fifo or socket, or anything under /proc, /sys or /dev)."""
        if any(res.path == v or res.path.startswith(v + "/") for v in _VIRTUAL):
            return False
        for link, target in res.links:
            self.entries[link] = ImageEntry(link, "symlink", target, 0o777)
        for d in res.dirs:
            self.add_dir(d)
        st = self.found(res.path)
        if stat.S_ISDIR(st.st_mode):
            self._to_walk.append(res.path)
        elif stat.S_ISREG(st.st_mode):
            self.entries[res.path] = ImageEntry(res.path, "file", None, stat.S_IMODE(st.st_mode))
            if program and res.path not in self._queued and self.elf(res.path) is not None:
                self._queued.add(res.path)
                self._programs.append(res.path)
        return stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)

    def add_include(self, path: str, index: int) -> None:
        try:
            if not path.startswith("/"):
                raise _Unresolved("not an absolute path")
            if not self.add_resolved(self.resolve(path)):
                raise _Unresolved("no image content (a special file, or under /proc, /sys, /dev)")
        except _Unresolved as exc:
            raise ClosureError(f'"{path}": {exc}', index=index, path=path) from None
        except ClosureError as exc:  # a symlink loop: say which include it was
            raise ClosureError(str(exc), index=index, path=path) from None

    def walk_trees(self) -> None:
        """Everything beneath the wanted directories. Symlinks stay symlinks, and what they
        resolve to is added wherever it is (a directory whole); a dangling one is kept as it is."""
        while self._to_walk:
            d = self._to_walk.pop()
            if d in self._walked:
                continue
            self._walked.add(d)
            self.add_dir(d)
            try:
                children = list(os.scandir(self.prefix + d))
            except OSError as exc:
                raise ClosureError(f'"{d}": {_strerror(exc)}', path=d) from None
            for e in children:
                path = d.rstrip("/") + "/" + e.name
                st = self._lstat[path] = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and path in _VIRTUAL:
                    self.add_dir(path)  # a mount point: the directory only
                elif stat.S_ISDIR(st.st_mode):
                    self._to_walk.append(path)
                elif not stat.S_ISLNK(st.st_mode):
                    self.add_resolved(_Resolved(path, (), ()))
                else:
                    target = os.readlink(self.prefix + path)
                    self.entries[path] = ImageEntry(path, "symlink", target, 0o777)
                    with contextlib.suppress(_Unresolved):  # dangling: kept as it is
                        self.add_resolved(self.resolve(path))

    # --- the dynamic loader's view ---------------------------------------------------------
    def _read_conf(self, path: str, seen: set[str]) -> None:
        """ldconfig's syntax: a directory a line ("=TYPE" ignored), `include GLOB...` relative to
        the including file's directory, `hwcap` lines ignored, # comments."""
        try:
            res = self.resolve(path)
        except (_Unresolved, ClosureError):  # missing or a symlink loop: no directories from it
            return
        if res.path in seen or not stat.S_ISREG(self.found(res.path).st_mode):  # include loops
            return
        seen.add(res.path)
        with open(self.prefix + res.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        for words in (line.split("#", 1)[0].split() for line in lines):
            if words and words[0] == "include":  # glob(3), wildcards in the last component only
                for pattern in words[1:]:
                    d, _, name = posixpath.join(posixpath.dirname(path), pattern).rpartition("/")
                    with contextlib.suppress(_Unresolved, OSError):  # listed inside host_root
                        for n in sorted(os.listdir(self.prefix + self.resolve(d or "/").path)):
                            if fnmatch.fnmatchcase(n, name) and (name[:1] == "." or n[:1] != "."):
                                self._read_conf(d + "/" + n, seen)
            elif words and words[0].lower() != "hwcap":
                d = " ".join(words).split("=", 1)[0].rstrip("/")
                if d.startswith("/") and d not in self._conf:  # ldconfig ignores relative ones
                    self._conf.append(d)

    def expand(self, text: str, node: _Node) -> str | None:
        """Dynamic string tokens; None if one has no value (ld.so then drops the element)."""
        platform, lib, _ = _ARCH.get(node.elf.arch[::2], _OTHER_ARCH)
        values = {"ORIGIN": node.origin, "LIB": lib}
        if platform is not None:
            values["PLATFORM"] = platform
        if any((m.group(1) or m.group(2)) not in values for m in _DST.finditer(text)):
            return None
        return _DST.sub(lambda m: values[m.group(1) or m.group(2)], text)

    def search_dirs(self, node: _Node) -> list[str]:
        dirs: list[str] = []
        loader = node if node.elf.runpath is None else None  # RUNPATH: no RPATH at all
        while loader is not None:
            if loader.elf.rpath and loader.elf.runpath is None:
                dirs += [self.expand(d, loader) or "" for d in loader.elf.rpath.split(":")]
            loader = loader.loader
        if node.elf.runpath:
            dirs += [self.expand(d, node) or "" for d in node.elf.runpath.split(":")]
        dirs += self._conf + list(_ARCH.get(node.elf.arch[::2], _OTHER_ARCH)[2])
        return list(dict.fromkeys(d.rstrip("/") for d in dirs if d.startswith("/")))

    def find_library(self, node: _Node, name: str) -> tuple[str, _Resolved, _Elf]:
        """(the path ld.so opens, its resolution, its ELF) for the DT_NEEDED `name` of `node`."""
        if "/" in name:  # a path, not a name to search for; DSTs are expanded in it too
            path = self.expand(name, node)
            candidates = [path] if path and path.startswith("/") else []
        else:
            candidates = [d + "/" + name for d in self.search_dirs(node)]
        key = (tuple(candidates), node.elf.arch)
        if key not in self._found:
            self._found[key] = None
            for cand in candidates:
                with contextlib.suppress(_Unresolved):
                    res = self.resolve(cand)
                    if stat.S_ISREG(self.found(res.path).st_mode) and \
                            (lib := self.elf(res.path)) and lib.arch == node.elf.arch:
                        self._found[key] = (cand, res, lib)
                        break
        found = self._found[key]
        if found is None:
            where = ("which is not found in its RUNPATH, /etc/ld.so.conf paths or the default "
                     "directories" if "/" not in name else "which is not found")
            raise ClosureError(f'"{node.path}" needs "{name}", {where}', path=node.path,
                               library=name)
        return found

    def add_interp(self, node: _Node) -> str:
        """PT_INTERP, wanted for every ELF that has one (libc.so.6 too), and a program itself."""
        interp = node.elf.interp
        if interp is None:  # callers check node.elf.interp first
            raise ValueError(f'"{node.path}" has no program interpreter')
        try:
            res = self.resolve(interp)
            if not stat.S_ISREG(self.found(res.path).st_mode):
                raise _Unresolved
        except _Unresolved:
            raise ClosureError(f'"{node.path}" needs program interpreter "{interp}", which is not '
                               "found", path=node.path, library=interp) from None
        self.add_resolved(res)
        return res.path

    def load_chain(self, program: str) -> None:
        """What ld.so loads for `program`, breadth first: its DT_NEEDED, then theirs..."""
        elf = self.elf(program)
        if elf is None or elf.etype not in ("ET_EXEC", "ET_DYN"):
            return  # relocatable objects, core files: nothing is loaded for them
        root = _Node(program, elf, posixpath.dirname(program), None)
        chain, loaded = [root], {program}
        by_name = {elf.soname: program} if elf.soname else {}
        if elf.interp:  # the interpreter is in the process before any DT_NEEDED is searched
            loaded.add(interp := self.add_interp(root))
            if (info := self.elf(interp)) is not None and info.soname:
                by_name.setdefault(info.soname, interp)
        for node in chain:  # grows while it is walked
            if node is not root and node.elf.interp:
                self.add_interp(node)
            for name in node.elf.needed:
                if name in by_name:
                    continue
                opened, res, lib = self.find_library(node, name)
                by_name[name] = res.path
                self.add_resolved(res, program=False)
                if res.path not in loaded:  # one object per file, as ld.so (by inode)
                    loaded.add(res.path)
                    if lib.soname:
                        by_name.setdefault(lib.soname, res.path)
                    chain.append(_Node(res.path, lib, posixpath.dirname(opened), node))

    def run(self, include: Sequence[str]) -> list[ImageEntry]:
        for index, path in enumerate(include):
            self.add_include(path, index)
        self.walk_trees()
        for program in self._programs:  # grows while walked: interpreters are programs too
            self.load_chain(program)
        # No ancestor pass is needed: every entry was found by resolve() or walk_trees(), which
        # added each directory they passed through.
        return sorted(self.entries.values())


def image_closure(include: Sequence[str], host_root: str = "/") -> list[ImageEntry]:
    """Sorted, de-duplicated entries that reproduce `include` (host paths) in an image: the
    includes (directories whole, special files left out), every symlink met while resolving any
    path with what it resolves to, every ancestor directory except "/", and for every ELF its
    PT_INTERP and DT_NEEDED libraries, transitively. All reads happen under `host_root`; entry
    paths are image paths. Raises ClosureError."""
    return _Closure(host_root).run(include)


def interpreter_of(path: str, host_root: str = "/") -> str | None:
    """The program that the kernel opens to run `path` (an image path): the ELF's PT_INTERP or
    a script's #! interpreter; None for a static ELF or data. Landlock must let the process
    execute it too, or execve fails with EACCES."""
    closure = _Closure(host_root)
    try:
        real = closure.resolve(path).path
    except _Unresolved:
        return None
    elf = closure.elf(real)
    if elf is not None:
        return elf.interp
    try:
        with open(closure.prefix + real, "rb") as handle:
            first = handle.readline(256)
    except OSError:
        return None
    if first.startswith(b"#!"):
        words = first[2:].decode(errors="replace").split()
        return words[0] if words and words[0].startswith("/") else None
    return None

"""The desired state of one service, computed by pure code: reads the manifest and the host's
files, writes nothing, runs nothing. `install` applies it; `corral plan` prints it."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any

from corral.core.errors import InputError, Problem
from corral.core.imagepath import resolve_in
from corral.core.paths import escape_path
from corral.core.record import asdict  # the sandbox plans are records
from corral.manifest.model import Manifest
from corral.plan import etc
from corral.plan import nft_rules as nftables
from corral.plan.closure import ClosureError, ImageEntry, image_closure, interpreter_of
from corral.plan.sandbox import SandboxPlan, sandbox_for

# What every root gets besides its contents: mount points and the scratch directory. /dev and
# /proc are mounted by `launch` (a few device nodes, the service's own proc), never copied.
SKELETON = (
    ImageEntry("/dev", "dir", None, 0o755),
    ImageEntry("/etc", "dir", None, 0o755),
    ImageEntry("/proc", "dir", None, 0o555),
    ImageEntry("/tmp", "dir", None, 0o1777),
)


def marker(service: str, process: str) -> str:
    """The GECOS field that marks a user as corral's own, so it is never mistaken for a host
    user."""
    return f"corral service {service} process {process}"


@dataclass(frozen=True)
class UserSpec:
    name: str
    service: str
    process: str

    @property
    def comment(self) -> str:
        return marker(self.service, self.process)


@dataclass(frozen=True)
class VolumePlan:
    path: str  # inside the service's root
    owner: str  # system user that may write it
    mode: int
    journal: bool
    epoch: int
    store: str  # directory name under the state directory's volumes/
    size: int | None = None  # bytes of its own file system (host.loopfs); None: unbounded


@dataclass(frozen=True, order=True)
class AddedEntry:
    """A vendor file from `image.add`: copied from `source` on the host to `path` in the image."""

    path: str
    kind: str  # "dir" | "file" | "symlink"
    source: str
    mode: int
    target: str | None = None


@dataclass(frozen=True)
class ImagePlan:
    source: str  # "closure" or the root directory it is copied from
    entries: tuple[ImageEntry, ...]
    added: tuple[AddedEntry, ...] = ()
    include: tuple[str, ...] = ()
    generated: tuple[tuple[str, str], ...] = ()  # (image path, text): plan.etc's basics
    # (image path, user): owned by that user in the base, a directory recursively (image.owner
    # and the runtime directories); everything else is root's.
    owners: tuple[tuple[str, str], ...] = ()

    @property
    def host_root(self) -> str:
        return "/" if self.source == "closure" else self.source


@dataclass(frozen=True)
class ServicePlan:
    service: str
    file: str
    users: tuple[UserSpec, ...]
    image: ImagePlan
    volumes: tuple[VolumePlan, ...]
    flows: tuple[nftables.ProcessFlows, ...]
    ruleset: dict[str, Any]
    sandbox: tuple[SandboxPlan, ...]
    delta: str = "tmpfs"
    delta_size: int = 64 << 20
    watch: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: dict[str, Any] = dataclasses.field(default_factory=dict)
    network: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "host"})

    @property
    def table(self) -> str:
        return f"inet {nftables.table_name(self.service)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "users": [{"name": u.name, "process": u.process, "comment": u.comment}
                      for u in self.users],
            "image": {
                "from": self.image.source,
                "entries": [_entry_json(e) for e in self.image.entries],
                "added": [_entry_json(e) | {"source": e.source} for e in self.image.added],
                "passwd": [u.name for u in self.users],
                "generated": dict(self.image.generated),
                "owners": dict(self.image.owners),
            },
            "volumes": [asdict(v) | {"mode": f"{v.mode:04o}"} for v in self.volumes],
            "nftables": self.ruleset,
            "sandbox": [asdict(s) for s in self.sandbox],
            "delta": {"kind": self.delta, "size": self.delta_size},
            "watch": self.watch,
            "log": self.log,
            "network": self.network,
        }


def _entry_json(entry: ImageEntry | AddedEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"path": entry.path, "kind": entry.kind, "mode": f"{entry.mode:04o}"}
    if entry.target is not None:
        out["target"] = entry.target
    return out


def _added(file: str, m: Manifest) -> tuple[AddedEntry, ...]:
    """Walk each `image.add` source without following symlinks (they are copied as symlinks)."""
    base = os.path.dirname(os.path.abspath(file))
    out: list[AddedEntry] = []
    for dest, src in m.image.add.items():
        source = os.path.join(base, src)
        try:
            st = os.lstat(source)
        except OSError as exc:
            raise InputError([Problem(file, ("image", "add", dest),
                                      f'"{src}": {(exc.strerror or str(exc)).lower()}')]) from None
        if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise InputError([Problem(file, ("image", "add", dest),
                                      f'"{src}": must be a regular file or a directory')])
        out.append(_added_entry(dest, source, st))
        if stat.S_ISDIR(st.st_mode):
            for top, dirs, files in os.walk(source):
                for name in sorted(dirs + files):
                    host = os.path.join(top, name)
                    rel = os.path.relpath(host, source)
                    out.append(_added_entry(posixpath.join(dest, rel), host, os.lstat(host)))
    return tuple(sorted(e for e in out if e.kind))


def _added_entry(path: str, source: str, st: os.stat_result) -> AddedEntry:
    if stat.S_ISLNK(st.st_mode):
        return AddedEntry(path, "symlink", source, 0o777, os.readlink(source))
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else ""
    return AddedEntry(path, kind, source, stat.S_IMODE(st.st_mode))


def _image(file: str, m: Manifest) -> ImagePlan:
    source = m.image.source
    if source != "closure" and not os.path.isdir(source):
        raise InputError([Problem(file, ("image", "from"), f'"{source}": no such directory')])
    host_root = "/" if source == "closure" else source
    include = list(m.image.include) or (["/"] if source != "closure" else [])
    closure = list(include)
    if source == "closure" and etc.wants_c_utf8([p.environment for p in m.process.values()]) \
            and os.path.isdir(etc.C_UTF8) and etc.C_UTF8 not in include:
        closure.append(etc.C_UTF8)
    try:
        entries = image_closure(closure, host_root=host_root)
    except ClosureError as exc:
        index = getattr(exc, "index", None)
        loc: tuple[str | int, ...] = ("image", "include") + ((index,) if index is not None else ())
        raise InputError([Problem(file, loc, str(exc))]) from None
    merged = {e.path: e for e in SKELETON} | {e.path: e for e in entries}
    added = _added(file, m)
    # Mount points for the volumes' bind mounts, and the directories added files go into.
    for path in [v.path for v in m.all_volumes()] + [os.path.dirname(a.path) for a in added]:
        while path != "/":
            merged.setdefault(path, ImageEntry(path, "dir", None, 0o755))
            path = os.path.dirname(path)
    # Runtime directories: empty in the base, owned by their process, so each start (a fresh
    # delta) finds them empty, as systemd's RuntimeDirectory= does.
    owners = []
    for pname, path, mode in m.runtime_directories():
        merged[path] = ImageEntry(path, "dir", None, mode)
        owners.append((path, m.user_of(pname)))
        path = os.path.dirname(path)
        while path != "/":
            merged.setdefault(path, ImageEntry(path, "dir", None, 0o755))
            path = os.path.dirname(path)
    added = tuple(a for a in added if a.path not in merged)
    present = set(merged) | {a.path for a in added}
    problems = [Problem(file, ("image", "owner", path),
                        f'"{path}": not in the image (include or add it first)')
                for path in m.image.owner if path not in present]
    if problems:
        raise InputError(problems)
    owners += [(path, m.user_of(pname)) for path, pname in m.image.owner.items()]
    zone = etc.zone_file() if source == "closure" else None
    if zone is not None and etc.LOCALTIME not in present:
        added = tuple(sorted(added + (AddedEntry(etc.LOCALTIME, "file", zone, 0o644),)))
    generated = tuple(sorted((path, text) for path, text in
                             etc.generated(m.name, list(m.resolvers)).items()
                             if path not in present))
    return ImagePlan(source, tuple(sorted(merged.values())), added, tuple(include), generated,
                     tuple(sorted(owners)))


def _check_executables(file: str, m: Manifest, image: ImagePlan) -> None:
    present = {e.path for e in image.entries + image.added if e.kind in ("file", "symlink")}
    # The closure records a symlinked directory (/bin -> usr/bin on a merged /usr) and the
    # file behind it, never the path through it: resolve the command as the service would.
    links = {e.path: e.target for e in image.entries if e.kind == "symlink" and e.target}
    problems = []
    for name, proc in m.process.items():
        for k, path in enumerate(proc.executables):
            if path not in present and resolve_in(path, links) not in present:
                key = ("command", 0) if proc.exec_ is None else ("exec", k)
                problems.append(Problem(file, ("process", name) + key,
                                        f'"{path}": not in the image (add it to image.include)'))
        for k, path in enumerate((proc.setup.exec_ or []) if proc.setup else []):
            if path not in present and resolve_in(path, links) not in present:
                problems.append(Problem(file, ("process", name, "setup", "exec", k),
                                        f'"{path}": not in the image (add it to image.include)'))
    if problems:
        raise InputError(problems)


def _interpreters(image: ImagePlan, executables: list[str]) -> tuple[str, ...]:
    """PT_INTERP or #! of each executable, read from where the image will copy it from."""
    sources = {a.path: a.source for a in image.added}
    found = set()
    for path in executables:
        if path in sources:
            interp = interpreter_of(sources[path], "/")
        else:
            interp = interpreter_of(path, image.host_root)
        if interp:
            found.add(interp)
    return tuple(sorted(found))


def plan_service(file: str, m: Manifest) -> ServicePlan:
    """Everything `install` and `run` will do for this manifest; raises InputError (exit 2)."""
    image = _image(file, m)
    _check_executables(file, m, image)
    users = tuple(UserSpec(m.user_of(p), m.name, p) for p in m.process)
    dns = etc.dns_endpoints(list(m.resolvers))
    flows = tuple(nftables.ProcessFlows(p, m.user_of(p), tuple(proc.listen),
                                        tuple(proc.connect) + dns)
                  for p, proc in m.process.items())
    volumes = tuple(VolumePlan(v.path, m.user_of(v.owner), v.mode, v.journal, v.epoch,
                               escape_path(v.path), v.size) for v in m.all_volumes())
    return ServicePlan(
        service=m.name,
        file=file,
        users=users,
        image=image,
        volumes=volumes,
        flows=flows,
        ruleset=nftables.service_ruleset(m.name, flows),
        sandbox=tuple(sandbox_for(m, p, proc, _interpreters(image, proc.executables),
                                  _interpreters(image, proc.setup.exec_ or [])
                                  if proc.setup else ())
                      for p, proc in m.process.items()),
        delta=m.image.delta,
        delta_size=m.image.delta_size,
        watch=m.watch.model_dump(),
        log=m.log.model_dump(),
        network={"mode": m.network} | ({"pool": m.network_pool} if m.network == "own" else {}),
    )

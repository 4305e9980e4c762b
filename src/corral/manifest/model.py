"""The service manifest: parse TOML, validate every rule, report `FILE: key.path: message`.

Validation happens in two passes: pydantic checks shape and values field by field (so each error
carries its key path), then `_cross_checks` checks rules that relate fields to each other. Either
pass fails the whole manifest: nothing is ever applied from an invalid one.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
)

from corral.core.capabilities import normalize_capability
from corral.core.errors import InputError, Problem
from corral.core.names import PROCESS_NAME, SERVICE_NAME  # noqa: E402  (re-exported)
from corral.core.netspec import Endpoint, PortSpec, parse_endpoint, parse_ports
from corral.core.units import parse_duration, parse_size
from corral.manifest import tomlfile

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TRIPWIRES = ("egress", "listen", "exec", "base-write", "setuid", "ptrace", "spoof", "flood")
# Kernel file systems the service gets its own instance of (or none): never a volume.
RESERVED_ROOTS = ("/proc", "/dev", "/sys")
RESERVED_PROCESS_NAMES = ("tasks",)
RESERVED_SERVICE_NAMES = ("host",)


def _absolute_path(raw: object) -> str:
    """An absolute path with no `..`, normalised ("/srv//data/" -> "/srv/data")."""
    if not isinstance(raw, str):
        raise ValueError("expected an absolute path (a string)")
    if not raw.startswith("/"):
        raise ValueError(f'"{raw}": path must be absolute')
    if "\0" in raw:
        raise ValueError(f'"{raw}": path contains a NUL byte')
    if ".." in raw.split("/"):
        raise ValueError(f'"{raw}": ".." is not allowed in a path')
    return posixpath.normpath(raw).replace("//", "/")


def _source_path(raw: str) -> str:
    if not raw or "\0" in raw:
        raise ValueError("expected a file or directory to copy")
    return raw


def _service_name(raw: str) -> str:
    if not SERVICE_NAME.match(raw):
        raise ValueError(f'"{raw}": a name is 1-16 characters: a-z first, then a-z, 0-9 or "-"')
    if raw in RESERVED_SERVICE_NAMES:
        raise ValueError(f'"{raw}": reserved (the host\'s own table is inet corral-host)')
    return raw


def _image_from(raw: str) -> str:
    return raw if raw == "closure" else _absolute_path(raw)


def _octal_mode(raw: object, example: str, what: str) -> int:
    """An octal mode string ("0750"), never writable by others."""
    if not isinstance(raw, str) or not re.fullmatch(r"0?[0-7]{3}", raw):
        raise ValueError(f'"{raw}": expected an octal mode string like "{example}"')
    mode = int(raw, 8)
    if mode & 0o002:
        raise ValueError(f'"{raw}": {what} must not be writable by others')
    return mode


def _mode(raw: object) -> int:
    return _octal_mode(raw, "0750", "a volume")


MIN_FILESYSTEM = 8 << 20  # a volume or disk delta of its own: smaller has no room past ext4's
MAX_FILESYSTEM = 16 << 40  # metadata; larger than ext4 with 4 KiB blocks holds


def _fs_size(raw: object) -> int:
    """The size of a file system of its own (a volume's, a disk delta's): 8M to 16T."""
    size = parse_size(raw)
    if not MIN_FILESYSTEM <= size <= MAX_FILESYSTEM:
        raise ValueError(f'"{raw}": a file system of its own is 8M to 16T')
    return size


def _resolver(raw: object) -> str:
    import ipaddress

    if not isinstance(raw, str):
        raise ValueError('expected an IP address (a string like "192.0.2.53")')
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError(f'"{raw}": not an IP address (a resolver is never a host name)') from None


def _pool(raw: object) -> str:
    """network_pool: an IPv4 prefix with room for /30 links (one per service)."""
    import ipaddress

    if not isinstance(raw, str):
        raise ValueError('expected an IPv4 prefix like "10.213.0.0/16"')
    try:
        net = ipaddress.IPv4Network(raw, strict=True)
    except ValueError:
        raise ValueError(f'"{raw}": not an IPv4 prefix without host bits') from None
    if net.prefixlen > 30:
        raise ValueError(f'"{raw}": too small: each service takes a /30 of it')
    return str(net)


def _dir_mode(raw: object) -> int:
    return _octal_mode(raw, "0755", "a directory of the service")


def _dir_name(raw: object) -> str:
    """systemd's RuntimeDirectory= style: a relative path below /run (or /var/lib, ...)."""
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z0-9_.@+-]+(/[A-Za-z0-9_.@+-]+)*",
                                                    raw) \
            or any(part in (".", "..") for part in raw.split("/")):
        raise ValueError(f'"{raw}": expected a relative directory name like "nginx" '
                         '(letters, digits, "._-@+", "/" between parts, no "..")')
    return raw


def _cpu(raw: float) -> float:
    if not 0 < raw <= 1024:
        raise ValueError(f"{raw}: cpu is a number of CPUs, more than 0")
    return float(raw)


def _positive(raw: int) -> int:
    if raw <= 0:
        raise ValueError(f"{raw}: must be positive")
    return raw


def _env_name(raw: str) -> str:
    if not ENV_NAME.match(raw):
        raise ValueError(f'"{raw}": not a valid environment variable name')
    return raw


def _signal_name(raw: object) -> str:
    """"SIGINT", "INT" or "int" -> "SIGINT"; only signals a process can handle or die of."""
    import signal

    if not isinstance(raw, str):
        raise ValueError('expected a signal name like "SIGTERM"')
    name = raw.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__ or name.startswith(("SIGRT", "SIGSTOP", "SIGCHLD")):
        raise ValueError(f'"{raw}": not a signal name (e.g. "SIGTERM", "SIGINT", "SIGHUP")')
    return name


def _no_nul(raw: str) -> str:
    if "\0" in raw:
        raise ValueError("contains a NUL byte")
    return raw


AbsPath = Annotated[str, BeforeValidator(_absolute_path)]
Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[int, BeforeValidator(parse_duration)]
# Plain validators: the parsers make the values, so pydantic needs no schema of its own for
# these classes (core.record's, not dataclasses: it could not generate one)
Ports = Annotated[PortSpec, PlainValidator(parse_ports), PlainSerializer(str)]
Connect = Annotated[Endpoint, PlainValidator(parse_endpoint), PlainSerializer(str)]
Capability = Annotated[str, BeforeValidator(normalize_capability)]
Text = Annotated[str, AfterValidator(_no_nul)]
Signal = Annotated[str, BeforeValidator(_signal_name)]
DirName = Annotated[str, BeforeValidator(_dir_name)]
DirMode = Annotated[int, BeforeValidator(_dir_mode)]
# Where systemd puts each kind of directory: the kind's key -> its parent in the root.
DIRECTORY_PARENTS = {"state_directory": "/var/lib", "cache_directory": "/var/cache",
                     "logs_directory": "/var/log"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class Image(Strict):
    source: Annotated[str, AfterValidator(_image_from)] = Field(default="closure", alias="from")
    include: list[AbsPath] = []
    # corral extension: vendor files copied into the image, {image path = source}; a relative
    # source is relative to the manifest's directory.
    add: dict[AbsPath, Annotated[str, AfterValidator(_source_path)]] = {}
    delta: Literal["tmpfs", "disk"] = "tmpfs"
    delta_size: Size = Field(default=64 << 20)
    # {image path = process}: that process's user owns the path in the base (a directory
    # recursively), so a 0640 config keeps its meaning (Debian's /etc/redis/redis.conf).
    owner: dict[AbsPath, str] = {}


class Volume(Strict):
    path: AbsPath
    owner: str
    mode: Annotated[int, BeforeValidator(_mode)] = 0o750
    journal: bool = False
    epoch: Duration = 600
    # A file system of its own of this size (a loop-mounted image, host.loopfs): the kernel
    # refuses writes past it. None: a directory of the state file system, unbounded.
    size: Annotated[int, BeforeValidator(_fs_size)] | None = None


class Limits(Strict):
    memory: Size = 512 << 20
    pids: Annotated[int, AfterValidator(_positive)] = 256
    open_files: Annotated[int, AfterValidator(_positive)] = 1024
    # No quota unless asked: a quota caps a multi-worker server even on an idle machine (nginx
    # with two workers at cpu = 1.0 was throttled in 93% of periods, 0.66 of its throughput;
    # bench/servers.md). Without one the service's cgroup has the default weight, so under
    # contention it gets the same share as any other group.
    cpu: Annotated[float, AfterValidator(_cpu)] | None = None


class Setup(Strict):
    """A one-shot step run inside the process's containment before its first start (initdb)."""

    command: Annotated[list[Text], Field(min_length=1)]
    creates: AbsPath | None = None  # run whenever this path is missing, not only the first time
    timeout: Duration = 600
    # What the setup alone may execute (initdb's popen needs /bin/sh and postgres); None: the
    # process's `exec`. Never granted to the process itself (its Landlock execute rights and its
    # exec guard's list stay its own `exec`).
    exec_: list[AbsPath] | None = Field(None, alias="exec")

    def executables(self, process: list[str]) -> list[str]:
        return list(self.exec_) if self.exec_ is not None else process


class Process(Strict):
    command: Annotated[list[Text], Field(min_length=1)]
    capabilities: list[Capability] = []
    listen: list[Ports] = []
    connect: list[Connect] = []
    exec_: list[AbsPath] | None = Field(None, alias="exec")
    writable: list[AbsPath] = []
    syscalls: Literal["default"] | list[Text] = "default"
    multicast: bool = False  # may join multicast groups (setsockopt IP_ADD_MEMBERSHIP, ...)
    limits: Limits = Limits()
    environment: dict[Annotated[str, AfterValidator(_env_name)], Text] = {}
    # The life cycle (systemd: KillSignal=, TimeoutStopSec=, ExecReload=, ExecStartPre=).
    stop_signal: Signal = "SIGTERM"
    stop_timeout: Duration = 10
    reload: Signal | Annotated[list[Text], Field(min_length=1)] = "SIGHUP"
    setup: Setup | None = None
    # systemd's RuntimeDirectory=, StateDirectory=, CacheDirectory=, LogsDirectory=: names
    # below /run (fresh at every start), /var/lib, /var/cache, /var/log (volumes), owned by
    # this process's user.
    runtime_directory: list[DirName] = []
    runtime_directory_mode: DirMode = 0o755
    state_directory: list[DirName] = []
    state_directory_mode: DirMode = 0o755
    cache_directory: list[DirName] = []
    cache_directory_mode: DirMode = 0o755
    logs_directory: list[DirName] = []
    logs_directory_mode: DirMode = 0o755

    @property
    def executables(self) -> list[str]:
        """What the process may execute: `exec`, or just command[0]."""
        return list(self.exec_) if self.exec_ is not None else [self.command[0]]


class Watch(Strict):
    react: Literal["log", "isolate", "kill", "revert"] = "revert"
    tripwires: list[Literal[TRIPWIRES]] = list(TRIPWIRES)  # type: ignore[valid-type]
    quiet: Duration = 86400
    # corral extension: a command run with each incident as JSON on stdin (mail, chat, pager).
    on_incident: Annotated[list[Text], Field(min_length=1)] | None = None


def _not_negative(raw: int) -> int:
    if raw < 0:
        raise ValueError(f"{raw}: must be 0 or more")
    return raw


class Log(Strict):
    """The processes' output in /var/log/corral/NAME (launch.logfile)."""

    size: Size = 10 << 20  # per file, before it is rotated
    files: Annotated[int, AfterValidator(_positive)] = 5  # rotated files kept
    rate: Annotated[int, AfterValidator(_not_negative)] = 200  # lines/s to journald; 0: none


class Manifest(Strict):
    name: Annotated[str, AfterValidator(_service_name)]
    image: Image = Image()
    volume: list[Volume] = []
    process: dict[str, Process]
    watch: Watch = Watch()
    log: Log = Log()
    # DNS servers: /etc/resolv.conf, "dns" in nsswitch.conf, and udp/53 + tcp/53 to them for
    # every process. None: the service resolves names from /etc/hosts only.
    resolvers: Annotated[list[Annotated[str, BeforeValidator(_resolver)]],
                         Field(max_length=3)] = []
    # "own": a network namespace of its own behind a veth pair (docs/sandbox.md); its /30 comes
    # from network_pool. "host": the host's namespace, as before.
    network: Literal["host", "own"] = "host"
    network_pool: Annotated[str, BeforeValidator(_pool)] = "10.213.0.0/16"

    def directory_volumes(self) -> list[tuple[tuple[str | int, ...], Volume]]:
        """The volumes the processes' state/cache/logs directories stand for, with the key
        path each comes from (for error messages)."""
        out: list[tuple[tuple[str | int, ...], Volume]] = []
        for pname, proc in self.process.items():
            for key, parent in DIRECTORY_PARENTS.items():
                mode = getattr(proc, key + "_mode")
                for k, name in enumerate(getattr(proc, key)):
                    volume = Volume.model_validate({"path": f"{parent}/{name}", "owner": pname,
                                                    "mode": f"{mode:04o}"})
                    out.append((("process", pname, key, k), volume))
        return out

    def all_volumes(self) -> list[Volume]:
        """[[volume]] and the state/cache/logs directories, which are volumes too."""
        return list(self.volume) + [v for _, v in self.directory_volumes()]

    def runtime_directories(self) -> list[tuple[str, str, int]]:
        """(process, path below /run, mode) of every runtime directory."""
        return [(pname, f"/run/{name}", proc.runtime_directory_mode)
                for pname, proc in self.process.items() for name in proc.runtime_directory]

    def user_of(self, process: str) -> str:
        """The system user of one process: corral-SERVICE-PROCESS (at most 32 characters)."""
        return f"corral-{self.name}-{process}"


# -- error messages -------------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def _type_name(value: Any) -> str:
    for kind, name in _TYPE_NAMES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def _message(err: Mapping[str, Any], or_list: bool = False) -> str:
    kind, value = err["type"], err.get("input")
    expected = {
        "string_type": "a string", "int_type": "an integer", "float_type": "a number",
        "bool_type": "true or false", "list_type": "a list", "dict_type": "a table",
        "model_type": "a table", "model_attributes_type": "a table",
    }
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in expected:
        return f"expected {expected[kind]}, got {_type_name(value)}"
    if kind == "literal_error":
        choices = err.get("ctx", {}).get("expected", "")
        choices = choices.replace("'", '"') + (" or a list" if or_list else "")
        if isinstance(value, str):
            return f'"{value}": expected {choices}'
        return f"expected {choices}, got {_type_name(value)}"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    return err["msg"]


def _is_tag(part: str | int) -> bool:
    """pydantic puts union branches and validator wrappers into `loc`: "literal['default']"..."""
    return isinstance(part, str) and ("[" in part or "(" in part)


def problems_from(file: str, exc: ValidationError) -> list[Problem]:
    errors = exc.errors()

    def union_key(err: Mapping[str, Any]) -> tuple:
        loc = err["loc"]
        first_tag = next((i for i, p in enumerate(loc) if _is_tag(p)), None)
        return loc[:first_tag] if first_tag is not None else ()

    # A "default" | [list] union reports a failure per branch. When the value was a list (the
    # list branch has errors about its items) keep those; otherwise keep the literal's one.
    list_valued = {union_key(e) for e in errors if union_key(e) and e["type"] != "list_type"
                   and not str(e["loc"][len(union_key(e))]).startswith("literal")}
    problems: list[Problem] = []
    for err in errors:
        key = union_key(err)
        in_union = bool(key)
        if in_union:
            literal_branch = str(err["loc"][len(key)]).startswith("literal")
            if literal_branch == (key in list_valued) or err["type"] == "list_type":
                continue
        loc = tuple(p for p in err["loc"] if not _is_tag(p))
        problems.append(Problem(file, loc, _message(err, or_list=in_union)))
    return problems


# -- cross-field rules ----------------------------------------------------------------------

def _cross_checks(file: str, m: Manifest) -> list[Problem]:
    out: list[Problem] = []

    def add(loc: tuple[str | int, ...], message: str) -> None:
        out.append(Problem(file, loc, message))

    if not m.process:
        add(("process",), "at least one [process.NAME] table is required")
    for pname in m.process:
        if not PROCESS_NAME.match(pname):
            add(("process", pname),
                f'"{pname}": a process name is 1-8 characters: a-z first, then a-z or 0-9')
        elif pname in RESERVED_PROCESS_NAMES:
            add(("process", pname), f'"{pname}": reserved (a cgroup v1 control file has this name)')

    seen_paths: list[tuple[str, str]] = []
    volumes: list[tuple[tuple[str | int, ...], Volume]] = [
        (("volume", i, "path"), v) for i, v in enumerate(m.volume)] + m.directory_volumes()
    for loc, vol in volumes:
        if loc[0] == "volume" and vol.owner not in m.process:
            known = ", ".join(sorted(m.process)) or "none"
            add(("volume", loc[1], "owner"),
                f'"{vol.owner}": no such process (processes: {known})')
        if vol.path == "/" or any(vol.path == r or vol.path.startswith(r + "/")
                                  for r in RESERVED_ROOTS):
            add(loc, f'"{vol.path}": cannot be a volume (/, /proc, /dev and /sys are not)')
        for where, other in seen_paths:
            if vol.path == other or vol.path.startswith(other + "/") \
                    or other.startswith(vol.path + "/"):
                add(loc, f'"{vol.path}": overlaps {where} "{other}"')
        seen_paths.append((_key(loc), vol.path))
    if m.image.delta == "disk" and not MIN_FILESYSTEM <= m.image.delta_size <= MAX_FILESYSTEM:
        add(("image", "delta_size"), f"{m.image.delta_size}: a disk delta is a file system of "
                                     "its own: 8M to 16T")
    for path, pname in m.image.owner.items():
        if pname not in m.process:
            known = ", ".join(sorted(m.process)) or "none"
            add(("image", "owner", path), f'"{pname}": no such process (processes: {known})')

    listeners: dict[tuple[str, int], str] = {}
    for pname, proc in m.process.items():
        base = ("process", pname)
        if not proc.command[0].startswith("/"):
            add(base + ("command", 0), f'"{proc.command[0]}": the program must be an absolute path')
        elif proc.exec_ is not None and proc.command[0] not in proc.exec_:
            add(base + ("exec",), f'does not include command[0] "{proc.command[0]}"')
        for k, port in enumerate(proc.listen):
            if port.first < 1024 and "NET_BIND_SERVICE" not in proc.capabilities:
                add(base + ("listen", k),
                    f'"{port}": ports below 1024 need capabilities = ["NET_BIND_SERVICE"]')
            for number in range(port.first, port.last + 1):
                owner = listeners.setdefault((port.proto, number), pname)
                if owner != pname:
                    add(base + ("listen", k), f'"{port}": {port.proto}/{number} is already '
                                              f'declared by process "{owner}"')
                    break
        for key, argv in (("reload", proc.reload if isinstance(proc.reload, list) else None),
                          ("setup", proc.setup.command if proc.setup else None)):
            if argv is None:
                continue
            at: tuple[str | int, ...] = base + ((key, 0) if key == "reload"
                                                else (key, "command", 0))
            allowed = proc.setup.executables(proc.executables) \
                if key == "setup" and proc.setup else proc.executables
            if not argv[0].startswith("/"):
                add(at, f'"{argv[0]}": the program must be an absolute path')
            elif key == "setup" and proc.setup and proc.setup.exec_ is not None:
                if argv[0] not in allowed:
                    add(base + ("setup", "exec"), f'does not include setup.command[0] '
                                                  f'"{argv[0]}"')
            elif argv[0] not in allowed:
                add(at, f'"{argv[0]}": not in exec (it runs under the process\'s containment, '
                        "which executes only what exec lists; or give the setup its own "
                        "setup.exec)" if key == "setup" else
                        f'"{argv[0]}": not in exec (it runs under the process\'s containment, '
                        "which executes only what exec lists)")
        if isinstance(proc.syscalls, list):
            for k, name in enumerate(proc.syscalls):
                if not _known_syscall(name):
                    add(base + ("syscalls", k), f'"{name}": unknown system call')
    return out


def _key(loc: tuple[str | int, ...]) -> str:
    """("volume", 0, "path") -> "volume[0]"; ("process", "web", "state_directory", 1) ->
    "process.web.state_directory[1]"."""
    parts = [p for p in loc if p != "path"]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + part
    return text


def _known_syscall(name: str) -> bool:
    from corral.kernel.libseccomp import load

    pyseccomp = load()  # lazily: only manifests with an explicit allow-list need libseccomp here
    return bool(re.fullmatch(r"[a-z0-9_]+", name)) and pyseccomp.resolve_syscall(
        pyseccomp.Arch.NATIVE, name) >= 0


# -- entry points ---------------------------------------------------------------------------

def parse_manifest(file: str, data: dict[str, Any]) -> Manifest:
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise InputError(problems_from(file, exc)) from None
    problems = _cross_checks(file, manifest)
    if problems:
        raise InputError(problems)
    return manifest


def load_manifest(file: str) -> Manifest:
    """Read and validate one manifest; raises InputError listing every problem found."""
    return parse_manifest(file, tomlfile.load(file))

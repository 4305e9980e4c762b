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
    ValidationError,
)

from corral.core.capabilities import normalize_capability
from corral.core.errors import InputError, Problem
from corral.core.names import PROCESS_NAME, SERVICE_NAME  # noqa: E402  (re-exported)
from corral.core.netspec import Endpoint, PortSpec, parse_endpoint, parse_ports
from corral.core.units import parse_duration, parse_size
from corral.manifest import tomlfile

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TRIPWIRES = ("egress", "listen", "exec", "base-write", "setuid", "ptrace", "spoof")
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


def _mode(raw: object) -> int:
    if not isinstance(raw, str) or not re.fullmatch(r"0?[0-7]{3}", raw):
        raise ValueError(f'"{raw}": expected an octal mode string like "0750"')
    mode = int(raw, 8)
    if mode & 0o002:
        raise ValueError(f'"{raw}": a volume must not be writable by others')
    return mode


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


def _no_nul(raw: str) -> str:
    if "\0" in raw:
        raise ValueError("contains a NUL byte")
    return raw


AbsPath = Annotated[str, BeforeValidator(_absolute_path)]
Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[int, BeforeValidator(parse_duration)]
Ports = Annotated[PortSpec, BeforeValidator(parse_ports), PlainSerializer(str)]
Connect = Annotated[Endpoint, BeforeValidator(parse_endpoint), PlainSerializer(str)]
Capability = Annotated[str, BeforeValidator(normalize_capability)]
Text = Annotated[str, AfterValidator(_no_nul)]


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


class Volume(Strict):
    path: AbsPath
    owner: str
    mode: Annotated[int, BeforeValidator(_mode)] = 0o750
    journal: bool = False
    epoch: Duration = 600


class Limits(Strict):
    memory: Size = 512 << 20
    pids: Annotated[int, AfterValidator(_positive)] = 256
    open_files: Annotated[int, AfterValidator(_positive)] = 1024
    cpu: Annotated[float, AfterValidator(_cpu)] = 1.0


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


class Manifest(Strict):
    name: Annotated[str, AfterValidator(_service_name)]
    image: Image = Image()
    volume: list[Volume] = []
    process: dict[str, Process]
    watch: Watch = Watch()

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

    seen_paths: list[tuple[int, str]] = []
    for i, vol in enumerate(m.volume):
        if vol.owner not in m.process:
            known = ", ".join(sorted(m.process)) or "none"
            add(("volume", i, "owner"), f'"{vol.owner}": no such process (processes: {known})')
        if vol.path == "/" or any(vol.path == r or vol.path.startswith(r + "/")
                                  for r in RESERVED_ROOTS):
            add(("volume", i, "path"),
                f'"{vol.path}": cannot be a volume (/, /proc, /dev and /sys are not)')
        for j, other in seen_paths:
            if vol.path == other or vol.path.startswith(other + "/") \
                    or other.startswith(vol.path + "/"):
                add(("volume", i, "path"), f'"{vol.path}": overlaps volume[{j}] "{other}"')
        seen_paths.append((i, vol.path))

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
        if isinstance(proc.syscalls, list):
            for k, name in enumerate(proc.syscalls):
                if not _known_syscall(name):
                    add(base + ("syscalls", k), f'"{name}": unknown system call')
    return out


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

"""The host file: network containment of the host itself (server) or of what it routes (router)."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError

from corral.core.errors import InputError, Problem
from corral.core.units import parse_size
from corral.manifest import tomlfile
from corral.manifest.model import AbsPath, Connect, Strict, load_manifest, problems_from

INTERFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
# Debian policy's package name, optionally with an architecture qualifier (`name:amd64`).
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")
# Where a persistent directory cannot go: the kernel's and the boot's own file systems.
NOT_PERSISTENT = ("/", "/proc", "/sys", "/dev", "/run", "/tmp", "/usr", "/etc", "/boot")


def _interface(raw: object) -> str:
    if not isinstance(raw, str) or not INTERFACE.match(raw) or raw in (".", ".."):
        raise ValueError(f'"{raw}": not an interface name (1-15 characters, no "/" or spaces)')
    return raw


def _prefix(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError('expected a prefix like "192.168.10.0/24"')
    try:
        return str(ipaddress.ip_network(raw, strict=True))
    except ValueError as exc:
        reason = "has host bits set" if "host bits" in str(exc) else "is not an IP prefix"
        raise ValueError(f'"{raw}": {reason}') from None


def _package(raw: object) -> str:
    if not isinstance(raw, str) or not PACKAGE.match(raw):
        raise ValueError(f'"{raw}": not a Debian package name')
    return raw


def _size(raw: object) -> int:
    return parse_size(raw)


class HostImage(Strict):
    """`[image]`: the host's own read-only root (docs/host-image.md)."""
    suite: Annotated[str, BeforeValidator(_package)] = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: list[Annotated[str, BeforeValidator(_package)]] = []
    # {image path = source}, a relative source relative to the host file's directory.
    paths: dict[AbsPath, str] = {}
    services: list[str] = []
    persist: list[AbsPath] = []
    delta_size: Annotated[int, BeforeValidator(_size)] = 256 << 20


class Lan(Strict):
    interface: Annotated[str, BeforeValidator(_interface)]
    prefixes: list[Annotated[str, BeforeValidator(_prefix)]]
    services: list[str] = []


class HostFile(Strict):
    role: Literal["server", "router"]
    management: list[Connect] = []
    allow_out: list[Connect] = []
    anti_spoofing: bool = True
    lan: list[Lan] = []
    image: HostImage | None = None


def is_host_file(data: dict[str, Any]) -> bool:
    """A host file is told apart from a manifest by its `role` key (manifests have none)."""
    return "role" in data


def parse_host_file(file: str, data: dict[str, Any]) -> HostFile:
    try:
        host = HostFile.model_validate(data)
    except ValidationError as exc:
        raise InputError(problems_from(file, exc)) from None
    problems = []
    if host.role == "server" and host.lan:
        problems.append(Problem(file, ("lan",), '[[lan]] tables are for role = "router" only'))
    if host.role == "router" and not host.lan:
        problems.append(Problem(file, ("lan",), 'role = "router" needs at least one [[lan]]'))
    names = [lan.interface for lan in host.lan]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(Problem(file, ("lan", i, "interface"), f'"{name}": listed twice'))
    for i, lan in enumerate(host.lan):
        for k, service in enumerate(lan.services):
            path = os.path.join(os.path.dirname(file), service)
            try:
                load_manifest(path)
            except InputError as exc:
                problems.append(Problem(file, ("lan", i, "services", k),
                                        f'"{service}": invalid manifest (run corral check {path})'))
                problems.extend(exc.problems)
    if host.image is not None:
        problems.extend(_image_problems(file, host.image))
    if problems:
        raise InputError(problems)
    return host


def _image_problems(file: str, image: HostImage) -> list[Problem]:
    problems = []
    here = os.path.dirname(file)
    if not image.mirror.startswith(("http://", "https://", "file:/")):
        problems.append(Problem(file, ("image", "mirror"),
                                f'"{image.mirror}": expected an http(s):// or file:/ URL'))
    if not any(p.startswith("linux-image-") for p in image.packages):
        problems.append(Problem(file, ("image", "packages"),
                                "the image boots its own kernel: list one, e.g. "
                                '"linux-image-amd64"'))
    for dest, source in image.paths.items():
        if not os.path.lexists(os.path.join(here, source)):
            problems.append(Problem(file, ("image", "paths", dest),
                                    f'"{source}": no such file or directory'))
    for i, path in enumerate(image.persist):
        if any(path == bad or (bad != "/" and path.startswith(bad + "/"))
               for bad in NOT_PERSISTENT):
            problems.append(Problem(file, ("image", "persist", i),
                                    f'"{path}": cannot persist (the image or the kernel owns '
                                    "it); persist a directory such as /var/log or /srv/data"))
    for k, service in enumerate(image.services):
        path = os.path.join(here, service)
        try:
            load_manifest(path)
        except InputError as exc:
            problems.append(Problem(file, ("image", "services", k),
                                    f'"{service}": invalid manifest (run corral check {path})'))
            problems.extend(exc.problems)
    if image.delta_size < 16 << 20:
        problems.append(Problem(file, ("image", "delta_size"),
                                "at least 16M: the host writes its logs and state there"))
    return problems


def load_host_file(file: str) -> HostFile:
    return parse_host_file(file, tomlfile.load(file))

"""The host file: network containment of the host itself (server) or of what it routes (router)."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError

from corral.core.errors import InputError, Problem
from corral.manifest import tomlfile
from corral.manifest.model import Connect, Strict, load_manifest, problems_from

INTERFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


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
    if problems:
        raise InputError(problems)
    return host


def load_host_file(file: str) -> HostFile:
    return parse_host_file(file, tomlfile.load(file))

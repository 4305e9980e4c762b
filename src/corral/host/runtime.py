"""What a running service needs, written by `install` as runtime.json so the launch path reads
one JSON file instead of re-planning (no manifest model, no ELF parsing at start-up)."""

from __future__ import annotations

import json
import os

from corral.core.paths import RUNTIME, lib_dir, log_dir, run_dir
from corral.core.record import asdict, field, record

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any


@record(frozen=True)
class ProcessSpec:
    name: str
    user: str
    uid: int
    gid: int
    command: list[str]
    environment: dict[str, str]
    capabilities: list[str]
    limits: dict[str, Any]
    seccomp: dict[str, Any]
    landlock: dict[str, Any]
    listen: list[str]
    # The life cycle; defaults for a runtime.json written before these existed.
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0
    reload: str | list[str] = "SIGHUP"
    setup: dict[str, Any] | None = None
    connect: list[str] = field(default_factory=list)


@record(frozen=True)
class VolumeSpec:
    path: str
    store: str
    owner: str  # process name
    journal: bool | None = None  # None: written before install recorded it (read the manifest)
    epoch: int | None = None
    size: int | None = None  # bytes of its own file system (host.loopfs); None: unbounded


@record(frozen=True)
class ServiceSpec:
    service: str
    base_version: int
    delta: str
    delta_size: int
    processes: list[ProcessSpec]
    volumes: list[VolumeSpec]
    watch: dict[str, Any] = field(default_factory=dict)  # react, tripwires, ...
    exec_paths: dict[str, list[str]] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)  # size, files, rate
    network: dict[str, Any] = field(default_factory=dict)  # mode, pool; {}: host

    @property
    def own_network(self) -> bool:
        return self.network.get("mode") == "own"

    # Paths are strings (core.paths says why).
    @property
    def netns(self) -> str:
        """Where its own network namespace is pinned (network = "own", host.netns)."""
        return os.path.join(self.run, "netns")

    @property
    def state(self) -> str:
        return lib_dir(self.service)

    @property
    def run(self) -> str:
        return run_dir(self.service)

    @property
    def logs(self) -> str:
        return log_dir(self.service)

    @property
    def base_root(self) -> str:
        return os.path.join(self.state, "base", str(self.base_version), "root")

    @property
    def delta_dir(self) -> str:
        return os.path.join(self.run if self.delta == "tmpfs" else self.state, "delta")

    @property
    def root(self) -> str:
        return os.path.join(self.run, "root")

    def process(self, name: str) -> ProcessSpec | None:
        return next((p for p in self.processes if p.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write(spec: ServiceSpec) -> None:
    from corral.core.fsio import write_json

    write_json(os.path.join(spec.state, RUNTIME), spec.to_json())


def read(service: str) -> ServiceSpec | None:
    try:
        with open(os.path.join(lib_dir(service), RUNTIME), "rb") as handle:
            data = json.loads(handle.read())
    except FileNotFoundError:
        return None
    data["processes"] = [ProcessSpec(**p) for p in data["processes"]]
    data["volumes"] = [VolumeSpec(**v) for v in data["volumes"]]
    return ServiceSpec(**data)

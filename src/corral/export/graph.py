"""`corral graph`: one Graphviz picture of what services may do, built from their manifests.

Per service a box (cluster) holds its processes (with their users) and volumes; arrows leave a
process for each declared `connect` and reach it for each `listen`. A connect whose protocol and
ports meet another process's listen is drawn as an arrow between the two: corral does not know
which host runs which service, so the address is not compared (docs/export.md says so). With a
host file the services sit inside the host's filter (its management, allow_out, and a router's
LANs with the services each one lists); incidents from the service's log turn a process red,
with a count per tripwire.

The text is deterministic (services by name, processes in manifest order, addresses sorted) so
golden files can pin it; `render` hands it to the real `dot` for SVG or PNG.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from corral.core.errors import RuntimeFailure
from corral.core.netspec import Endpoint, PortSpec
from corral.manifest.model import Manifest

RED = '"#c62828"'
BLUE = '"#1565c0"'
GREEN = '"#2e7d32"'
FORMATS = ("dot", "svg", "png")


@dataclass(frozen=True)
class Incidents:
    """One process's incidents: how many per tripwire (a record's `count` folds repeats)."""

    by_tripwire: dict[str, int] = field(default_factory=dict)
    open: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_tripwire.values())


@dataclass(frozen=True)
class Lan:
    interface: str
    prefixes: tuple[str, ...]
    services: tuple[str, ...]   # names of services drawn inside this LAN


@dataclass(frozen=True)
class HostFilter:
    file: str
    role: str
    management: tuple[Endpoint, ...]
    allow_out: tuple[Endpoint, ...]
    anti_spoofing: bool
    lans: tuple[Lan, ...] = ()


@dataclass(frozen=True)
class Service:
    manifest: Manifest
    incidents: dict[str, Incidents] = field(default_factory=dict)   # process -> its incidents


def fold_incidents(records: Iterable[dict]) -> dict[str, Incidents]:
    """Incident records (watch.incidents.read) counted per process and tripwire."""
    counts: dict[str, dict[str, int]] = {}
    opened: dict[str, int] = {}
    for record in records:
        process = str(record.get("process") or "?")
        tripwire = str(record.get("tripwire") or "?")
        count = record.get("count")
        n = count if isinstance(count, int) and count > 0 else 1
        counts.setdefault(process, {}).setdefault(tripwire, 0)
        counts[process][tripwire] += n
        if not record.get("closed_at"):
            opened[process] = opened.get(process, 0) + 1
    return {p: Incidents(dict(sorted(c.items())), opened.get(p, 0)) for p, c in counts.items()}


# ---------------------------------------------------------------- dot syntax

def _q(text: str) -> str:
    """A dot ID or label as a quoted string: backslashes and quotes escaped, so a manifest's
    text can neither end the string nor inject a dot escape (\\l, \\N...)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _label(*lines: str) -> str:
    """Several lines, each escaped on its own, joined by dot's centred line break."""
    return '"' + "\\n".join(_q(line)[1:-1] for line in lines if line) + '"'


def _attrs(**attrs: str) -> str:
    """[k=v, ...] in the order given; values are already dot text (quoted by the caller)."""
    return "[" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "]"


def _overlap(a: PortSpec, b: Endpoint) -> bool:
    return a.proto == b.proto and a.first <= b.last and b.first <= a.last


def _where(network: str | None) -> str:
    return network or "any address"


# ---------------------------------------------------------------- the picture

class _Dot:
    def __init__(self) -> None:
        self.lines = ["digraph corral {",
                      '  graph [rankdir=LR, fontname="Helvetica", fontsize=11, '
                      'nodesep=0.3, ranksep=0.9, labeljust=l];',
                      '  node [fontname="Helvetica", fontsize=10];',
                      '  edge [fontname="Helvetica", fontsize=9];']
        self.depth = 1

    def add(self, text: str) -> None:
        self.lines.append("  " * self.depth + text)

    def open(self, ident: str, label: str, **attrs: str) -> None:
        self.add(f"subgraph {_q('cluster_' + ident)} {{")
        self.depth += 1
        self.add(f"label={label};")
        for key, value in attrs.items():
            self.add(f"{key}={value};")

    def close(self) -> None:
        self.depth -= 1
        self.add("}")

    def text(self) -> str:
        return "\n".join(self.lines + ["}", ""])


def _pid(service: str, process: str) -> str:
    return _q(f"p:{service}/{process}")


def _service_cluster(dot: _Dot, svc: Service) -> None:
    m = svc.manifest
    image = m.image
    delta = f"delta {image.delta} {image.delta_size >> 20}M"  # both bounded by their size
    dot.open(f"s:{m.name}", _label(f"service {m.name}", f"base: {image.source}, {delta}",
                                   f"react: {m.watch.react}"),
             style='"rounded"', color='"#455a64"')
    for pname, proc in m.process.items():
        lines = [pname, f"user {m.user_of(pname)}", " ".join(proc.command)[:60]]
        if proc.capabilities:
            lines.append("caps " + ",".join(proc.capabilities))
        attrs = {"shape": "box", "style": '"rounded,filled"', "fillcolor": '"#eceff1"'}
        found = svc.incidents.get(pname)
        if found and found.total:
            lines.append(f"incidents: {found.total} ({found.open} open)")
            lines += [f"{tripwire} x{n}" for tripwire, n in found.by_tripwire.items()]
            attrs.update(color=RED, fontcolor=RED, fillcolor='"#ffebee"',
                         penwidth="2")
        dot.add(f"{_pid(m.name, pname)} {_attrs(label=_label(*lines), **attrs)};")
    for vol in m.volume:
        vid = _q(f"v:{m.name}:{vol.path}")
        mode = f"{vol.mode:04o}" + (", journal" if vol.journal else "")
        dot.add(f"{vid} {_attrs(shape='cylinder', label=_label(vol.path, mode))};")
        for pname in m.process:
            style = {"label": '"rw"'} if pname == vol.owner else {"label": '"ro"',
                                                                   "style": "dashed"}
            dot.add(f"{_pid(m.name, pname)} -> {vid} {_attrs(arrowhead='none', **style)};")
    dot.close()


def graph(services: list[Service], host: HostFilter | None = None) -> str:
    """The dot text for these services (and the host's filter around them)."""
    services = sorted(services, key=lambda s: s.manifest.name)
    dot = _Dot()
    in_lan = {name: lan for lan in (host.lans if host else ()) for name in lan.services}
    if host is not None:
        rules = ["policy drop both ways", "anti-spoofing" if host.anti_spoofing
                 else "no anti-spoofing"]
        dot.open("host", _label(f"{host.role} {host.file}", "table inet corral-host",
                                ", ".join(rules)), style='"dashed"', color=BLUE)
        dot.add(f"{_q('host')} {_attrs(shape='diamond', label=_q('filter'), color=BLUE)};")
    for svc in services:
        if svc.manifest.name not in in_lan:
            _service_cluster(dot, svc)
    if host is not None:
        for i, lan in enumerate(host.lans):
            dot.open(f"lan{i}", _label(f"lan {lan.interface}", ", ".join(lan.prefixes),
                                       "forwarded: only its services' flows"),
                     style='"dashed"', color=BLUE)
            for svc in services:
                if in_lan.get(svc.manifest.name) == lan:
                    _service_cluster(dot, svc)
            dot.close()
        dot.close()

    addresses: set[str] = set()
    edges: list[str] = []
    listeners = [(s.manifest.name, p, spec) for s in services
                 for p, proc in s.manifest.process.items() for spec in proc.listen]
    for svc in services:
        name = svc.manifest.name
        for pname, proc in svc.manifest.process.items():
            for ep in sorted(proc.connect, key=lambda e: (e.network or "", e.proto, e.first)):
                peers = [(s, p) for s, p, spec in listeners if _overlap(spec, ep)
                         and (s, p) != (name, pname)]
                for s, p in peers:
                    edges.append(f"{_pid(name, pname)} -> {_pid(s, p)} "
                                 f"{_attrs(label=_q(str(ep)), color=GREEN)};")
                if not peers:
                    addresses.add(_where(ep.network))
                    edges.append(f"{_pid(name, pname)} -> {_q('a:' + _where(ep.network))} "
                                 f"{_attrs(label=_q(str(ep.ports)))};")
            for spec in proc.listen:
                edges.append(f"{_q('clients')} -> {_pid(name, pname)} "
                             f"{_attrs(label=_q(str(spec)))};")
    if host is not None:
        for ep in host.management:
            addresses.add(_where(ep.network))
            edges.append(f"{_q('a:' + _where(ep.network))} -> {_q('host')} "
                         f"{_attrs(label=_q('management ' + str(ep.ports)), style='bold')};")
        for ep in host.allow_out:
            addresses.add(_where(ep.network))
            edges.append(f"{_q('host')} -> {_q('a:' + _where(ep.network))} "
                         f"{_attrs(label=_q('allow_out ' + str(ep.ports)))};")
    if any(e.startswith(_q("clients")) for e in edges):
        dot.add(f"{_q('clients')} {_attrs(shape='plaintext', label=_q('clients (any address)'))};")
    for address in sorted(addresses):
        dot.add(f"{_q('a:' + address)} {_attrs(shape='ellipse', label=_q(address))};")
    for edge in edges:
        dot.add(edge)
    return dot.text()


def render(text: str, fmt: str) -> bytes:
    """The picture through the real Graphviz `dot` (Debian's graphviz)."""
    if fmt == "dot":
        return text.encode()
    program = shutil.which("dot")
    if program is None:
        raise RuntimeFailure("Graphviz's dot is not installed (apt-get install graphviz); "
                             "--format dot needs nothing")
    try:
        done = subprocess.run([program, f"-T{fmt}"], input=text.encode(), capture_output=True,
                              timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"dot failed: {exc}") from None
    if done.returncode != 0:
        raise RuntimeFailure("dot failed: " + done.stderr.decode(errors="replace").strip())
    return done.stdout


# ---------------------------------------------------------------- inputs

def applied_host_file() -> str | None:
    """The host file of the filter applied here (pending first, else the last confirmed), if
    it is still readable: the picture shows what the host's table was built from."""
    import json
    import os

    from corral.host.firewall_guard import state_dir

    for record in ("pending.json", "confirmed.json"):
        try:
            path = json.loads((state_dir() / record).read_text()).get("host_file")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def installed_names() -> list[str]:
    from corral.core.paths import RECORD, lib_root
    from corral.host.firewall_guard import STATE

    return sorted(p.parent.name for p in Path(lib_root()).glob(f"*/{RECORD}")
                  if p.parent.name != STATE)


def load(targets: list[tuple[str, bool]], host_file: str | None) -> tuple[list[Service],
                                                                         HostFilter | None]:
    """Services from NAME|FILE arguments (none: every installed one), with their incidents, and
    the host filter of `host_file` (a router's LAN manifests are added to the picture)."""
    import os

    from corral.core.errors import UsageError
    from corral.core.paths import lib_dir
    from corral.export.source import load_source
    from corral.manifest.hostfile import load_host_file
    from corral.manifest.model import load_manifest
    from corral.watch import incidents

    manifests: dict[str, Manifest] = {}
    for target, is_file in targets or [(n, False) for n in installed_names()]:
        m = load_source(target, is_file).manifest
        if m.name in manifests and manifests[m.name] != m:
            raise UsageError(f"{target}: a different manifest of service {m.name} is already "
                             "in the picture")
        manifests[m.name] = m
    host = None
    if host_file is not None:
        spec = load_host_file(host_file)
        lans = []
        for lan in spec.lan:
            names = []
            for rel in lan.services:
                m = load_manifest(os.path.join(os.path.dirname(host_file), rel))
                manifests.setdefault(m.name, m)
                names.append(m.name)
            lans.append(Lan(lan.interface, tuple(lan.prefixes), tuple(names)))
        host = HostFilter(os.path.basename(host_file), spec.role, tuple(spec.management),
                          tuple(spec.allow_out), spec.anti_spoofing, tuple(lans))
    if not manifests:
        raise UsageError("nothing to draw: no service is installed here (name a manifest FILE)")
    services = [Service(m, fold_incidents(incidents.read(lib_dir(m.name))))
                for m in manifests.values()]
    return services, host

"""What a running service stands on outside its own root, set up by its supervisor in the
host's namespaces before the first process starts and taken down after the last one: the file
systems of its sized volumes, its own network namespace (network = "own"), and the paths it
writes that must never run. Plain functions of the service's spec, so the supervisor's loop
stays about processes and incidents."""

from __future__ import annotations

import os

from corral.core import log
from corral.host.runtime import ServiceSpec

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any


def mount_sized_volumes(spec: ServiceSpec) -> None:
    """Their file systems, in the host's namespace, if they are not mounted (after a reboot):
    install mounted them once."""
    sized = [vol for vol in spec.volumes if vol.size]
    if not sized:
        return
    from corral.host import loopfs  # only then: it needs subprocess (mkfs, e2fsck)

    for vol in sized:
        for path in loopfs.mount_volume(loopfs.sized(spec.state, vol.store)):
            log.warning(f"volume {vol.path}: {path} was not mounted (a reboot?): mounted it")


def own_network(spec: ServiceSpec) -> tuple[Any, list[str]]:
    """network = "own": the namespace, its veth and NAT (host.netns), and the service's table
    applied inside it too: its sockets are there, so its per-process rules are. Returns the
    host.netns.Link and the warnings for `status`. Called while still in the host's mount
    namespace: the namespace's pin must be seen there."""
    from corral.host import netns, nft
    from corral.plan import nft_rules
    from corral.supervise.reload import service_flows

    flows = service_flows(spec)
    link = netns.create(spec.service, spec.network.get("pool", netns.DEFAULT_POOL),
                        [p for flow in flows for p in flow.listen],
                        [c for flow in flows for c in flow.connect])
    try:
        nft.apply(nft_rules.service_ruleset(spec.service, netns.inside_flows(flows, link)),
                  netns=spec.netns)
    except nft.NftError as exc:
        raise netns.NetnsError(f"the service's table in its namespace: {exc}") from exc
    warnings = []
    if not netns.forwarding():
        warnings.append("network = \"own\": net.ipv4.ip_forward is 0, so connects beyond this "
                        "host and clients on other hosts cannot pass (it is host-wide; corral "
                        "does not set it)")
    return link, warnings


def remove_own_network(spec: ServiceSpec) -> None:
    """Back in the host's mount namespace, where the pin is."""
    if spec.own_network:
        from corral.host import netns

        netns.remove(spec.service)


def table_netns(spec: ServiceSpec) -> str | None:
    """Where the service's table is: in its own namespace, or in the host's (None)."""
    return spec.netns if spec.own_network else None


def noexec_paths(spec: ServiceSpec) -> tuple[str, ...]:
    """/tmp and every `writable` path: what the service writes must never run. A path that
    holds one of the `exec` programs is left executable (it cannot be both)."""
    volumes = {v.path for v in spec.volumes}  # already noexec mounts
    executables = [p for paths in spec.exec_paths.values() for p in paths]
    out = {"/tmp"} | (set(writable_paths(spec)) - {"/dev"} - volumes)
    return tuple(sorted(p for p in out if not any(
        e == p or e.startswith(p.rstrip("/") + "/") for e in executables)))


def writable_paths(spec: ServiceSpec) -> tuple[str, ...]:
    """Every process's Landlock read_write: where the delta is needed (launch.imageroot)."""
    return tuple(sorted({p for proc in spec.processes
                         for p in proc.landlock.get("read_write", ())}))


def root_image(spec: ServiceSpec) -> tuple[str | None, str | None]:
    """The base's read-only image (host.baseimage; made now for a base sealed before images
    existed) and, when there is none, why not."""
    from corral.host import baseimage

    version_dir = os.path.dirname(spec.base_root)
    why = baseimage.ensure(version_dir)
    return (None, why) if why else (str(baseimage.image_of(version_dir)), None)

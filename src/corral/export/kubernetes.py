"""`corral export kubernetes`: a Pod (one container per process), its PersistentVolumeClaims, a
Service for the listens, a default-deny NetworkPolicy, and a seccomp profile per process.

The Pod runs the image `corral export oci` makes from the base (`localhost/corral-NAME:N`,
never pulled). The seccomp profile is named twice: `securityContext.seccompProfile` for the
kubelet, and the older `seccomp.security.alpha.kubernetes.io` annotations, the only form podman
4.3's `kube play` reads. YAML is written by a small emitter below (block style, every string
JSON-quoted, which YAML reads as it is): no YAML library for a fixed, simple shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

from corral.core.paths import escape_path
from corral.export import seccomp_json
from corral.export.source import Source
from corral.manifest.model import Manifest
from corral.plan.sandbox import sandbox_for

# Ports a range may expand to in containerPorts; a longer range is in the NetworkPolicy only.
MAX_LISTED_PORTS = 16
PVC_SIZE = "1Gi"  # for a volume without `size`

LOST = (
    "the per-process network rules: a NetworkPolicy selects the whole pod, and processes in "
    "one pod reach each other over loopback whatever it says",
    "Landlock (paths and ports per process); the base image's read-only root stands for the "
    "path rules",
    "the watcher, its tripwires, reactions and incidents; revert (a restarted container "
    "starts from the image, which is close); the redo log of journaled volumes",
    "limits.pids and limits.open_files (the kubelet's pod PID limit and the runtime's "
    "ulimits are node settings)",
    "a PersistentVolumeClaim's size for a volume without `size` (1Gi is asked for) and the "
    "volume's mode (fsGroup gives the owner's group)",
    "NetworkPolicy needs a network plugin that enforces it; podman ignores it",
) + seccomp_json.LOST


def image_ref(src: Source) -> str:
    return f"localhost/corral-{src.manifest.name}:{src.base_version}"


def profile_name(m: Manifest, process: str) -> str:
    return f"corral-{m.name}-{process}.json"


def _dns(text: str) -> str:
    """A DNS-1123 label from a volume's store name (lower case, digits and '-')."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "volume"


def _claim(m: Manifest, path: str) -> str:
    return f"{m.name}-{_dns(escape_path(path))}"


def _ports(specs, limit: int = MAX_LISTED_PORTS) -> list[tuple[str, int]]:
    out = []
    for s in specs:
        if s.last - s.first < limit:
            out += [(s.proto.upper(), n) for n in range(s.first, s.last + 1)]
    return out


def _policy_ports(specs) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in specs:
        port: dict[str, Any] = {"protocol": s.proto.upper(), "port": s.first}
        if s.last != s.first:
            port["endPort"] = s.last
        out.append(port)
    return out


def _container(src: Source, process: str) -> dict[str, Any]:
    m = src.manifest
    proc = m.process[process]
    limits = {"memory": str(proc.limits.memory)}
    if proc.limits.cpu is not None:  # no quota unless the manifest asks for one
        limits["cpu"] = f"{round(proc.limits.cpu * 1000)}m"
    mounts = [{"name": _claim(m, v.path), "mountPath": v.path, "readOnly": v.owner != process}
              for v in m.volume]
    mounts += [{"name": "delta-tmp", "mountPath": "/tmp"}]
    mounts += [{"name": f"writable-{i}", "mountPath": p} for i, p in enumerate(proc.writable)]
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if proc.capabilities:
        caps["add"] = list(proc.capabilities)
    container: dict[str, Any] = {
        "name": process, "image": image_ref(src), "imagePullPolicy": "Never",
        "command": list(proc.command),
        "env": [{"name": k, "value": v} for k, v in sorted(proc.environment.items())],
        "ports": [{"containerPort": n, "protocol": p} for p, n in _ports(proc.listen)],
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": mounts,
        "securityContext": {
            "runAsUser": src.uids[process], "runAsGroup": src.gids[process],
            "runAsNonRoot": True, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "privileged": False, "capabilities": caps,
            "seccompProfile": {"type": "Localhost",
                               "localhostProfile": profile_name(m, process)}},
    }
    return {k: v for k, v in container.items() if v != []}


def pod(src: Source) -> dict[str, Any]:
    m = src.manifest
    annotations = {f"container.seccomp.security.alpha.kubernetes.io/{p}":
                   f"localhost/{profile_name(m, p)}" for p in m.process}
    if len(m.process) == 1:  # the form podman 4.3 reads, for the pod as a whole
        annotations["seccomp.security.alpha.kubernetes.io/pod"] = \
            f"localhost/{profile_name(m, next(iter(m.process)))}"
    owner = next((v.owner for v in m.volume), None)
    pod_security: dict[str, Any] = {"runAsNonRoot": True}
    if owner is not None:  # volumes' files get the owner's group, as install's mode says
        pod_security["fsGroup"] = src.gids[owner]
    delta: dict[str, Any] = {"sizeLimit": str(m.image.delta_size)}
    if m.image.delta == "tmpfs":
        delta["medium"] = "Memory"
    volumes = [{"name": _claim(m, v.path),
                "persistentVolumeClaim": {"claimName": _claim(m, v.path)}} for v in m.volume]
    volumes.append({"name": "delta-tmp", "emptyDir": delta})
    volumes += [{"name": f"writable-{i}", "emptyDir": {}}
                for proc in m.process.values() for i, _ in enumerate(proc.writable)]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": m.name, "labels": _labels(m), "annotations": annotations},
        "spec": {"hostname": m.name, "automountServiceAccountToken": False,
                 "enableServiceLinks": False, "restartPolicy": "OnFailure",
                 "securityContext": pod_security,
                 "containers": [_container(src, p) for p in m.process],
                 "volumes": volumes},
    }


def _labels(m: Manifest) -> dict[str, str]:
    return {"app.kubernetes.io/name": m.name, "app.kubernetes.io/managed-by": "corral"}


def claims(m: Manifest) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": _claim(m, v.path), "labels": _labels(m)},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": _quantity(v.size)}}}}
            for v in m.volume]


def _quantity(size: int | None) -> str:
    """A volume's `size` as a Kubernetes quantity (binary suffix when exact)."""
    if not size:
        return PVC_SIZE
    for shift, suffix in ((40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def service(m: Manifest) -> list[dict[str, Any]]:
    ports = [{"name": f"{proto.lower()}-{n}", "protocol": proto, "port": n, "targetPort": n}
             for proc in m.process.values() for proto, n in _ports(proc.listen)]
    if not ports:
        return []
    return [{"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": m.name, "labels": _labels(m)},
             "spec": {"selector": {"app.kubernetes.io/name": m.name}, "ports": ports}}]


def network_policy(m: Manifest) -> dict[str, Any]:
    """Default deny both ways; ingress to the declared listens from anywhere, egress to the
    declared connects (an address-less connect is any address)."""
    listens = [s for proc in m.process.values() for s in proc.listen]
    ingress = [{"ports": _policy_ports(listens)}] if listens else []
    egress = []
    for endpoint in sorted({e for proc in m.process.values() for e in proc.connect}):
        rule: dict[str, Any] = {"ports": _policy_ports([endpoint.ports])}
        if endpoint.network is not None:
            rule["to"] = [{"ipBlock": {"cidr": endpoint.network}}]
        egress.append(rule)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": m.name, "labels": _labels(m)},
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": m.name}},
                     "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": egress}}


def profiles(src: Source) -> dict[str, str]:
    m = src.manifest
    return {profile_name(m, p): json.dumps(seccomp_json.profile(
        sandbox_for(m, p, proc).seccomp), indent=2) + "\n" for p, proc in m.process.items()}


def export(src: Source) -> dict[str, str]:
    """{file name: text}: NAME.yaml (every object) and the seccomp profiles."""
    m = src.manifest
    documents = [pod(src), *claims(m), *service(m), network_policy(m)]
    header = (f"# exported by `corral export kubernetes` from the manifest of service "
              f'"{m.name}". Image: `corral export oci {m.name}`;\n# seccomp profiles: '
              "the .json files, in the kubelet's seccomp directory (podman: "
              "--seccomp-profile-root).\n# What Kubernetes cannot express here:\n"
              + "".join(f"#   - {why}\n" for why in LOST))
    text = header + "".join("---\n" + to_yaml(d) for d in documents)
    return {f"{m.name}.yaml": text, **profiles(src)}


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists, strings, numbers and booleans."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for key, item in value.items():
            if _scalar(item) or item in ({}, []):
                out.append(f"{pad}{_key(key)}: {_inline(item)}\n")
            else:
                out.append(f"{pad}{_key(key)}:\n" + to_yaml(item, indent + 2))
        return "".join(out)
    if isinstance(value, list):
        out = []
        for item in value:
            if _scalar(item):
                out.append(f"{pad}- {_inline(item)}\n")
            else:  # "- " then the item's first line, the rest indented under it
                body = to_yaml(item, indent + 2)
                out.append(f"{pad}- {body[indent + 2:]}")
        return "".join(out)
    return pad + _inline(value) + "\n"


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z][A-Za-z0-9./_-]*", key) else json.dumps(key)


def _scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def _inline(value: Any) -> str:
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    return json.dumps(value)  # true/false, numbers, and strings in double quotes

"""The host's network side for `corral audit --host`: listening sockets and their owners,
long-running programs outside corral, and whether the firewall denies by default.

Sockets are read from /proc/PID/net/{tcp,tcp6,udp,udp6} (the network namespace of PID; "self"
by default) and mapped to processes through /proc/*/fd. A process is contained by corral when
it runs as a corral-* user inside a corral cgroup (/proc/PID/cgroup naming "/corral/").
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from corral.audit.findings import Finding
from corral.core.errors import escape_controls
from corral.kernel import procnet


@dataclass
class Socket:
    proto: str  # tcp | udp
    address: str
    port: int
    uid: int
    inode: int
    pids: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else \
            f"{self.address}:{self.port}"

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def listening(net_pid: int | str = "self") -> list[Socket]:
    """TCP sockets in LISTEN and unconnected bound UDP sockets of PID's network namespace."""
    return [Socket(s.proto, s.address, s.port, s.uid, s.inode) for s in procnet.listening(net_pid)]


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return ""


def socket_owners(inodes: set[int]) -> dict[int, list[int]]:
    """socket inode -> pids holding it (needs root to see other users' processes)."""
    owners: dict[int, list[int]] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes and pid not in owners.setdefault(inode, []):
                    owners[inode].append(pid)
    return owners


@dataclass
class ProcInfo:
    pid: int
    comm: str
    exe: str
    uid: int
    user: str
    in_corral_cgroup: bool
    ppid: int

    @property
    def contained(self) -> bool:
        return self.user.startswith("corral-") and self.in_corral_cgroup


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def proc_info(pid: int) -> ProcInfo | None:
    status = _read(f"/proc/{pid}/status")
    if not status:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        uid = int(fields.get("Uid", "").split()[1])  # effective uid
        ppid = int(fields.get("PPid", "0").strip())
    except (IndexError, ValueError):
        return None
    try:
        exe = escape_controls(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    cgroup = _read(f"/proc/{pid}/cgroup")
    return ProcInfo(pid, escape_controls(_read(f"/proc/{pid}/comm").strip()), exe, uid,
                    user_name(uid), "/corral/" in cgroup, ppid)


def listener_findings(net_pid: int | str = "self") -> tuple[list[Finding], set[int]]:
    """One finding per listening endpoint (SO_REUSEPORT sockets merged); also the pids seen
    listening."""
    sockets = listening(net_pid)
    owners = socket_owners({s.inode for s in sockets})
    endpoints: dict[tuple[str, str], list[Socket]] = {}
    for sock in sockets:
        endpoints.setdefault((sock.proto, sock.endpoint), []).append(sock)
    out, pids = [], set()
    for (proto, endpoint), group in endpoints.items():
        sock = min(group, key=lambda s: s.uid)  # a root one, if any
        procs = [p for p in (proc_info(pid) for pid in sorted({pid for s in group
                                                               for pid in owners.get(s.inode, [])}))
                 if p]
        pids |= {p.pid for p in procs}
        users = sorted({user_name(s.uid) for s in group})
        contained = all(u.startswith("corral-") for u in users) and all(p.contained for p in procs)
        reach = "loopback only" if sock.loopback else "reachable from the network"
        if contained:
            severity, what = "info", f"contained by corral ({', '.join(users)})"
        elif sock.uid == 0:
            severity, what = ("medium" if sock.loopback else "high"), "root listener, not contained"
        else:
            severity, what = ("low" if sock.loopback else "medium"), \
                f"{', '.join(users)} listener, not contained"
        programs = ", ".join(f"{p.comm} (pid {p.pid})" for p in procs) or "process unknown"
        out.append(Finding(f"host.listen.{proto}.{endpoint}", severity, "listen",
                           f"{what}; {reach}: {programs}", f"{proto} {endpoint}",
                           {"proto": proto, "address": sock.address, "port": sock.port,
                            "uid": sock.uid, "user": user_name(sock.uid), "contained": contained,
                            "processes": [{"pid": p.pid, "comm": p.comm, "exe": p.exe,
                                           "user": p.user, "corral_cgroup": p.in_corral_cgroup}
                                          for p in procs]}))
    return out, pids


def daemon_findings(skip_pids: set[int]) -> list[Finding]:
    """Long-running programs outside corral: children of PID 1 that are not kernel threads,
    grouped by executable (the listeners are reported on their own)."""
    groups: dict[str, list[ProcInfo]] = {}
    me = os.getpid()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid in skip_pids or pid == me:
            continue
        info = proc_info(pid)
        if info is None or info.ppid != 1 or not info.exe or info.contained:
            continue
        groups.setdefault(info.exe, []).append(info)
    out = []
    for exe, procs in sorted(groups.items()):
        users = sorted({p.user for p in procs})
        out.append(Finding(f"host.daemon.{exe}", "low" if "root" in users else "info", "daemon",
                           f"{procs[0].comm} runs outside corral as {', '.join(users)}", exe,
                           {"pids": sorted(p.pid for p in procs), "users": users}))
    return out


# -- the firewall -------------------------------------------------------------------------------

def _final_drop(rules: list[dict]) -> bool:
    """The chain's last rule drops or rejects everything (a `drop` with no match before it)."""
    if not rules:
        return False
    expr = rules[-1].get("expr", [])
    verdicts = [e for e in expr if not set(e) <= {"counter", "log", "limit"}]
    return len(verdicts) == 1 and set(verdicts[0]) <= {"drop", "reject"}


def firewall_state(ruleset: dict | None = None, net_pid: int | str = "self") -> dict[str, Any]:
    """Which directions deny by default, from `nft -j list ruleset` of PID's netns."""
    if ruleset is None:
        argv = [shutil.which("nft") or "/usr/sbin/nft", "-j", "list", "ruleset"]
        if net_pid != "self":
            argv = ["nsenter", f"--net=/proc/{net_pid}/ns/net"] + argv
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            if result.returncode != 0:
                return {"readable": False, "error": result.stderr.strip()[:200]}
            ruleset = json.loads(result.stdout or '{"nftables": []}')
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            return {"readable": False, "error": str(exc)}
    items = ruleset.get("nftables", [])
    tables = {(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i}
    rules: dict[tuple[str, str, str], list[dict]] = {}
    for item in items:
        if "rule" in item:
            r = item["rule"]
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
    covered: dict[str, set[str]] = {"input": set(), "output": set()}
    for item in items:
        chain = item.get("chain")
        if not chain or chain.get("hook") not in covered or chain.get("type", "filter") != "filter":
            continue
        key = (chain["family"], chain["table"], chain["name"])
        if chain.get("policy") == "drop" or _final_drop(rules.get(key, [])):
            families = {"inet": {"ip", "ip6"}, "ip": {"ip"}, "ip6": {"ip6"}}
            covered[chain["hook"]] |= families.get(chain["family"], set())
    corral_host = ("inet", "corral-host") in tables
    return {"readable": True, "corral_host": corral_host,
            "input_default_deny": covered["input"] == {"ip", "ip6"},
            "output_default_deny": covered["output"] == {"ip", "ip6"},
            "input_families": sorted(covered["input"]),
            "output_families": sorted(covered["output"])}


def firewall_findings(state: dict[str, Any]) -> list[Finding]:
    if not state.get("readable"):
        return [Finding("host.firewall.unreadable", "medium", "firewall",
                        f"cannot read the nftables ruleset: {state.get('error')}", "nft")]
    out = []
    if not state["input_default_deny"]:
        open_for = sorted({"ip", "ip6"} - set(state["input_families"]))
        out.append(Finding("host.firewall.input", "high", "firewall",
                           "inbound is not default-deny: no input hook chain with policy drop"
                           f" for {' and '.join(open_for)}" + ("" if state["corral_host"] else
                                                               " (no table inet corral-host)"),
                           "nft list ruleset", state))
    if not state["output_default_deny"]:
        out.append(Finding("host.firewall.output", "low", "firewall",
                           "outbound is not default-deny: the host's own programs may connect "
                           "anywhere (corral's services are still held by their own tables)",
                           "nft list ruleset", state))
    return out


def net_findings(net_pid: int | str = "self") -> list[Finding]:
    listeners, pids = listener_findings(net_pid)
    return listeners + daemon_findings(pids) + firewall_findings(firewall_state(net_pid=net_pid))

"""`corral reload` and SIGHUP to the supervisor: tell the processes to re-read their
configuration, and bring the service's firewall sets up to the installed manifest, without a
restart.

Each process gets its declared `reload`: a signal (SIGHUP by default), sent only when the program
handles it (the init of a PID namespace ignores any other, and an unhandled SIGHUP would be
lost, not fatal), or a command run inside its containment the way `corral exec` runs one, its
output going to the process's log. The connect and listen sets are emptied and refilled in one
nft transaction. What a running process cannot take without a restart (its Landlock rules,
which hold the TCP ports, its command, seccomp filter, capabilities, environment, limits) is
named in `restart_needed`: `corral revert NAME` applies it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from corral.core import log
from corral.core.record import replace
from corral.core.text import iso
from corral.host import runtime
from corral.host.runtime import ProcessSpec, ServiceSpec
from corral.kernel import signals

REQUEST = "reload-request.json"
# What the kernel fixed when the process started: a reload cannot change these.
FIXED_AT_START = ("command", "environment", "capabilities", "limits", "seccomp", "landlock")
# What a reload adopts: the supervisor uses these from the freshly installed runtime.json.
ADOPTED = ("stop_signal", "stop_timeout", "reload", "setup", "connect", "listen")


def read_request(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, REQUEST)
    try:
        with open(path) as handle:
            request = json.load(handle)
        os.unlink(path)
    except (OSError, ValueError):
        return {}
    return request if isinstance(request, dict) else {}


def restart_needed(running: ProcessSpec, installed: ProcessSpec) -> list[str]:
    return [key for key in FIXED_AT_START if getattr(running, key) != getattr(installed, key)]


def service_flows(spec: ServiceSpec) -> list[Any]:
    """The per-process flows (plan.nft_rules.ProcessFlows) as runtime.json has them."""
    from corral.core.netspec import parse_endpoint, parse_ports
    from corral.plan import nft_rules

    return [nft_rules.ProcessFlows(p.name, p.user, tuple(parse_ports(x) for x in p.listen),
                                   tuple(parse_endpoint(x) for x in p.connect))
            for p in spec.processes]


def refill_firewall(spec: ServiceSpec) -> str:
    """The installed connect and listen sets, applied atomically (in the service's own
    namespace too, network = "own"); "" or why not."""
    from corral.host import nft
    from corral.plan import nft_rules

    try:
        refill = nft_rules.sets_refill(spec.service, service_flows(spec))
        nft.apply(refill)
        if spec.own_network and os.path.exists(spec.netns):
            from corral.host import netns

            link = netns.leased(spec.service)  # the NAT: the new listen ports and connects
            if link is not None:
                flows = service_flows(spec)
                nft.apply(nft_rules.sets_refill(spec.service, netns.inside_flows(flows, link)),
                          netns=spec.netns)
                netns.configure(link, [p for flow in flows for p in flow.listen],
                                [c for flow in flows for c in flow.connect])
    except (OSError, ValueError, nft.NftError) as exc:
        return f"firewall sets not refilled: {exc}"
    return ""


class Reloads:
    """The supervisor's side: one reload at a time is recorded in state.json as `reload`."""

    def __init__(self, service: str):
        self.service = service
        self.record: dict[str, Any] | None = None
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, children: dict[str, Any], request: dict[str, Any]) -> None:
        """`children`: process name -> the supervisor's Child (spec, init, output)."""
        fresh = runtime.read(self.service)
        only = request.get("process")
        record: dict[str, Any] = {"id": request.get("id"), "at": iso(time.time()),
                                  "firewall": "", "processes": {}, "done": False}
        if fresh is None:
            record["firewall"] = "not installed any more"
            record["done"] = True
            self.record = record
            return
        record["firewall"] = refill_firewall(fresh) or "refilled"
        for name, child in children.items():
            new = fresh.process(name)
            if new is None or (only and name != only):
                continue
            entry: dict[str, Any] = {"restart_needed": restart_needed(child.spec, new),
                                     "exit_code": None}
            if new.listen != child.spec.listen:  # UDP ports bindable: at once, like nft's
                try:
                    child.group.guard_udp_binds(new.listen)
                except (OSError, ValueError) as exc:
                    log.warning(f"reload of {name}: {exc}")
            child.spec = replace(child.spec, **{k: getattr(new, k) for k in ADOPTED})
            record["processes"][name] = entry
            if not child.init:
                entry["action"] = "not running"
            elif isinstance(new.reload, str):
                sig = signal.Signals[new.reload]
                if signals.handles(child.init, sig):
                    os.kill(child.init, sig)
                    entry["action"] = f"sent {new.reload}"
                else:
                    entry["action"] = f"not sent: the program does not handle {new.reload}"
            else:
                self._run_command(name, new.reload, child.output.write_fd)
                entry["action"] = "command started"
        self.record = record
        self.poll()

    def _run_command(self, process: str, argv: list[str], out_fd: int) -> None:
        """Like `corral exec`: it joins the process's namespaces, user, Landlock domain and
        seccomp filter, and its exec listener is answered by this supervisor's loop."""
        cmd = [sys.executable, "-m", "corral.cli.entry", "exec", self.service, process, "--",
               *argv]
        try:
            self.running[process] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=out_fd,
                start_new_session=True)
        except OSError as exc:
            log.warning(f"reload of {process}: {exc}")
            if self.record:
                self.record["processes"][process]["action"] = f"not run: {exc.strerror}"

    def poll(self) -> bool:
        """Collect finished reload commands; True when the record changed."""
        if self.record is None or self.record["done"]:
            return False
        for name, proc in list(self.running.items()):
            code = proc.poll()
            if code is not None:
                del self.running[name]
                self.record["processes"][name]["exit_code"] = code
                self.record["processes"][name]["action"] = "command ran"
        if not self.running:
            self.record["done"] = True
            return True
        return False


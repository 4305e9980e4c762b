"""The client side of `corral reload NAME [PROCESS]`: ask the supervisor (SIGHUP with a request
file) and wait for its record in state.json. Apart from supervise.reload, which the supervisor
imports, so that no import cycle runs through supervise.control."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from corral.supervise.reload import REQUEST


def request(service: str, process: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    from corral.core.errors import RuntimeFailure, UsageError
    from corral.supervise.control import read_state, spec_of, supervisor_alive

    spec = spec_of(service)
    if process is not None and spec.process(process) is None:
        known = ", ".join(p.name for p in spec.processes)
        raise UsageError(f"{service}: no process {process!r} (processes: {known})")
    state = read_state(service)
    if not supervisor_alive(state):
        raise RuntimeFailure(f"{service}: not running (start it with corral up)")
    ident = f"{os.getpid()}-{time.monotonic_ns()}"
    from corral.core.fsio import write_json

    write_json(os.path.join(spec.run, REQUEST), {"id": ident, "process": process})
    os.kill(state["supervisor"], signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = read_state(service) or {}
        record = now.get("reload") or {}
        if record.get("id") == ident and record.get("done"):
            return {"service": service, "reloaded_at": record["at"],
                    "firewall": record["firewall"],
                    "processes": [{"process": name} | entry
                                  for name, entry in sorted(record["processes"].items())]}
        if not supervisor_alive(now):
            raise RuntimeFailure(f"{service}: the supervisor stopped during the reload")
        time.sleep(0.02)
    raise RuntimeFailure(f"{service}: the reload did not finish within {timeout:.0f}s")

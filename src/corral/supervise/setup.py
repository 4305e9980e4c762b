"""A process's one-shot `setup` (PostgreSQL's initdb into its volume): run before its program,
under the same containment (user, namespaces, root, Landlock, seccomp, cgroup), so its writes go
where the program's would and it can do nothing the program could not.

It runs when its `creates` path is missing inside the service's root (looked up below the root
without following a symlink: the service wrote that tree), or, without `creates`, once: a marker
in the state directory records that it succeeded. A setup that fails leaves the process failed
with the setup's last lines as the reason; the service does not start.

A setup may have executables of its own (`setup.exec`: initdb runs postgres through popen, i.e.
/bin/sh): it is a separate launch of the process's confinement with its own Landlock execute
rights (`program`) and its own list in the exec guard, so the long-running program never gets
them.
"""

from __future__ import annotations

import os

from corral.core import tree
from corral.core.record import replace
from corral.host.runtime import ProcessSpec, ServiceSpec

TIMEOUT = 600.0


def program(proc: ProcessSpec) -> ProcessSpec:
    """The process's confinement running its setup: the setup's command and execute rights
    (a runtime.json written before setup.exec existed has no read_exec: the process's own)."""
    assert proc.setup is not None
    landlock = dict(proc.landlock)
    if "read_exec" in proc.setup:
        landlock["read_exec"] = list(proc.setup["read_exec"])
    return replace(proc, command=list(proc.setup["command"]), landlock=landlock)


def _marker(spec: ServiceSpec, proc: ProcessSpec) -> str:
    return os.path.join(spec.state, "setup", f"{proc.name}.done")


def needed(spec: ServiceSpec, proc: ProcessSpec) -> bool:
    if not proc.setup:
        return False
    creates = proc.setup.get("creates")
    if not creates:
        return not os.path.exists(_marker(spec, proc))
    try:
        with tree.directory(spec.root) as root:
            os.close(tree.open_beneath(root, creates, os.O_PATH))
    except FileNotFoundError:
        return True
    except OSError:  # a symlink or a file on the way: something is there, not ours to judge
        return False
    return False


def done(spec: ServiceSpec, proc: ProcessSpec) -> None:
    if proc.setup and not proc.setup.get("creates"):
        path = _marker(spec, proc)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "w") as handle:
            handle.write(" ".join(proc.setup["command"]) + "\n")


def failure(proc: ProcessSpec, code: int, lines: list[str], timed_out: bool) -> str:
    program = (proc.setup or {}).get("command", ["?"])[0]
    why = "timed out and was killed" if timed_out else f"exited with code {code}"
    said = " | ".join(lines[-3:]) or "no output"
    return f"setup {program} {why}; the service was not started; its output: {said}"

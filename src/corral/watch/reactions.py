"""Reactions: what the watcher does when a tripwire fires (the manifest's `react`), as objects in
two halves, fail2ban's actions in shape.

`contain` takes effect at once, inside the handler of the event that tripped: a set element, a
freeze, a SIGKILL; nothing that waits. `settle`, for a reaction that must wait for the
processes to die (kill, revert), is run by the supervisor's loop once they are all reaped, never
from inside a handler: a handler that waited would run the event loop inside itself, and every
event read meanwhile would be handled in the middle of another.
"""

from __future__ import annotations

from corral.host.runtime import ServiceSpec

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:  # a protocol is for the type checker only
    from typing import Any, Protocol

    class Containment(Protocol):
        """What the reactions act on: the supervisor, seen through only what they need (so the
        watcher does not depend on it, and a test can hold a smaller one)."""

        spec: ServiceSpec
        halting: bool  # a reaction is under way: the service's processes are being stopped

        def close_epochs(self, reason: str, incidents: tuple[str, ...] = ()) -> None: ...

        def isolate(self) -> None: ...

        def kill_all(self) -> None: ...

        def stay_down(self, reason: str) -> None: ...

        def revert_for(self, record: dict[str, Any]) -> str | None: ...


class Reaction:
    name = ""
    waits = False  # its settle() needs every process of the service reaped first

    def contain(self, target: Containment, record: dict[str, Any]) -> None:
        """Take effect now."""

    def settle(self, target: Containment, record: dict[str, Any]) -> dict[str, Any]:
        """Finish, once the processes are gone; returns what to add to the incident record."""
        return {}


class Log(Reaction):
    name = "log"


class Isolate(Reaction):
    """Cut every packet of the service's users and freeze its processes, for a person to look."""
    name = "isolate"

    def contain(self, target: Containment, record: dict[str, Any]) -> None:
        target.isolate()


class Kill(Reaction):
    """Pull the plug: every process dies, and the service stays down, saying why."""
    name = "kill"
    waits = True

    def contain(self, target: Containment, record: dict[str, Any]) -> None:
        target.kill_all()

    def settle(self, target: Containment, record: dict[str, Any]) -> dict[str, Any]:
        target.stay_down(record.get("note") or f"killed: incident {record['id']}")
        return {}


class Revert(Reaction):
    """Kill, archive the delta as evidence, and start again from the clean base."""
    name = "revert"
    waits = True

    def contain(self, target: Containment, record: dict[str, Any]) -> None:
        target.kill_all()

    def settle(self, target: Containment, record: dict[str, Any]) -> dict[str, Any]:
        return {"delta_archive": target.revert_for(record)}


REACTIONS: dict[str, Reaction] = {r.name: r for r in (Log(), Isolate(), Kill(), Revert())}

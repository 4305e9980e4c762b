"""The one thing every sensor returns: a tripwire event (in a module of its own so that the
sensors' helper modules share it without importing `sensors`)."""

from __future__ import annotations

from corral.core.record import field, record

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any


@record
class Event:
    tripwire: str
    uid: int | None
    pid: int | None
    at: float  # when the act happened (the kernel's timestamp where there is one)
    detail: dict[str, Any] = field(default_factory=dict)
    # Which clock `at` is (the incident's `act_clock`): "audit" (the kernel's audit record),
    # "notification" (the exec notification read), "received" (an NFLOG or fanotify message
    # read: the kernel stamps no packet at the output hook), "bpf" (a BPF program's
    # CLOCK_MONOTONIC stamp, as wall time), "mtime" (a delta file's), "walk".
    clock: str = "walk"

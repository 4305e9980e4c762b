"""The watcher's reactions in two halves (corral.watch.reactions): `contain` at once, `settle`
later, from the supervisor's loop, once the processes are reaped. Pure logic: the target is a
small stand-in for the supervisor (the `Containment` protocol is all the watcher knows of it);
the real supervisor's reactions are exercised end to end in test_watch.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from corral.watch import incidents
from corral.watch.sensors import Event
from corral.watch.watcher import Watcher


class Target:
    def __init__(self, state: Path):
        proc = SimpleNamespace(name="app", uid=64001, landlock={"read_write": ["/tmp"]})
        self.spec = SimpleNamespace(service="tstx", state=state, processes=[proc],
                                    watch={})
        self.halting = False
        self.calls: list[str] = []

    def close_epochs(self, reason: str, incidents: tuple[str, ...] = ()) -> None:
        self.calls.append(f"epochs {reason}")

    def isolate(self) -> None:
        self.calls.append("isolate")

    def kill_all(self) -> None:
        self.calls.append("kill_all")
        self.halting = True

    def stay_down(self, reason: str) -> None:
        self.calls.append(f"stay_down {reason}")

    def revert_for(self, record: dict[str, Any]) -> str | None:
        self.calls.append(f"revert {record['id']}")
        return "/archives/1/delta.tar.zst"


def event(tripwire: str = "egress") -> Event:
    return Event(tripwire, 64001, 42, 0.0, {"dst": "192.0.2.1"})


def test_a_revert_is_recorded_first_and_settled_later(tmp_path):
    target = Target(tmp_path)
    watcher = Watcher(target, "revert", ("egress",))
    record = watcher.trip(event())
    assert record is not None and target.calls == ["kill_all"]  # nothing waited
    on_disk = incidents.read(tmp_path)
    assert [i["id"] for i in on_disk] == [record["id"]] and on_disk[0]["delta_archive"] is None
    assert watcher.trip(event()) is None  # the processes are dying: this act dies with them
    watcher.settle()
    assert target.calls == ["kill_all", f"revert {record['id']}"]
    assert incidents.read(tmp_path)[0]["delta_archive"] == "/archives/1/delta.tar.zst"
    assert watcher.pending == []


def test_kill_stays_down_only_when_settled(tmp_path):
    target = Target(tmp_path)
    watcher = Watcher(target, "kill", ("egress",))
    record = watcher.trip(event())
    assert record is not None and target.calls == ["kill_all", "epochs incident"]
    watcher.settle()
    assert target.calls[-1] == f"stay_down killed: incident {record['id']}"


def test_log_and_isolate_need_no_settling(tmp_path):
    for react, effect in (("log", []), ("isolate", ["isolate"])):
        target = Target(tmp_path / react)
        (tmp_path / react).mkdir()
        watcher = Watcher(target, react, ("egress",))
        assert watcher.trip(event()) is not None
        assert target.calls == effect + ["epochs incident"] and watcher.pending == []


def test_a_base_write_is_blamed_on_the_process_that_may_write_there(tmp_path):
    target = Target(tmp_path)
    watcher = Watcher(target, "log", ("base-write",))
    record = watcher.trip(Event("base-write", 0, None, 0.0, {"path": "/tmp/x"}))
    assert record is not None and record["process"] == "app"
